"""QConv2d / QLinear: what their op saves for backward is 1-byte integer codes, and backward
sees exactly the tensors the forward used.

The expected gradients are built here from the paper's equations around a plain conv / linear:
for v_hat = round(clip(v/s, -Qn, Qp)) * s and w_hat likewise,

    dL/dv = dL/dv_hat * [-Qn < v/s < Qp],   dL/dw = dL/dw_hat * [-Qn < w/s_w < Qp]

with dL/dv_hat and dL/dw_hat from autograd through an unquantized conv on v_hat and w_hat.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from paper_formulas import paper_range

from lsq import layers as L
from lsq import quantizer as Q
from lsq.layers import ImageConv, QConv2d, QLinear, from_codes, to_codes

S_ACT, S_W = 0.125, 0.0625  # powers of two: v / s and k * s are exact in float32


def quantized(v: torch.Tensor, s: float, qn: int, qp: int):
    """(v_hat, inside mask) by the paper's formula, in float64, returned as float32."""
    x = v.double() / s
    return (x.clamp(-qn, qp).round() * s).float(), ((x > -qn) & (x < qp)).float()


def make(kind: str, bits: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv":
        layer = QConv2d(6, 5, 3, padding=1, bias=True, w_bits=bits, a_bits=bits)
        x = torch.rand(4, 6, 7, 7, generator=gen) * 2.5  # ReLU-like: unsigned activations
    else:
        layer = QLinear(12, 5, w_bits=bits, a_bits=bits)
        x = torch.rand(8, 12, generator=gen) * 2.5
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.3)
        for q, s in ((layer.a_quant, S_ACT), (layer.w_quant, S_W)):
            q.step.fill_(s)
            q.initialized.fill_(True)
    return layer, x


def op(kind, x, w, b):
    return F.conv2d(x, w, b, padding=1) if kind == "conv" else F.linear(x, w, b)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gradients_through_the_layer_follow_the_paper(kind, bits):
    layer, x = make(kind, bits, seed=bits)
    x.requires_grad_(True)
    up = torch.randn(op(kind, x, layer.weight, layer.bias).shape, generator=torch.Generator().manual_seed(9))
    layer(x).backward(up)

    aqn, aqp = paper_range(bits, signed=False)
    wqn, wqp = paper_range(bits, signed=True)
    v_hat, v_in = quantized(x.detach(), S_ACT, aqn, aqp)
    w_hat, w_in = quantized(layer.weight.detach(), S_W, wqn, wqp)
    v_hat.requires_grad_(True)
    w_hat.requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    op(kind, v_hat, w_hat, b).backward(up)

    assert torch.equal(x.grad, v_hat.grad * v_in)
    assert torch.equal(layer.weight.grad, w_hat.grad * w_in)
    assert torch.equal(layer.bias.grad, b.grad)


def saved_bytes(fn) -> tuple[int, list]:
    """Bytes autograd keeps for backward while fn() runs (each storage once), and what was saved."""
    storages, saved = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), saved, out


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_op_saves_one_byte_per_quantized_value_not_a_float_copy(kind):
    layer, x = make(kind, 4, seed=0)
    x.requires_grad_(True)
    fp32 = torch.nn.Conv2d(6, 5, 3, padding=1) if kind == "conv" else torch.nn.Linear(12, 5)

    plain, _, _ = saved_bytes(lambda: fp32(x))
    ours, saved, out = saved_bytes(lambda: layer(x))
    # FP32 keeps x and w. QAT adds the codes of v_hat and w_hat (1 byte each) and each
    # quantizer's step s (4 bytes): the quantizers' own saved inputs are x and w themselves
    assert ours - plain == x.numel() + layer.weight.numel() + 2 * 4
    assert (torch.uint8, tuple(x.shape)) in saved
    w_saved = layer.weight.shape if kind == "conv" else layer.weight.t().shape  # linear saves w_hat.t()
    assert (torch.int8, tuple(w_saved)) in saved
    out.sum().backward()  # and the caller's hooks unpack what they packed: backward still runs
    assert x.grad is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "eager"])
def test_codes_are_exactly_the_integers_and_rebuild_the_same_bits(bits, signed, fast, monkeypatch):
    monkeypatch.setattr(Q, "FAST_PATH", fast)
    qn, qp = paper_range(bits, signed)
    k = torch.arange(-qn, qp + 1).reshape(2, -1)
    for s in (0.0371, 1.7, 1e-8, 3.0e3):  # steps that are not powers of two, tiny and large
        s_t = torch.tensor(s, dtype=torch.float32)
        v_hat = k.float() * s_t  # as the quantizer's forward makes it: k * s in float32
        for v, kk in ((v_hat, k), (v_hat.t(), k.t())):  # and a transposed view (linear saves w_hat.t())
            codes = to_codes(v, s_t, signed)
            assert codes.dtype == (torch.int8 if signed else torch.uint8)
            assert np.array_equal(codes.long().numpy(), kk.numpy())
            assert torch.equal(from_codes(codes, s_t), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("signed", [True, False])
def test_bfloat16_codes_are_exactly_the_integers_and_rebuild_the_same_bits(bits, signed):
    """Under CUDA's bf16 autocast the activations' v_hat is bf16(k * s): 8 significant bits, so
    v_hat / s is k within |k| * 2^-8, which rounds back to k for every range up to 7 bits."""
    qn, qp = paper_range(bits, signed)
    k = torch.arange(-qn, qp + 1)
    gen = torch.Generator().manual_seed(bits)
    steps = torch.cat(
        [
            torch.tensor([1e-8, 0.0371, 1.7, 3.0e3]),
            torch.exp(torch.empty(300).uniform_(-18.0, 8.0, generator=gen)),
        ]
    )
    for s_t in steps.float():
        v_hat = (k.float() * s_t).to(torch.bfloat16)  # the forward's float32 product, cast as it casts
        codes = to_codes(v_hat, s_t, signed)
        assert np.array_equal(codes.long().numpy(), k.numpy()), f"s = {float(s_t)!r}"
        rebuilt = from_codes(codes, s_t, torch.bfloat16)
        assert rebuilt.dtype == torch.bfloat16 and torch.equal(
            rebuilt.view(torch.int16), v_hat.view(torch.int16)
        )


def grads_of(layer, x, up):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().backward(up)
    return [x.grad, layer.weight.grad, layer.bias.grad, layer.a_quant.step.grad, layer.w_quant.step.grad]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_bfloat16_activations_are_saved_as_codes_with_the_same_gradients(kind, monkeypatch):
    """bf16 activations (autocast) of a 4-bit layer are saved as 1-byte codes instead of 2-byte
    copies, and every gradient is bit for bit what it is when the bf16 copy is kept."""
    layer, x = make(kind, 4, seed=4)
    x = x.bfloat16().requires_grad_(True)  # as the previous layer's output is under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, saved, out = saved_bytes(lambda: layer(x))
    assert (torch.uint8, tuple(x.shape)) in saved
    assert (torch.bfloat16, tuple(x.shape)) in saved  # x itself, which the quantizer needs: no copy
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))

    ours = grads_of(layer, x, up)
    monkeypatch.setattr(L, "compactable", lambda q, out: False)  # keep the bf16 copy, as before
    plain = grads_of(layer, x, up)
    for g, p in zip(ours, plain):
        assert g is not None and g.dtype == p.dtype and torch.equal(g, p)


def test_eight_bit_bfloat16_outputs_are_saved_as_they_are():
    """An 8-bit range's bf16 v_hat cannot give back every k exactly (k up to 255): no codes."""
    layer, x = make("linear", 8, seed=2)
    layer, x = layer.bfloat16(), x.bfloat16().requires_grad_(True)
    _, saved, out = saved_bytes(lambda: layer(x))
    assert not any(dtype in (torch.int8, torch.uint8) for dtype, _ in saved)
    out.float().sum().backward()
    assert x.grad is not None


def test_no_codes_without_autograd():
    layer, x = make("conv", 4, seed=1)
    with torch.no_grad():
        _, saved, _ = saved_bytes(lambda: layer(x))
    assert saved == []


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_float_quantized_input_is_freed_before_backward(kind):
    """The point of the codes: between forward and backward, no float copy of v_hat stays alive."""
    import gc
    import weakref

    layer, x = make(kind, 4, seed=3)
    x.requires_grad_(True)
    refs = []
    layer.a_quant.register_forward_hook(lambda mod, inp, out: refs.append(weakref.ref(out)))
    out = layer(x)
    gc.collect()
    assert refs and refs[0]() is None, "the float v_hat is still referenced after forward"
    out.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- the image's conv
# ImageConv runs on CUDA by default; these tests check it on the CPU (same code, other device).
@pytest.fixture
def image_conv_on_cpu(monkeypatch):
    monkeypatch.setattr(QConv2d, "image_conv_devices", ("cpu", "cuda"))


def image_layer(bits, signed, stride, padding, bias, seed):
    """A first layer as quantize_model makes it: its input is the image, which needs no gradient."""
    gen = torch.Generator().manual_seed(seed)
    layer = QConv2d(
        3, 8, 3, stride=stride, padding=padding, bias=bias, w_bits=bits, a_bits=bits, a_signed=signed
    )
    x = torch.randn(4, 3, 11, 11, generator=gen) * 1.3  # not a multiple of the stride: edges matter
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.3)
        layer.a_quant.step.fill_(0.0371)  # not a power of two: x/s is inexact, as in training
        layer.w_quant.step.fill_(S_W)
        layer.a_quant.initialized.fill_(True)
        layer.w_quant.initialized.fill_(True)
    return layer, x


def paper_image_grads(layer, x, up, bits, signed, dtype=torch.float32):
    """(dL/ds_x, dL/dw, dL/db) by the paper's formulas in float64, around a plain conv that runs
    on x_hat and w_hat as a `dtype` conv sees them: dL/dx_hat from autograd through that conv,
    then eq. 3 summed against it, times g = 1 / sqrt(C*H*W * Qp). `bits`: the layer's weight and
    input bits (image_layer gives both the same), `signed`: its input's; Qn and Qp come from the
    paper's definition, not from the layer's quantizers."""
    aqn, aqp = paper_range(bits, signed)
    wqn, wqp = paper_range(bits, signed=True)
    s, s_w = layer.a_quant.step.item(), layer.w_quant.step.item()
    v = x.double() / s
    x_hat = (v.clamp(-aqn, aqp).round() * s).to(dtype).double().requires_grad_(True)
    w_hat, w_in = quantized(layer.weight.detach(), s_w, wqn, wqp)
    w_hat = w_hat.to(dtype).double().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().to(dtype).double().requires_grad_(True)
    F.conv2d(x_hat, w_hat, b, layer.stride, layer.padding).backward(up.double())
    inside = (v > -aqn) & (v < aqp)
    ds = torch.where(inside, v.round() - v, torch.where(v <= -aqn, -aqn, aqp).double())
    g = 1 / (x[0].numel() * aqp) ** 0.5
    return g * (x_hat.grad * ds).sum(), w_hat.grad * w_in, None if b is None else b.grad


@pytest.mark.usefixtures("image_conv_on_cpu")
@pytest.mark.parametrize("bits,signed", [(8, True), (4, False), (2, True)])
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 1, False), (2, 0, True)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_image_conv_step_gradient_follows_the_paper_without_the_input_gradient(
    bits, signed, stride, padding, bias, channels_last, monkeypatch
):
    """A first layer's input needs no gradient, so its quantizer's step gradient is taken through
    the conv's weight gradient (lsq.layers.ImageConv), never its input gradient. It must still
    equal eq. 3 summed against dL/dx_hat; the weight and bias gradients are the conv's own."""
    layer, x = image_layer(bits, signed, stride, padding, bias, seed=bits + stride)
    if channels_last:
        layer, x = (
            layer.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    input_grads = []
    real = torch.ops.aten.convolution_backward

    def spy(grad_y, inp, w, bias_sizes, *rest):  # records which gradients each conv backward computes
        input_grads.append(rest[-1][0])
        return real(grad_y, inp, w, bias_sizes, *rest)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    out = layer(x)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(up)
    step_grad, w_grad, b_grad = paper_image_grads(layer, x, up, bits, signed)

    assert input_grads == [False], "the image conv computed an input gradient, or ran no backward of its own"
    assert torch.allclose(layer.a_quant.step.grad.double(), step_grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(
        layer.weight.grad.double(), w_grad, rtol=1e-5, atol=1e-6 * float(w_grad.abs().max())
    )
    assert bias is (layer.bias is not None)
    assert not bias or torch.allclose(layer.bias.grad.double(), b_grad, atol=1e-6 * float(b_grad.abs().max()))
    assert layer.weight.grad.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


@pytest.mark.usefixtures("image_conv_on_cpu")
def test_image_conv_under_bf16_autocast_takes_the_step_sum_in_float32():
    """Under bf16 autocast the conv runs in bf16, and a bf16 weight gradient would round each
    entry before the dot product with w_hat: 1-4 % off. The step's sum must keep float32's
    accuracy (to the float64 formula on the same bf16 x_hat and w_hat), and the weight gradient
    be the bf16 conv's own."""
    for seed in range(3):
        layer, x = image_layer(8, True, 2, 1, True, seed=seed)
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 1.3
        layer.w_quant.step.data.fill_(0.0137)  # k * s_w then has more than bf16's 8 significant bits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16()
        out.backward(up)
        step_grad, w_grad, _ = paper_image_grads(layer, x, up, 8, True, torch.bfloat16)
        assert torch.allclose(layer.a_quant.step.grad.double(), step_grad, rtol=1e-4), seed
        assert torch.allclose(
            layer.weight.grad.double(), w_grad, rtol=1e-2, atol=1e-2 * float(w_grad.abs().max())
        )


@pytest.mark.usefixtures("image_conv_on_cpu")
def test_image_conv_with_a_step_below_eps_or_a_frozen_weight_follows_the_paper():
    """The step is clamped to STEP_EPS as everywhere (its gradient passes the clamp), and a
    frozen weight and bias still leave the step its gradient."""
    for step, frozen in ((-1.0, False), (1e-9, False), (0.0371, True)):
        layer, x = image_layer(4, True, 2, 1, True, seed=3)
        layer.a_quant.step.data.fill_(step)
        x = x * 1e-7  # values on the scale of STEP_EPS, so that not every one clips
        layer.weight.requires_grad_(not frozen)
        layer.bias.requires_grad_(not frozen)
        out = layer(x)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        out.backward(up)
        layer.a_quant.step.data.clamp_(min=Q.STEP_EPS)  # the formula's s
        step_grad, _, _ = paper_image_grads(layer, x, up, 4, True)
        assert torch.allclose(layer.a_quant.step.grad.double(), step_grad, rtol=1e-5), (step, frozen)
        assert (layer.weight.grad is None) == frozen


@pytest.mark.usefixtures("image_conv_on_cpu")
def test_image_conv_initializes_the_input_step_on_the_first_training_batch():
    layer = QConv2d(3, 8, 3, padding=1, w_bits=8, a_bits=8, a_signed=True)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    assert bool(layer.a_quant.initialized)
    assert layer.a_quant.step.item() == pytest.approx(2 * x.abs().mean().item() / 127**0.5, rel=1e-6)
    assert layer.a_quant.step.grad is not None


@pytest.mark.parametrize(
    "options",
    [dict(groups=3), dict(padding="same"), dict(padding_mode="reflect"), dict(dilation=2), dict()],
    ids=["groups", "same", "reflect", "dilation", "plain"],
)
def test_every_conv_gives_the_same_outputs_and_gradients_with_or_without_the_image_conv(options):
    """Where ImageConv cannot run the conv as it is (groups, padding given as a word, another
    padding mode) the layer keeps the quantizer-then-conv path; a dilated conv runs it. Either
    way, the outputs and gradients are those of the plain path."""
    results = []
    for image_conv in (True, False):
        torch.manual_seed(0)
        layer = QConv2d(3, 6, 3, **{"padding": 1, **options}, w_bits=4, a_bits=4, a_signed=True)
        layer.image_conv_devices = ("cpu",) if image_conv else ()
        x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
        out = layer(x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        results.append([out.detach(), layer.a_quant.step.grad, layer.w_quant.step.grad, layer.weight.grad])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())), options


def test_an_image_conv_is_used_only_where_the_input_needs_no_gradient(monkeypatch):
    """The same layer on an input that needs a gradient (any layer but the first), on a device
    not in `image_conv_devices` (by default the CPU), or with a hook on its input quantizer
    (which must run), runs its quantizer and conv on their own, and gives the same gradients."""
    used = []
    real = ImageConv.forward
    monkeypatch.setattr(ImageConv, "forward", staticmethod(lambda *a: used.append(1) or real(*a)))
    results = []
    for image_conv, x_grad, hook in (
        (True, False, False),
        (False, False, False),
        (None, False, False),
        (True, True, False),
        (True, False, True),
    ):
        layer, x = image_layer(4, False, 2, 1, True, seed=0)
        if image_conv is not None:  # None: the default
            layer.image_conv_devices = ("cpu",) if image_conv else ()
        x.requires_grad_(x_grad)
        used.clear()
        calls = []
        if hook:
            layer.a_quant.register_forward_hook(lambda *a: calls.append(1))
        out = layer(x)
        out.backward(torch.ones_like(out))
        assert bool(used) == (image_conv is True and not x_grad and not hook)
        assert calls == ([1] if hook else [])
        results.append([layer.a_quant.step.grad, layer.w_quant.step.grad, layer.weight.grad, layer.bias.grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.usefixtures("image_conv_on_cpu")
def test_compiled_image_conv_follows_the_paper(monkeypatch):
    """The image conv traced by torch.compile (as the trainer's compile modes trace it): one
    graph, and the paper's gradients. (aot_eager: the traced forward and backward graphs without
    inductor's code generation, which the compiled trainer's test in test_train.py runs.)"""
    layer, x = image_layer(8, True, 2, 1, True, seed=5)
    for q in (layer.w_quant, layer.a_quant):
        q.is_initialized()  # reads the flag outside the compiled code, as the trainer's first eager step does
    traced = []
    real = ImageConv.forward
    monkeypatch.setattr(ImageConv, "forward", staticmethod(lambda *a: traced.append(1) or real(*a)))
    compiled = torch.compile(layer, backend="aot_eager", dynamic=False, fullgraph=True)
    out = compiled(x)
    assert traced, "the compiled layer did not go through ImageConv"
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(up)
    step_grad, w_grad, b_grad = paper_image_grads(layer, x, up, 8, True)
    assert torch.allclose(layer.a_quant.step.grad.double(), step_grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(
        layer.weight.grad.double(), w_grad, rtol=1e-5, atol=1e-6 * float(w_grad.abs().max())
    )
    assert torch.allclose(layer.bias.grad.double(), b_grad, atol=1e-6 * float(b_grad.abs().max()))
