"""An option for the quantizer on CUDA, measured by `bench/quantizer.py --options`: the paper's
forward and backward as two hand-written Triton kernels, one pass over the tensor each way.

On an H100 every eager quantizer call is bound by kernel launches (about 7 forward and 16
backward, 0.3-0.5 ms per call whatever the size) and so is PyTorch's fused op (0.19-0.26 ms).
These kernels launch one forward and two backward (the elementwise pass writing per-block sums
of the step gradient, then a sum of those: deterministic, unlike atomics). The step size is read
on the device, so nothing syncs.

Exactness: the same float32 operations as lsq/quantizer.py's `_forward` and `_backward`, element
for element: x = v / s with IEEE division (Triton's `/` is approximate: div_rn), clip by
comparisons (NaN passes through, as in torch.clamp), round half to even written with floor
(exact for |x| < 2^23), grad_v = grad * inside. Only the step gradient's sum runs in another
order. Not wired into the project until a GPU shows it wins (see bench/RESULTS.md).

    python bench/_triton_lsq.py      # self-check against the paper's formulas (CPU: Triton's interpreter)
"""

from __future__ import annotations

import os
import sys

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import _common  # noqa: E402, F401  (puts the repository on sys.path)
from lsq.quantizer import _dense  # noqa: E402

BLOCK = 1024


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact for |x| < 2^23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _lsq_forward(v_ptr, out_ptr, s_ptr, n, qn, qp, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask).to(tl.float32), s)
    x = tl.where(x < -qn, -qn, x)
    x = tl.where(x > qp, qp, x)
    tl.store(out_ptr + offs, (_round_half_even(x) * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_backward(v_ptr, grad_ptr, grad_v_ptr, partial_ptr, s_ptr, n, qn, qp, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    below = x <= -qn
    above = x >= qp
    inside = (below | above) == 0
    tl.store(grad_v_ptr + offs, (g * inside.to(tl.float32)).to(grad_v_ptr.dtype.element_ty), mask=mask)
    ds = tl.where(inside, _round_half_even(x) - x, tl.where(below, -qn, qp))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, g * ds, 0.0), axis=0))


class TritonKernels:
    """The kernels behind LsqFunction's interface (bench/quantizer.py's kernel_function)."""

    def accepts(self, v: torch.Tensor) -> bool:
        return v.dtype in (torch.float32, torch.bfloat16, torch.float16) and _dense(v)

    def forward(self, v, s, qn, qp):
        out = torch.empty_like(v)  # v's strides: both walk the storage in order
        n = v.numel()
        _lsq_forward[(triton.cdiv(n, BLOCK),)](v, out, s.float(), n, float(qn), float(qp), BLOCK=BLOCK)
        return out

    def backward(self, v, s, grad, qn, qp):
        if grad.stride() != v.stride():
            grad = torch.empty_like(v, dtype=grad.dtype).copy_(grad)  # v's layout
        n = v.numel()
        blocks = triton.cdiv(n, BLOCK)
        grad_v = torch.empty_like(v)
        partial = torch.empty(blocks, device=v.device, dtype=torch.float32)
        _lsq_backward[(blocks,)](v, grad, grad_v, partial, s.float(), n, float(qn), float(qp), BLOCK=BLOCK)
        return grad_v, partial.sum().to(s.dtype)


def self_check() -> int:
    """Forward and grad_v element for element against the paper's formulas (float64), the step
    gradient to 1e-5, for signed and unsigned ranges, float32 and bfloat16, a channels_last
    tensor, values on and around every clip bound and rounding tie, NaN and inf."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k = TritonKernels()
    failures = 0
    for bits, signed, dtype, channels_last in [(4, False, torch.float32, False), (4, True, torch.float32, True),
                                               (2, True, torch.bfloat16, False), (8, False, torch.float32, False)]:
        qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        gen = torch.Generator().manual_seed(bits)
        s = 0.25  # a power of two: v / s is exact, so every element must match
        units = torch.cat([torch.arange(-qn - 3, qp + 3.01, 0.5), torch.randn(3000, generator=gen) * (qn + qp),
                           torch.tensor([float("nan"), float("inf"), -float("inf")])])
        per_image = 3 * 16 * 16
        v = torch.cat([units * s, torch.zeros(-len(units) % per_image)]).reshape(-1, 3, 16, 16)
        v = v.to(dtype).to(device)
        if channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(v.shape, generator=gen).to(device)
        st = torch.tensor(s, device=device)
        out = k.forward(v, st, qn, qp)
        grad_v, grad_s = k.backward(v, st, grad.to(dtype), qn, qp)
        x = v.double().cpu() / s
        ref_out = (torch.round(torch.clamp(x, -qn, qp)) * s).to(dtype).double()
        inside = ~((x <= -qn) | (x >= qp))
        g = grad.to(dtype).double().cpu()
        ref_gv = (g * inside).to(dtype).double()
        ds = torch.where(inside, x.round() - x, torch.where(x <= -qn, -float(qn), float(qp)))
        finite = torch.isfinite(x)
        bad = int((~torch.eq(out.double().cpu(), ref_out) & ~(out.double().cpu().isnan() & ref_out.isnan())).sum())
        bad += int((~torch.eq(grad_v.double().cpu(), ref_gv) & ~(grad_v.double().cpu().isnan() & ref_gv.isnan())).sum())
        # the step gradient over the finite elements only (NaN makes the whole sum NaN, as eager)
        _, gs_finite = k.backward(torch.where(torch.isfinite(v), v, torch.zeros_like(v)), st, grad.to(dtype), qn, qp)
        ref_finite = float((g * torch.where(finite, ds, torch.zeros_like(ds))).sum())
        rel = abs(float(gs_finite) - ref_finite) / max(abs(ref_finite), 1e-6)
        nan_ok = bool(torch.isnan(grad_s))  # v holds a NaN: the step gradient is NaN, as in eager
        ok = bad == 0 and rel < 1e-5 and nan_ok
        failures += not ok
        print(f"{bits} bits {'signed' if signed else 'unsigned'} {str(dtype)[6:]}{' channels_last' if channels_last else ''} "
              f"on {device}: {bad} elements differ from the paper, step gradient rel. err {rel:.1e}, "
              f"NaN step gradient with a NaN input: {nan_ok} -> {'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(self_check())
