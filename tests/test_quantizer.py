"""LsqQuantizer against the paper's equations (Esser et al., ICLR 2020), written out here.

Every expected value below is computed in this file with plain numpy / torch arithmetic
(float64 where it matters); the module under test is only ever called, never reused.

    forward   v_hat = round(clip(v/s, -Qn, Qp)) * s
    dv_hat/dv = 1 if -Qn < v/s < Qp else 0                       (unrounded v/s)
    dv_hat/ds = round(v/s) - v/s   if -Qn < v/s < Qp
                -Qn                if v/s <= -Qn
                 Qp                if v/s >= Qp
    step gradient = sum(upstream * dv_hat/ds) * g,   g = 1/sqrt(N * Qp)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from paper_formulas import paper_range

from lsq import quantizer as quantizer_module
from lsq.quantizer import LsqQuantizer

S = 0.25  # a power of two: v = x * S and v / S are exact in float32

WEIGHT_SHAPE = (6, 4, 3, 3)  # 216 weights
ACT_SHAPE = (4, 6, 3, 3)  # batch 4, 54 features per sample


# ------------------------------------------------------------------------------- references
def paper_reference(v: np.ndarray, s: float, qn: int, qp: int, upstream: np.ndarray, g: float):
    """Forward, grad to v, grad to s (and the sum of |terms| for a tolerance), in float64."""
    v = v.astype(np.float64)
    upstream = upstream.astype(np.float64)
    x = v / s
    fwd = np.round(np.clip(x, -qn, qp)) * s
    inside = (x > -qn) & (x < qp)
    grad_v = upstream * inside
    ds = np.where(inside, np.round(x) - x, np.where(x <= -qn, -float(qn), float(qp)))
    terms = upstream * ds
    return fwd, grad_v, terms.sum() * g, np.abs(terms).sum() * g


def unit_values(qn: int, qp: int) -> np.ndarray:
    """v/s values: inside, exactly on the bounds, in the half-step band just outside, far out.

    Inside values use odd hundredths of the range, so none is a .5 tie for round().
    """
    width = qn + qp
    inside = [-qn + f * width for f in (0.03, 0.17, 0.29, 0.41, 0.63, 0.77, 0.91, 0.97)]
    inside += [k for k in (-qn + 1, 0, 1, qp - 1) if -qn < k < qp]  # integers inside: ds = 0
    bounds = [-qn, qp]
    band = [qp + 0.3, qp + 0.49, -qn - 0.3, -qn - 0.49]
    far = [qp + 7.7, 3 * qp + 11.3, -qn - 9.1, -4 * qn - 20.3]
    return np.array(inside + bounds + band + far, dtype=np.float64)


def make_input(qn: int, qp: int, shape, gen: torch.Generator) -> torch.Tensor:
    """A float32 tensor of `shape` whose every value is unit_values(...) * S, each present."""
    units = unit_values(qn, qp)
    n = math.prod(shape)
    assert n >= len(units)
    idx = torch.cat([torch.arange(len(units)), torch.randint(len(units), (n - len(units),), generator=gen)])
    idx = idx[torch.randperm(n, generator=gen)]
    return torch.from_numpy(units[idx.numpy()] * S).float().reshape(shape)


def ready_quantizer(bits, signed, kind, step=S, **kw) -> LsqQuantizer:
    """A quantizer with a chosen step, marked initialized (as if restored), in training mode."""
    q = LsqQuantizer(bits, signed, kind, **kw)
    with torch.no_grad():
        q.step.fill_(step)
        q.initialized.fill_(True)
    return q.train()


def run(q: LsqQuantizer, v: torch.Tensor, upstream: torch.Tensor):
    v = v.clone().requires_grad_(True)
    out = q(v)
    out.backward(upstream)
    return out.detach(), v.grad, q.step.grad


# ------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_output_range_is_the_papers_integer_range(bits, signed):
    qn, qp = paper_range(bits, signed)
    q = ready_quantizer(bits, signed, "activation")
    span = 3 * (qn + qp + 1)
    v = (torch.arange(-span * 10, span * 10 + 1) * 0.1 * S).reshape(1, -1)  # 10 points per step
    with torch.no_grad():
        levels = torch.unique(q(v) / S)
    expected = torch.arange(-qn, qp + 1, dtype=levels.dtype)
    assert torch.equal(levels, expected)


# ------------------------------------------------------------------------------- main sweep
@pytest.mark.parametrize("grad_scale_n", ["per_sample", "numel"])
@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_and_gradients_match_paper(bits, signed, kind, grad_scale_n, seed):
    qn, qp = paper_range(bits, signed)
    shape = WEIGHT_SHAPE if kind == "weight" else ACT_SHAPE
    v = make_input(qn, qp, shape, seed)
    upstream = torch.randn(shape, generator=seed)

    numel = math.prod(shape)
    if kind == "weight" or grad_scale_n == "numel":
        n = numel
    else:
        n = numel // shape[0]  # features per sample
    g = 1.0 / math.sqrt(n * qp)

    q = ready_quantizer(bits, signed, kind, grad_scale_n=grad_scale_n)
    out, grad_v, grad_s = run(q, v, upstream)
    fwd, ref_gv, ref_gs, scale = paper_reference(v.numpy(), S, qn, qp, upstream.numpy(), g)

    assert out.dtype == torch.float32 and out.shape == v.shape
    assert np.array_equal(out.double().numpy(), fwd), "forward must be exact for a power-of-two step"
    assert np.array_equal(grad_v.double().numpy(), ref_gv)
    assert grad_s.shape == q.step.shape
    assert float(grad_s) == pytest.approx(ref_gs, rel=1e-5, abs=1e-6 * scale)

    # the boundary cases specifically: no gradient to v on or outside the bounds
    x = v / S
    outside = (x <= -qn) | (x >= qp)
    assert outside.any() and (~outside).any()
    assert torch.all(grad_v[outside] == 0)
    assert torch.equal(grad_v[~outside], upstream[~outside])


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_grad_scale_false_means_g_is_one(bits, signed, kind, seed):
    qn, qp = paper_range(bits, signed)
    shape = WEIGHT_SHAPE if kind == "weight" else ACT_SHAPE
    v = make_input(qn, qp, shape, seed)
    upstream = torch.randn(shape, generator=seed)
    q = ready_quantizer(bits, signed, kind, grad_scale=False)
    _, _, grad_s = run(q, v, upstream)
    _, _, ref_gs, scale = paper_reference(v.numpy(), S, qn, qp, upstream.numpy(), 1.0)
    assert float(grad_s) == pytest.approx(ref_gs, rel=1e-5, abs=1e-6 * scale)


def test_worked_example_by_hand():
    """2-bit signed (Qn = 2, Qp = 1), s = 0.25, every case written out."""
    x = torch.tensor([-3.0, -2.25, -2.0, -1.25, 0.375, 1.0, 1.25])  # v/s
    #                 far    band   bound inside inside bound band
    v = (x * 0.25).requires_grad_(True)
    q = ready_quantizer(2, True, "weight", step=0.25, grad_scale=False)
    out = q(v)
    out.sum().backward()
    assert out.tolist() == [-0.5, -0.5, -0.5, -0.25, 0.0, 0.25, 0.25]
    assert v.grad.tolist() == [0, 0, 0, 1, 1, 0, 0]
    # -2 -2 -2 + (-1 - -1.25) + (0 - 0.375) + 1 + 1
    assert float(q.step.grad) == pytest.approx(-4.125, abs=1e-7)

    # with gradient scaling, N = 7 weights, Qp = 1
    q = ready_quantizer(2, True, "weight", step=0.25)
    q(x * 0.25).sum().backward()
    assert float(q.step.grad) == pytest.approx(-4.125 / math.sqrt(7), rel=1e-6)


# ------------------------------------------------------------------------------- N for activations
@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (8, False)])
def test_activation_grad_scale_uses_features_per_sample_or_numel(bits, signed):
    qn, qp = paper_range(bits, signed)
    B, C, H, W = 4, 3, 5, 6
    v = torch.full((B, C, H, W), (qp + 5) * S)  # every element clips above: ds = Qp
    expected_sum = B * C * H * W * qp  # sum of ds with an all-ones upstream gradient

    q = ready_quantizer(bits, signed, "activation", grad_scale_n="per_sample")
    _, _, gs = run(q, v, torch.ones_like(v))
    assert float(gs) == pytest.approx(expected_sum / math.sqrt(C * H * W * qp), rel=1e-6)

    q = ready_quantizer(bits, signed, "activation", grad_scale_n="numel")
    _, _, gs = run(q, v, torch.ones_like(v))
    assert float(gs) == pytest.approx(expected_sum / math.sqrt(B * C * H * W * qp), rel=1e-6)

    # per_sample: g does not depend on the batch size, so the gradient grows linearly with B
    grads = []
    for b in (2, 8):
        q = ready_quantizer(bits, signed, "activation")
        vb = torch.full((b, C, H, W), (qp + 5) * S)
        grads.append(float(run(q, vb, torch.ones_like(vb))[2]))
    assert grads[1] == pytest.approx(4 * grads[0], rel=1e-6)


def test_grad_scale_of_an_unbatched_or_empty_activation():
    """QLinear accepts an unbatched input (one sample: N is all of it), and an empty batch must
    not fail: N is still the features per sample."""
    q = ready_quantizer(4, False, "activation")
    assert q.grad_scale_factor(torch.ones(16)) == pytest.approx(1 / math.sqrt(16 * 15))
    assert q.grad_scale_factor(torch.ones(0, 3, 4, 4)) == pytest.approx(1 / math.sqrt(48 * 15))
    fresh = LsqQuantizer(4, False, "activation").train()
    assert fresh(torch.ones(0, 3, 4, 4)).shape == (0, 3, 4, 4) and not fresh.is_initialized()
    fresh(torch.ones(2, 3, 4, 4))  # the first batch with values initializes
    assert fresh.step.item() == pytest.approx(2 / math.sqrt(15))


def test_an_unbatched_conv_input_is_one_sample_of_c_h_w_features():
    """QConv2d takes a (C, H, W) image as conv2d does: N for its activations is C*H*W, not H*W."""
    from lsq.layers import QConv2d

    conv = QConv2d(3, 4, 3, a_bits=4, w_bits=4).train()
    seen = []
    real = conv.a_quant.grad_scale_factor
    conv.a_quant.grad_scale_factor = lambda v: seen.append(real(v)) or seen[-1]
    out = conv(torch.rand(3, 5, 5))
    assert out.shape == (4, 3, 3) and seen == [pytest.approx(1 / math.sqrt(75 * 15))]


def test_step_init_from_non_finite_values_is_a_clear_error_and_zeros_warn():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(4, 4)
        w[1, 2] = bad
        q = LsqQuantizer(4, True, "weight").train()
        with pytest.raises(ValueError, match="cannot initialize the step size of a 4-bit weight quantizer"):
            q(w)
        assert not q.is_initialized()  # a later, finite input still initializes it
    q = LsqQuantizer(4, False, "activation").train()
    with pytest.warns(UserWarning, match="initialized from all-zero values"):
        q(torch.zeros(2, 3))
    assert q.is_initialized()


def test_weight_grad_scale_uses_number_of_weights_for_both_settings():
    qp = 7
    w = torch.full((8, 4, 3, 3), 20 * S)  # all clip above
    for n_mode in ("per_sample", "numel"):
        q = ready_quantizer(4, True, "weight", grad_scale_n=n_mode)
        _, _, gs = run(q, w, torch.ones_like(w))
        assert float(gs) == pytest.approx(w.numel() * qp / math.sqrt(w.numel() * qp), rel=1e-6)


# ------------------------------------------------------------------------------- the half-step band
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_band_just_outside_bounds_follows_paper_not_fused_op(bits):
    """v/s in (Qp, Qp + 0.5) rounds to Qp, but is outside the range on the unrounded value.

    Paper: grad_v = 0 and the step gets Qp (or -Qn below). PyTorch's fused learnable fake-quant
    tests the rounded value and so passes grad_v = 1 and round(x) - x there.
    """
    qn, qp = paper_range(bits, True)
    x = torch.tensor([qp + 0.3, qp + 0.49, -qn - 0.3, -qn - 0.49])
    v = x * S

    q = ready_quantizer(bits, True, "weight", grad_scale=False)
    out, grad_v, grad_s = run(q, v, torch.ones_like(v))
    assert out.tolist() == [qp * S, qp * S, -qn * S, -qn * S]
    assert grad_v.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert float(grad_s) == pytest.approx(2 * qp - 2 * qn, abs=1e-6)

    # each element alone, to see its contribution
    for xi, contribution in zip(x.tolist(), [qp, qp, -qn, -qn]):
        q = ready_quantizer(bits, True, "weight", grad_scale=False)
        _, gv, gs = run(q, torch.tensor([xi * S]), torch.ones(1))
        assert float(gv) == 0.0
        assert float(gs) == pytest.approx(contribution, abs=1e-6)

    # optional: the fused op on the same input (only if it can be called as expected)
    fused = getattr(torch, "_fake_quantize_learnable_per_tensor_affine", None)
    if fused is None:
        return
    vf = v.clone().requires_grad_(True)
    scale = torch.tensor([S], requires_grad=True)
    try:
        yf = fused(vf, scale, torch.tensor([0.0]), -qn, qp, 1.0)
        yf.backward(torch.ones_like(yf))
    except (TypeError, RuntimeError):
        return
    assert torch.equal(yf.detach(), out)  # same forward: the call was set up right
    # ...but a different gradient in the band
    assert not torch.equal(vf.grad, grad_v)
    assert float(scale.grad) != pytest.approx(float(grad_s), abs=1e-3)


# ------------------------------------------------------------------------------- non-power-of-two step
def test_random_values_with_non_power_of_two_step(seed):
    qn, qp = paper_range(4, False)
    s = 0.3
    v = torch.randn(5, 8, 4, 4, generator=seed).abs() * 2
    upstream = torch.randn(v.shape, generator=seed)
    q = ready_quantizer(4, False, "activation", step=s)
    out, grad_v, grad_s = run(q, v, upstream)
    s32 = float(torch.tensor(s))  # the step as stored (float32)
    g = 1 / math.sqrt(8 * 4 * 4 * qp)
    fwd, ref_gv, ref_gs, scale = paper_reference(v.numpy(), s32, qn, qp, upstream.numpy(), g)
    np.testing.assert_allclose(out.numpy(), fwd, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(grad_v.numpy(), ref_gv)
    assert float(grad_s) == pytest.approx(ref_gs, rel=1e-5, abs=1e-6 * scale)


# ------------------------------------------------------------------------------- initialization
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_weight_step_init_on_first_training_forward(bits, signed, seed):
    qn, qp = paper_range(bits, signed)
    w = torch.randn(16, 8, 3, 3, generator=seed)
    if not signed:
        w = w.abs()
    q = LsqQuantizer(bits, signed, "weight").train()
    assert not bool(q.initialized)
    out = q(w)
    s0 = 2 * w.double().abs().mean().item() / math.sqrt(qp)
    assert q.step.item() == pytest.approx(s0, rel=1e-6)
    assert bool(q.initialized)
    # that same forward already used the new step
    s32 = q.step.item()
    ref = np.round(np.clip(w.double().numpy() / s32, -qn, qp)) * s32
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-6, atol=1e-7)


def test_activation_step_init_from_first_batch_only(seed):
    qp = 15
    q = LsqQuantizer(4, False, "activation").train()
    x1 = torch.randn(8, 4, 5, 5, generator=seed).relu()
    q(x1)
    s0 = 2 * x1.double().abs().mean().item() / math.sqrt(qp)
    assert q.step.item() == pytest.approx(s0, rel=1e-6)
    q(10 * torch.randn(8, 4, 5, 5, generator=seed).relu())  # a very different second batch
    assert q.step.item() == pytest.approx(s0, rel=1e-6)


def test_initialized_flag_is_in_state_dict_and_restored_model_never_reinitializes(seed):
    x = torch.randn(8, 4, 5, 5, generator=seed).relu()
    q = LsqQuantizer(4, False, "activation").train()
    q(x)
    with torch.no_grad():
        q.step.fill_(0.123)  # as if learned
    state = q.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    assert "step" in state

    fresh = LsqQuantizer(4, False, "activation")
    fresh.load_state_dict(state)
    fresh.train()
    fresh(5 * torch.randn(8, 4, 5, 5, generator=seed).relu())
    assert fresh.step.item() == pytest.approx(0.123)

    # also after a forward that happened before the load (cached flag must be re-read)
    other = LsqQuantizer(4, False, "activation").eval()
    other(x)
    other.load_state_dict(state)
    other.train()(3 * x)
    assert other.step.item() == pytest.approx(0.123)

    # and the flag is really read from the loaded state: loading an uninitialized state into an
    # initialized quantizer makes the next training forward initialize again
    blank = LsqQuantizer(4, False, "activation").state_dict()
    other.load_state_dict(blank)
    other.train()(x)
    assert other.step.item() == pytest.approx(2 * x.double().mean().item() / math.sqrt(15), rel=1e-6)


def test_eval_mode_does_not_initialize(seed):
    x = torch.randn(8, 4, 5, 5, generator=seed).relu()
    q = LsqQuantizer(4, False, "activation").eval()
    before = q.step.item()
    q(x)
    assert q.step.item() == before
    assert not bool(q.initialized)
    q.train()(x)
    assert bool(q.initialized)
    assert q.step.item() == pytest.approx(2 * x.double().mean().item() / math.sqrt(15), rel=1e-6)


# ------------------------------------------------------------------------------- positive step
@pytest.mark.parametrize("step", [0.0, -0.5])
@pytest.mark.parametrize("signed", [True, False])
def test_zero_or_negative_step_is_clamped_and_still_gets_a_gradient(step, signed):
    qn, qp = paper_range(4, signed)
    eps = quantizer_module.STEP_EPS
    assert 0 < eps < 1e-3
    v = torch.tensor([[0.5, 1.5, 2.0, 0.01]])
    if signed:
        v = torch.cat([v, -v], 1)
    q = ready_quantizer(4, signed, "activation", step=step)
    vv = v.clone().requires_grad_(True)
    out = q(vv)
    loss = ((out - v) ** 2).sum()
    loss.backward()
    assert torch.isfinite(out).all()
    # s is used as eps: every |v/eps| is far beyond the range
    expected = np.round(np.clip(v.double().numpy() / eps, -qn, qp)) * eps
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5)
    assert q.step.grad is not None and torch.isfinite(q.step.grad)
    assert float(q.step.grad) != 0.0
    # gradient descent pushes the step up, back towards positive values
    assert float(q.step.grad) < 0
    assert torch.isfinite(vv.grad).all()


# ------------------------------------------------------------------------------- misc
def test_bits_none_is_identity():
    q = LsqQuantizer(None, True, "weight")
    assert q.step is None
    assert list(q.parameters()) == []
    v = torch.randn(3, 4, requires_grad=True)
    out = q(v)
    assert torch.equal(out, v)
    out.sum().backward()
    assert torch.equal(v.grad, torch.ones_like(v))


def test_bfloat16_in_bfloat16_out(seed):
    qn, qp = paper_range(4, True)
    v = (torch.randn(4, 3, 5, 5, generator=seed) * 2).bfloat16().requires_grad_(True)
    q = ready_quantizer(4, True, "activation")
    out = q(v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16
    assert q.step.grad is not None and torch.isfinite(q.step.grad)
    ref = np.round(np.clip(v.detach().double().numpy() / S, -qn, qp)) * S
    np.testing.assert_array_equal(out.detach().double().numpy(), ref)
    x = v.detach().double() / S
    inside = ((x > -qn) & (x < qp)).numpy()
    np.testing.assert_array_equal(v.grad.double().numpy(), inside.astype(np.float64))


def test_step_is_the_only_parameter():
    q = LsqQuantizer(4, True, "weight")
    params = dict(q.named_parameters())
    assert list(params) == ["step"]
    assert isinstance(q.step, torch.nn.Parameter) and q.step.numel() == 1


# ------------------------------------------------------------------------------- torch.compile
def test_forward_equations_mutate_nothing_and_return_a_new_tensor():
    """torch.compile traces the forward's equations inside LsqFunction.forward. In torch 2.11
    an in-place op there, or a `.to()` that hands back the tensor it was given, cut the
    backward off: zero gradients for every float32 weight and its step, so a compiled model
    silently stopped learning. Whatever torch is installed, the equations avoid both."""
    from torch.overrides import TorchFunctionMode

    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            calls.append((getattr(func, "__name__", str(func)), args, out))
            return out

    qn, qp = paper_range(4, True)
    for dtype in (torch.float32, torch.bfloat16):
        v, s = torch.randn(4, 6, 3, 3).to(dtype), torch.tensor(S)
        calls.clear()
        with Record():
            out = quantizer_module.eager_forward(v, s, qn, qp)
        in_place = [
            n for n, _, _ in calls if (n.endswith("_") and not n.startswith("__")) or n.startswith("__i")
        ]
        assert not in_place, in_place
        # an op's result may be its own argument only where that argument is the input v
        passed_through = [
            n for n, a, o in calls if isinstance(o, torch.Tensor) and any(o is x for x in a) and o is not v
        ]
        assert not passed_through, passed_through
        assert out.dtype == dtype and out is not v


@pytest.mark.parametrize("opaque", [False, True], ids=["traced backward", "opaque backward op"])
@pytest.mark.parametrize("kind,signed", [("weight", True), ("activation", False)])
def test_compiled_quantizer_follows_the_papers_gradients(kind, signed, opaque, seed, monkeypatch):
    """A float32 weight and an activation through torch.compile: forward and both gradients are
    the paper's (the check that failed on torch 2.11 before the forward above was rewritten),
    with the backward traced and as the opaque op lsq::backward (compile=reduce-overhead on
    CUDA)."""
    qn, qp = paper_range(4, signed)
    shape = WEIGHT_SHAPE if kind == "weight" else ACT_SHAPE
    v = make_input(qn, qp, shape, seed)
    upstream = torch.randn(shape, generator=seed)
    q = ready_quantizer(4, signed, kind)
    q.is_initialized()
    q.opaque_backward = opaque
    compiled = torch.compile(q, dynamic=False, fullgraph=True)
    vv = v.clone().requires_grad_(True)
    out = compiled(vv)
    out.backward(upstream)
    n = math.prod(shape) if kind == "weight" else math.prod(shape[1:])
    fwd, ref_gv, ref_gs, scale = paper_reference(
        v.numpy(), S, qn, qp, upstream.numpy(), 1.0 / math.sqrt(n * qp)
    )
    assert np.array_equal(out.detach().double().numpy(), fwd)
    assert np.array_equal(vv.grad.double().numpy(), ref_gv)
    assert float(q.step.grad) == pytest.approx(ref_gs, rel=1e-5, abs=1e-6 * scale)
    fast = quantizer_module.fast_path(v)  # (outside the compiled code: the CPU kernels)
    if (
        fast is not None
    ):  # the compiled backward runs the op, whose body calls them, or traced code that does not
        calls = []
        real = fast.backward
        monkeypatch.setattr(fast, "backward", lambda *a: calls.append(1) or real(*a))
        compiled(v.clone().requires_grad_(True)).backward(upstream)
        assert bool(calls) == opaque


def test_the_opaque_backward_op_is_a_well_formed_custom_op(seed):
    """lsq::backward, which compiled CUDA-graph training calls, passes torch.library.opcheck (its
    schema, its fake tensors' shapes and strides, no aliasing), for a contiguous and a
    channels_last float32 input and a bfloat16 one, and gives the paper's gradients."""
    qn, qp = paper_range(4, False)
    for dtype, layout in [
        (torch.float32, torch.contiguous_format),
        (torch.float32, torch.channels_last),
        (torch.bfloat16, torch.contiguous_format),
    ]:
        v = make_input(qn, qp, ACT_SHAPE, seed).to(dtype).contiguous(memory_format=layout)
        up = torch.randn(ACT_SHAPE, generator=seed).to(dtype)
        args = (v, torch.tensor(S), up, qn, qp, 0.25)
        torch.library.opcheck(torch.ops.lsq.backward.default, args)
        grad_v, grad_step = torch.ops.lsq.backward(*args)
        assert grad_v.dtype == dtype and grad_v.stride() == v.stride() and grad_step.shape == ()
        _, ref_gv, ref_gs, scale = paper_reference(v.float().numpy(), S, qn, qp, up.float().numpy(), 0.25)
        assert np.array_equal(grad_v.double().numpy(), ref_gv)  # grad or 0: exact in either dtype
        assert float(grad_step) == pytest.approx(ref_gs, rel=1e-5, abs=1e-6 * scale)


def test_only_cuda_graph_training_runs_the_opaque_backward():
    """use_opaque_backward (the trainer, bench/train_step.py) turns the op on for
    compile=reduce-overhead on CUDA alone: without CUDA graphs the traced backward is faster."""
    from lsq.models import build_model
    from lsq.policy import BitPolicy, quantize_model, quantizers
    from lsq.train import use_opaque_backward

    model = quantize_model(build_model("resnet20", 10), BitPolicy(4, 4))
    for mode, device, on in [
        ("reduce-overhead", "cuda", True),
        ("default", "cuda", False),
        ("reduce-overhead", "cpu", False),
        ("none", "cuda", False),
    ]:
        use_opaque_backward(model, mode, torch.device(device))
        assert {q.opaque_backward for q in quantizers(model)} == {on}, (mode, device)
