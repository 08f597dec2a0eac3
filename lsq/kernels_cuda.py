"""The quantizer's CUDA fast path: the eager path's float32 operations as Triton kernels. Division is
IEEE (`div_rn`; Triton's `/` is approximate). bench/_triton_lsq.py checks them against the paper."""

import torch
import triton
import triton.language as tl

from .quantizer import STEP_EPS, codes, dense, eager_backward, eager_forward

BLOCK = 1024  # elements per program; partial sums per iteration of the step gradient's final sum


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
def _lsq_forward(v_ptr, out_ptr, step_ptr, eps, n, qn, qp, BLOCK: tl.constexpr, CODES: tl.constexpr):
    """v_hat = round(clip(v/s, -Qn, Qp)) * s (eq. 1-2); with CODES, the integer k = round(clip(v/s)) alone"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _step(step_ptr, eps)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask).to(tl.float32), s)
    k = _round_half_even(tl.where(x < -qn, -qn, tl.where(x > qp, qp, x)))  # (NaN passes, as in torch.clamp)
    tl.store(out_ptr + offs, (k if CODES else k * s).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_backward(v_ptr, grad_ptr, grad_v_ptr, partial_ptr, step_ptr, eps, n, qn, qp, BLOCK: tl.constexpr):
    """grad_v = grad * [-Qn < v/s < Qp] (eq. 5); per block, sum(grad * dv_hat/ds) (eq. 3)"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _step(step_ptr, eps)
    x = tl.math.div_rn(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), s)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    below, above = x <= -qn, x >= qp
    inside = (below | above) == 0
    tl.store(grad_v_ptr + offs, (g * inside.to(tl.float32)).to(grad_v_ptr.dtype.element_ty), mask=mask)
    ds = tl.where(inside, _round_half_even(x) - x, tl.where(below, -qn, qp))
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, g * ds, 0.0), axis=0))


@triton.jit
def _lsq_step_grad(partial_ptr, out_ptr, blocks, g, BLOCK: tl.constexpr):
    """grad_step = g * sum(partial sums), in one program and a fixed order"""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, blocks, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < blocks, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, axis=0) * g).to(out_ptr.dtype.element_ty))


@triton.jit
def _lsq_decode(codes_ptr, out_ptr, s_ptr, n, BLOCK: tl.constexpr):
    """v_hat = k * s in float32"""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = tl.load(codes_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, k * tl.load(s_ptr), mask=mask)


class TritonKernels:
    """The fast path's interface (as kernels_cpu.CpuKernels) for dense tensors below 2^31 elements on
    the current device; `step` the step parameter (clamped here), `s` an already clamped one."""

    def accepts(self, v: torch.Tensor) -> bool:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        current = v.device.type != "cuda" or v.device.index == torch.cuda.current_device()
        return v.dtype in dtypes and dense(v) and v.numel() < 2**31 and current

    def forward(self, v, step, qn, qp, out=None):
        out = torch.empty_like(v) if out is None else out  # v's strides
        grid, codes = (triton.cdiv(v.numel(), BLOCK),), out.dtype in (torch.int8, torch.uint8)
        _lsq_forward[grid](v, out, step, STEP_EPS, v.numel(), float(qn), float(qp), BLOCK=BLOCK, CODES=codes)
        return out

    def backward(self, v, step, grad, qn, qp, g):
        if grad.stride() != v.stride():
            grad = torch.empty_like(v, dtype=grad.dtype).copy_(grad)  # v's layout
        n, blocks = v.numel(), triton.cdiv(v.numel(), BLOCK)
        grad_v, grad_step = torch.empty_like(v), torch.empty_like(step)
        sums = torch.empty(blocks, device=v.device, dtype=torch.float32)
        _lsq_backward[(blocks,)](v, grad, grad_v, sums, step, STEP_EPS, n, float(qn), float(qp), BLOCK=BLOCK)
        _lsq_step_grad[(1,)](sums, grad_step, blocks, float(g), BLOCK=BLOCK)
        return grad_v, grad_step

    def encode(self, v, s, signed):  # k = round(v_hat / s) into int8 or uint8, by the forward kernel
        k = torch.empty_like(v, dtype=torch.int8 if signed else torch.uint8)  # v's strides
        return self.forward(v, s, 128 if signed else 0, 127 if signed else 255, out=k)

    def decode(self, k, s):
        out, n = torch.empty_like(k, dtype=torch.float32), k.numel()
        _lsq_decode[(triton.cdiv(n, BLOCK),)](k, out, s, n, BLOCK=BLOCK)
        return out


def check_kernels(fast, device: torch.device):
    """`fast` if it gives the eager path's forward, grad_v and codes bit for bit and g times the step
    gradient to 1e-4 (a sum in another order) on `device`; else RuntimeError (then eager runs)."""
    gen = torch.Generator().manual_seed(0)
    x, s = torch.randn(3000, generator=gen) * 4, torch.tensor(0.3, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        v, grad = x.to(device, dtype), torch.randn(3000, generator=gen).to(device, dtype)
        v_hat, tiny = eager_forward(v, s, 8, 7), v * 1e-7  # tiny: v/s on both sides of the range at STEP_EPS
        k = fast.encode(v_hat, s, True)
        grad_v, grad_step = fast.backward(v, s, grad, 8, 7, 0.5)
        eager_v, eager_s = eager_backward(v, s, grad, 8, 7)
        agree = [
            torch.equal(fast.forward(v, s, 8, 7), v_hat),
            torch.equal(fast.forward(tiny, -s, 8, 7), eager_forward(tiny, (-s).clamp_min(STEP_EPS), 8, 7)),
            torch.equal(grad_v, eager_v) and grad_step.shape == s.shape,
            bool(torch.isclose(grad_step, eager_s * 0.5, rtol=1e-4, atol=1e-6)),
            torch.equal(k.float(), codes(v, s, 8, 7)) and torch.equal(fast.decode(k, s), k.float() * s),
        ]
        if not all(agree):
            raise RuntimeError(f"{type(fast).__name__} disagrees with the eager path on {dtype}")
    return fast
