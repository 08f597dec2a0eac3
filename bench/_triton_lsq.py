"""A self-check of the quantizer's CUDA fast path (lsq/kernels_cuda.py: the paper's forward and
backward, and the saved-tensor codes, as Triton kernels) against the paper's formulas.

    python bench/_triton_lsq.py      # on a GPU; on a CPU in Triton's interpreter (slow, small)

Forward and grad_v element for element against float64 formulas, the step gradient to 1e-5;
signed and unsigned ranges, float32 and bfloat16, channels_last, values on and around every
clip bound and rounding tie, NaN and inf; the codes of k * s are exactly k, and decode gives
back k * s bit for bit; LsqFunction as the project runs it (these kernels) against its eager
path; and the first layer's step gradient (lsq.layers.ImageConv) against the formula.
tests/test_quantizer_fastpath.py runs it in the interpreter.
"""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import _common  # noqa: E402, F401  (puts the repository on sys.path)

from lsq import quantizer as Q  # noqa: E402
from lsq.kernels_cuda import TritonKernels  # noqa: E402


def self_check() -> int:
    """Forward and grad_v element for element against the paper's formulas (float64), the step
    gradient to 1e-5, for signed and unsigned ranges, float32 and bfloat16, a channels_last
    tensor, values on and around every clip bound and rounding tie, NaN and inf."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k = TritonKernels()
    failures = 0
    for bits, signed, dtype, channels_last in [
        (4, False, torch.float32, False),
        (4, True, torch.float32, True),
        (2, True, torch.bfloat16, False),
        (8, False, torch.float32, False),
    ]:
        qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        gen = torch.Generator().manual_seed(bits)
        s = 0.25  # a power of two: v / s is exact, so every element must match
        units = torch.cat(
            [
                torch.arange(-qn - 3, qp + 3.01, 0.5),
                torch.randn(3000, generator=gen) * (qn + qp),
                torch.tensor([float("nan"), float("inf"), -float("inf")]),
            ]
        )
        per_image = 3 * 16 * 16
        v = torch.cat([units * s, torch.zeros(-len(units) % per_image)]).reshape(-1, 3, 16, 16)
        v = v.to(dtype).to(device)
        if channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(v.shape, generator=gen).to(device)
        st = torch.tensor(s, device=device)
        out = k.forward(v, st, qn, qp)
        grad_v, grad_s = k.backward(v, st, grad.to(dtype), qn, qp, 1.0)
        x = v.double().cpu() / s
        ref_out = (torch.round(torch.clamp(x, -qn, qp)) * s).to(dtype).double()
        inside = ~((x <= -qn) | (x >= qp))
        g = grad.to(dtype).double().cpu()
        ref_gv = (g * inside).to(dtype).double()
        ds = torch.where(inside, x.round() - x, torch.where(x <= -qn, -float(qn), float(qp)))
        finite = torch.isfinite(x)
        bad = int(
            (~torch.eq(out.double().cpu(), ref_out) & ~(out.double().cpu().isnan() & ref_out.isnan())).sum()
        )
        bad += int(
            (
                ~torch.eq(grad_v.double().cpu(), ref_gv) & ~(grad_v.double().cpu().isnan() & ref_gv.isnan())
            ).sum()
        )
        # the step gradient over the finite elements only (NaN makes the whole sum NaN, as eager)
        _, gs_finite = k.backward(
            torch.where(torch.isfinite(v), v, torch.zeros_like(v)), st, grad.to(dtype), qn, qp, 1.0
        )
        ref_finite = float((g * torch.where(finite, ds, torch.zeros_like(ds))).sum())
        rel = abs(float(gs_finite) - ref_finite) / max(abs(ref_finite), 1e-6)
        nan_ok = bool(torch.isnan(grad_s))  # v holds a NaN: the step gradient is NaN, as in eager
        ok = bad == 0 and rel < 1e-5 and nan_ok
        failures += not ok
        print(
            f"{bits} bits {'signed' if signed else 'unsigned'} {str(dtype)[6:]}{' channels_last' if channels_last else ''} "
            f"on {device}: {bad} elements differ from the paper, step gradient rel. err {rel:.1e}, "
            f"NaN step gradient with a NaN input: {nan_ok} -> {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    failures += check_step(k, device) + check_codes(k, device) + check_lsq_function(k, device)
    failures += check_image_conv(device)
    if device == "cuda":  # in the interpreter this would take minutes, and its bf16 cast is not the GPU's
        failures += check_model(k, device)
    return 1 if failures else 0


def check_step(k: TritonKernels, device: str) -> int:
    """The kernels take the raw step parameter: s = step.clamp_min(STEP_EPS) on the device (a
    zero or negative step quantizes with s = STEP_EPS, a NaN step gives NaN), and the step
    gradient comes back as g * sum(eq. 3) in the step's shape."""
    failures = 0
    gen = torch.Generator().manual_seed(2)
    v = (torch.randn(2, 3, 8, 8, generator=gen) * 1e-7).to(device)  # a few steps of STEP_EPS
    grad = torch.randn(v.shape, generator=gen).to(device)
    qn, qp, g = 8, 7, 0.03
    for value in (0.0, -0.5, 1e-9, 0.02, float("nan")):
        step = torch.tensor(value, device=device)
        s = step.clamp_min(Q.STEP_EPS)
        out = k.forward(v, step, qn, qp)
        grad_v, grad_step = k.backward(v, step, grad, qn, qp, g)
        ref_out = Q.eager_forward(v, s, qn, qp)
        ref_gv, ref_gs = Q.eager_backward(v, s, grad, qn, qp)
        ref_gs = float(ref_gs) * g
        same = torch.equal(out, ref_out) and torch.equal(grad_v, ref_gv)
        if value != value:  # NaN
            same = bool(out.isnan().all()) and bool(grad_step.isnan())
            rel = 0.0
        else:
            rel = abs(float(grad_step) - ref_gs) / max(abs(ref_gs), 1e-6)
        ok = same and rel < 1e-5 and grad_step.shape == step.shape
        failures += not ok
        print(
            f"step {value:g} on {device}: forward and grad_v as with step.clamp_min(STEP_EPS) {same}, "
            f"g * step gradient rel. err {rel:.1e}, shape {tuple(grad_step.shape)} -> {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    return failures


def check_codes(k: TritonKernels, device: str) -> int:
    """Every integer k of the ranges that are saved as codes (float32: up to 8 bits; bfloat16: up
    to 7), times step sizes that are not powers of two: encode gives k, decode gives k * s back."""
    failures = 0
    gen = torch.Generator().manual_seed(0)
    steps = (torch.rand(20, generator=gen) * 0.2 + 1e-3).tolist()
    for signed, dtype, bits in [
        (True, torch.float32, 8),
        (False, torch.float32, 8),
        (True, torch.bfloat16, 7),
        (False, torch.bfloat16, 7),
    ]:
        qn, qp = Q.qrange(bits, signed)
        ints = torch.arange(-qn, qp + 1, dtype=torch.float32).repeat(3)
        bad = 0
        for s in steps:
            st = torch.tensor(s, device=device)
            v_hat = (ints.to(device) * st).to(dtype)  # the forward's output: k * s, cast
            codes = k.encode(v_hat, st, signed)
            back = k.decode(codes, st).to(dtype)  # what lsq.layers.from_codes does with it
            bad += int((codes.cpu().float() != ints).sum()) + int((~torch.eq(back, v_hat)).sum())
            bad += codes.dtype != (torch.int8 if signed else torch.uint8)
        ok = bad == 0
        failures += not ok
        print(
            f"codes {bits} bits {'signed' if signed else 'unsigned'} {str(dtype)[6:]} on {device}, "
            f"{len(steps)} step sizes: {bad} codes or rebuilt values wrong -> {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    return failures


def check_lsq_function(k: TritonKernels, device: str) -> int:
    """LsqFunction with these kernels as its fast path against its eager path: the forward and
    grad_v bit for bit, the step gradient to 1e-5 (a sum in another order)."""
    failures = 0
    saved = dict(Q.KERNELS)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
                # the GPU's float32 -> bfloat16 store rounds to nearest even, as torch does; the
                # interpreter truncates, so it cannot stand in for the GPU here
                print(
                    "LsqFunction bfloat16: not checked in Triton's interpreter, whose float32-to-bfloat16 "
                    "cast truncates (a GPU's rounds to nearest even, as torch's does)",
                    flush=True,
                )
                continue
            gen = torch.Generator().manual_seed(1)
            v = (torch.randn(4, 8, 12, 12, generator=gen) * 2).to(dtype).to(device)
            up = torch.randn(v.shape, generator=gen).to(dtype).to(device)
            results = []
            for fast in (True, False):
                Q.KERNELS[v.device.type] = k  # the kernels under test as the fast path
                Q.FAST_PATH = fast
                vv = v.clone().requires_grad_(True)
                step = torch.tensor(0.137, device=device, requires_grad=True)
                out = Q.LsqFunction.apply(vv, step, 8, 7, 0.01)
                out.backward(up)
                results.append((out.detach(), vv.grad, step.grad))
            (o1, g1, s1), (o2, g2, s2) = results
            rel = abs(float(s1) - float(s2)) / max(abs(float(s2)), 1e-6)
            ok = torch.equal(o1, o2) and torch.equal(g1, g2) and rel < 1e-5
            failures += not ok
            print(
                f"LsqFunction {str(dtype)[6:]} on {device}, fast path vs eager path: forward equal "
                f"{torch.equal(o1, o2)}, grad_v equal {torch.equal(g1, g2)}, step gradient rel. err {rel:.1e} "
                f"-> {'ok' if ok else 'FAILED'}",
                flush=True,
            )
    finally:
        Q.FAST_PATH = True
        Q.KERNELS.clear()
        Q.KERNELS.update(saved)
    return failures


def check_model(k: TritonKernels, device: str) -> int:
    """One training step of a W4A4 resnet20 as the trainer runs it on CUDA (bf16 autocast,
    channels_last, activations saved as codes), these kernels against the eager quantizer: the
    loss and every weight gradient bit for bit (deterministic cuDNN), step sizes to 1e-4."""
    from lsq.models import build_model
    from lsq.policy import BitPolicy, quantize_model

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet20", 10), BitPolicy(w_bits=4, a_bits=4)).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device)
    model(x)  # initializes the step sizes
    saved = dict(Q.KERNELS)
    results = []
    try:
        for fast in (True, False):
            Q.KERNELS[device], Q.FAST_PATH = k, fast
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    finally:
        Q.FAST_PATH = True
        Q.KERNELS.clear()
        Q.KERNELS.update(saved)
    (l1, g1), (l2, g2) = results
    weights = [n for n in g2 if not n.endswith(".step")]
    differ = [n for n in weights if not torch.equal(g1[n], g2[n])]
    step_err = max(
        float((g1[n] - g2[n]).abs().max() / g2[n].abs().max().clamp_min(1e-12))
        for n in g2
        if n.endswith(".step")
    )
    ok = torch.equal(l1, l2) and not differ and step_err < 1e-4
    print(
        f"W4A4 resnet20 training step on {device}, bf16 autocast, channels_last: loss equal {torch.equal(l1, l2)}, "
        f"{len(differ)} of {len(weights)} weight gradients differ{(' (' + ', '.join(differ[:3]) + ')') if differ else ''}, "
        f"step gradients max rel. err {step_err:.1e} -> {'ok' if ok else 'FAILED'}",
        flush=True,
    )
    return 0 if ok else 1


def check_image_conv(device: str) -> int:
    """resnet18's first layer (7x7, stride 2, 8-bit image and weights) on `device`, in float32
    (TF32 off, as amp=false) and under bf16 autocast (as amp): its step gradient, which
    lsq.layers.ImageConv takes through the weight gradient, against eq. 3 summed over the input
    gradient of a float64 conv on the same x_hat and w_hat, to 1e-4 of the sum or 1e-6 of its
    terms' absolute sum (it cancels: the old path through the input gradient is 3e-5 of that
    under bf16 on the CPU); the weight gradient to the conv's own precision."""
    import torch.nn.functional as F

    from lsq.layers import QConv2d

    failures = 0
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 3, 64, 64, generator=gen) * 1.2).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = QConv2d(3, 64, 7, stride=2, padding=3, bias=False, w_bits=8, a_bits=8, a_signed=True).to(
            device
        )
        layer.image_conv_devices = (device,)  # the CPU too, where it is not used by default
        allow_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = dtype != torch.float32
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = layer(x)
            up = torch.randn(out.shape, generator=gen).to(device, out.dtype)
            out.backward(up)
        finally:
            torch.backends.cudnn.allow_tf32 = allow_tf32
        aq, wq = layer.a_quant, layer.w_quant
        s, s_w = aq.step.item(), wq.step.item()
        v = x.double().cpu() / s
        x_hat = (v.clamp(-aq.qn, aq.qp).round() * s).to(dtype).double().requires_grad_(True)
        w = layer.weight.detach().double().cpu() / s_w
        w_hat = (w.clamp(-wq.qn, wq.qp).round() * s_w).to(dtype).double().requires_grad_(True)
        F.conv2d(x_hat, w_hat, None, 2, 3).backward(up.double().cpu())
        inside = (v > -aq.qn) & (v < aq.qp)
        ds = torch.where(inside, v.round() - v, torch.where(v <= -aq.qn, -aq.qn, aq.qp).double())
        g = 1 / (x[0].numel() * aq.qp) ** 0.5
        ref, scale = g * float((x_hat.grad * ds).sum()), g * float((x_hat.grad * ds).abs().sum())
        err = abs(aq.step.grad.item() - ref)  # a sum with cancellations: held to its terms' scale too
        rel = err / abs(ref)
        w_ref = w_hat.grad * ((w > -wq.qn) & (w < wq.qp))
        w_err = float((layer.weight.grad.double().cpu() - w_ref).abs().max() / w_ref.abs().max())
        ok = err < 1e-4 * abs(ref) + 1e-6 * scale and w_err < (1e-5 if dtype == torch.float32 else 1e-2)
        failures += not ok
        print(
            f"image conv (7x7/2, 8-bit image) on {device}, {'bf16 autocast' if dtype != torch.float32 else 'float32'}: "
            f"step gradient rel. err {rel:.1e} ({err / scale:.1e} of its terms' absolute sum), weight gradient "
            f"{w_err:.1e} -> {'ok' if ok else 'FAILED'}",
            flush=True,
        )
    return failures


if __name__ == "__main__":
    sys.exit(self_check())
