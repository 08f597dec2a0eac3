"""Learned Step Size Quantization (Esser et al., ICLR 2020), one screen.

For data v, step size s and integer range [-Qn, Qp] (signed: Qn = 2^(b-1), Qp = 2^(b-1) - 1;
unsigned: Qn = 0, Qp = 2^b - 1):

    forward  (eq. 1-2)   v_hat = round(clip(v / s, -Qn, Qp)) * s
    d v_hat / d v (eq. 5, straight-through)   1 if -Qn < v/s < Qp else 0
    d v_hat / d s (eq. 3)   -v/s + round(v/s)   if -Qn < v/s < Qp
                            -Qn                  if v/s <= -Qn
                             Qp                  if v/s >= Qp
    the step gradient is then multiplied by g = 1 / sqrt(N * Qp)   (section 2.2)

The range test uses the unrounded v/s. (PyTorch's fused learnable fake-quant op tests the
rounded value, which differs in the half-step band just outside each clip bound.)
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

STEP_EPS = 1e-8  # s is clamped to this in forward, so it can never reach zero or go negative


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) with the quantized integers in [-Qn, Qp]."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class LsqFunction(torch.autograd.Function):
    """v_hat = round(clip(v/s, -Qn, Qp)) * s with the paper's gradients for v and s.

    Saves only v (which the previous layer usually holds already) and s; backward recomputes
    v/s in one pass. Computes in fp32 whatever the input dtype, and returns the input dtype.
    """

    @staticmethod
    def forward(ctx, v, step, qn: int, qp: int, g: float):
        s = step.clamp_min(STEP_EPS)
        x = v.float() / s  # v/s
        out = x.clamp_(-qn, qp).round_().mul_(s)  # round(clip(v/s)) * s
        ctx.save_for_backward(v, s)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        v, s = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        grad = grad.float()
        x = v.float() / s
        below, above = x <= -qn, x >= qp
        inside = ~(below | above)  # -Qn < v/s < Qp, on the unrounded value
        grad_v = grad * inside
        # eq. 3: round(x) - x inside, -Qn below, Qp above; summed against the incoming gradient
        ds = torch.where(inside, x.round() - x, torch.where(below, -float(qn), float(qp)))
        grad_s = (grad * ds).sum() * ctx.g
        return grad_v.to(v.dtype), grad_s.reshape(s.shape), None, None, None


class LsqQuantizer(nn.Module):
    """One LSQ quantizer with one learnable step size `step`. `bits=None` is the identity.

    kind="weight": N is the number of weights; the step is initialized from the weight.
    kind="activation": N is the features per sample (grad_scale_n="per_sample", the paper) or
    the whole tensor incl. the batch ("numel", most public code); initialized from the first
    training batch. Initialization happens once, in training mode; the `initialized` buffer is
    part of the state dict, so a restored model never re-initializes.
    """

    def __init__(self, bits: int | None, signed: bool, kind: str,
                 grad_scale_n: str = "per_sample", grad_scale: bool = True):
        super().__init__()
        if kind not in ("weight", "activation"):
            raise ValueError(f"kind must be 'weight' or 'activation', not {kind!r}")
        if grad_scale_n not in ("per_sample", "numel"):
            raise ValueError(f"grad_scale_n must be 'per_sample' or 'numel', not {grad_scale_n!r}")
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8 or None, not {bits!r}")
        self.bits, self.signed, self.kind = bits, signed, kind
        self.grad_scale_n, self.grad_scale = grad_scale_n, grad_scale
        if bits is None:
            self.register_parameter("step", None)
            return
        self.qn, self.qp = qrange(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_known = False  # cache of `initialized`, so forward never syncs the device

    def grad_scale_factor(self, v: torch.Tensor) -> float:
        if not self.grad_scale:
            return 1.0
        per_sample = self.kind == "activation" and self.grad_scale_n == "per_sample"
        n = v[0].numel() if per_sample else v.numel()
        return 1.0 / math.sqrt(n * self.qp)

    @torch.no_grad()
    def init_step(self, v: torch.Tensor) -> None:
        """s = 2 * mean(|v|) / sqrt(Qp)   (section 2.1)."""
        if not self.signed and bool((v < 0).any()):
            warnings.warn(f"unsigned {self.kind} quantizer sees negative inputs; they will clip to 0")
        self.step.copy_(2 * v.detach().abs().float().mean() / math.sqrt(self.qp))
        self.initialized.fill_(True)
        self._init_known = True

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return v
        if not self._init_known:
            if bool(self.initialized):
                self._init_known = True
            elif self.training:
                self.init_step(v)
        return LsqFunction.apply(v, self.step, self.qn, self.qp, self.grad_scale_factor(v))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_known = False  # re-read the loaded flag on the next forward

    def extra_repr(self) -> str:
        if self.bits is None:
            return "bits=None (FP32)"
        return f"bits={self.bits}, signed={self.signed}, kind={self.kind}, range=[-{self.qn}, {self.qp}]"
