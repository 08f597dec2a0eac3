"""The quantizer's CUDA fast path: lsq/quantizer.py's `_forward`, `_backward`, `_codes` and
`_decode` as hand-written Triton kernels, one pass over the tensor each.

Why: on a GPU an eager quantizer call is bound by the host, not the device: about 7 kernel
launches in the forward and 16 in the backward, 0.3-0.5 ms per call on an H100 whatever its
size. Here the forward is one launch and the backward two (the elementwise pass writes per-block
sums of the step gradient; one small program adds those up in a fixed order, deterministic
unlike atomics, and scales the sum by g). The step size is clamped and read on the device, so
nothing syncs and no other op runs.

Exactness: every element gets the same float32 operations as the eager path: s = max(step,
STEP_EPS) as step.clamp_min (NaN passes), x = v / s with IEEE division (`div_rn`; Triton's `/`
is approximate), clip by comparisons (NaN passes through, as in torch.clamp), round half to even
written with floor (exact for |x| < 2^23), grad_v = grad * inside, outputs cast to the input's
dtype. Only the step gradient's sum runs in another order. `python bench/_triton_lsq.py` checks
all of it against the paper's formulas (on a CPU in Triton's interpreter;
tests/test_quantizer_fastpath.py runs it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantizer import STEP_EPS, _dense

BLOCK = 1024  # elements per program of the elementwise kernels
SUM_BLOCK = 1024  # partial sums per iteration of the step gradient's final sum


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact for |x| < 2^23
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _step(step_ptr, eps):
    """s = step.clamp_min(eps): a NaN step stays NaN, as in torch"""
    s = tl.load(step_ptr).to(tl.float32)
    return tl.where(s < eps, eps, s)


@triton.jit
def _lsq_forward(v_ptr, out_ptr, step_ptr, eps, n, qn, qp, BLOCK: tl.constexpr):
    """v_hat = round(clip(v/s, -Qn, Qp)) * s   (eq. 1-2)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _step(step_ptr, eps)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask).to(tl.float32), s)
    x = tl.where(x < -qn, -qn, x)
    x = tl.where(x > qp, qp, x)
    tl.store(out_ptr + offs, (_round_half_even(x) * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_backward(v_ptr, grad_ptr, grad_v_ptr, partial_ptr, step_ptr, eps, n, qn, qp, BLOCK: tl.constexpr):
    """grad_v = grad * [-Qn < v/s < Qp] (eq. 5); per block, sum(grad * dv_hat/ds) (eq. 3)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _step(step_ptr, eps)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    below = x <= -qn
    above = x >= qp
    inside = (below | above) == 0
    tl.store(grad_v_ptr + offs, (g * inside.to(tl.float32)).to(grad_v_ptr.dtype.element_ty), mask=mask)
    ds = tl.where(inside, _round_half_even(x) - x, tl.where(below, -qn, qp))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, g * ds, 0.0), axis=0))


@triton.jit
def _lsq_step_grad(partial_ptr, out_ptr, blocks, g, SUM_BLOCK: tl.constexpr):
    """grad_step = g * sum(partial sums), in one program and a fixed order"""
    acc = tl.zeros([SUM_BLOCK], dtype=tl.float32)
    for start in range(0, blocks, SUM_BLOCK):
        offs = start + tl.arange(0, SUM_BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < blocks, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, axis=0) * g).to(out_ptr.dtype.element_ty))


@triton.jit
def _lsq_encode(v_ptr, codes_ptr, s_ptr, n, BLOCK: tl.constexpr):
    """k = round(v_hat / s), one byte each (the int8 or uint8 of codes_ptr)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask).to(tl.float32), tl.load(s_ptr))
    tl.store(codes_ptr + offs, _round_half_even(x).to(codes_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_decode(codes_ptr, out_ptr, s_ptr, n, BLOCK: tl.constexpr):
    """v_hat = k * s in float32"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(codes_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, k * tl.load(s_ptr), mask=mask)


class TritonKernels:
    """The kernels behind the interface of lsq.quantizer's fast paths. Tensors must be dense
    (contiguous or channels_last: the kernels walk the storage in order), below 2^31 elements
    (int32 offsets) and on the current device (where Triton launches); `step` is the float32
    step-size parameter (clamped here), `s` an already clamped float32 scalar, both on the
    tensor's device."""

    def accepts(self, v: torch.Tensor) -> bool:
        current = v.device.type != "cuda" or v.device.index == torch.cuda.current_device()
        return v.dtype in (torch.float32, torch.bfloat16, torch.float16) and _dense(v) and v.numel() < 2**31 and current

    def forward(self, v, step, qn, qp):
        out = torch.empty_like(v)  # v's strides
        n = v.numel()
        _lsq_forward[(triton.cdiv(n, BLOCK),)](v, out, step, STEP_EPS, n, float(qn), float(qp), BLOCK=BLOCK)
        return out

    def backward(self, v, step, grad, qn, qp, g):
        if grad.stride() != v.stride():
            grad = torch.empty_like(v, dtype=grad.dtype).copy_(grad)  # v's layout
        n = v.numel()
        blocks = triton.cdiv(n, BLOCK)
        grad_v = torch.empty_like(v)
        partial = torch.empty(blocks, device=v.device, dtype=torch.float32)
        grad_step = torch.empty_like(step)
        _lsq_backward[(blocks,)](v, grad, grad_v, partial, step, STEP_EPS, n, float(qn), float(qp), BLOCK=BLOCK)
        _lsq_step_grad[(1,)](partial, grad_step, blocks, float(g), SUM_BLOCK=SUM_BLOCK)
        return grad_v, grad_step

    def encode(self, v, s, signed):
        codes = torch.empty_like(v, dtype=torch.int8 if signed else torch.uint8)  # v's strides
        n = v.numel()
        _lsq_encode[(triton.cdiv(n, BLOCK),)](v, codes, s, n, BLOCK=BLOCK)
        return codes

    def decode(self, codes, s):
        out = torch.empty_like(codes, dtype=torch.float32)
        n = codes.numel()
        _lsq_decode[(triton.cdiv(n, BLOCK),)](codes, out, s, n, BLOCK=BLOCK)
        return out
