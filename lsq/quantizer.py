"""Learned Step Size Quantization (Esser et al., ICLR 2020).

For data v, step size s and integer range [-Qn, Qp] (signed: Qn = 2^(b-1), Qp = 2^(b-1) - 1;
unsigned: Qn = 0, Qp = 2^b - 1):

    forward  (eq. 1-2)   v_hat = round(clip(v / s, -Qn, Qp)) * s
    d v_hat / d v (eq. 5, straight-through)   1 if -Qn < v/s < Qp else 0
    d v_hat / d s (eq. 3)   -v/s + round(v/s)   if -Qn < v/s < Qp
                            -Qn                  if v/s <= -Qn
                             Qp                  if v/s >= Qp
    the step gradient is then multiplied by g = 1 / sqrt(N * Qp)   (section 2.2)

The range test uses the unrounded v/s (PyTorch's fused fake-quant op tests the rounded one).
Below, the equations in torch ops (the eager path); the fast paths run the same float32 arithmetic
in one pass (kernels_cpu.py: C, kernels_cuda.py: Triton). LSQ_FAST_PATH=0 turns them off.
"""

import math
import os
import warnings

import torch
from torch import Tensor, nn

STEP_EPS = 1e-8  # s = step.clamp_min(STEP_EPS): never zero or negative


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) with the quantized integers in [-Qn, Qp]."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def codes(v, s, qn: int, qp: int):
    """k = round(clip(v/s, -Qn, Qp)) in float32: the integers of eq. 1-2, v_hat = k * s."""
    return torch.round(torch.clamp(v.float() / s, -qn, qp))


def eager_forward(v, s, qn: int, qp: int):
    """v_hat = k * s (eq. 1-2) in v's dtype. No in-place op and no `.to()` that returns its own
    input: under torch.compile either one cuts the backward off."""
    v_hat = codes(v, s, qn, qp) * s
    return v_hat if v_hat.dtype == v.dtype else v_hat.to(v.dtype)


def derivatives(v, s, qn: int, qp: int):
    """(inside, dv_hat/ds) in float32: the mask -Qn < v/s < Qp (eq. 5) and eq. 3."""
    x = v.float() / s
    below, above = x <= -qn, x >= qp
    inside = ~(below | above)
    return inside, torch.where(inside, x.round() - x, torch.where(below, -float(qn), float(qp)))


def eager_backward(v, s, grad, qn: int, qp: int):
    """(grad_v, sum(grad * dv_hat/ds)) for the upstream gradient `grad` (eq. 3 and 5)."""
    grad = grad.float()
    inside, ds = derivatives(v, s, qn, qp)
    return (grad * inside).to(v.dtype), (grad * ds).sum()


def quantize(v, step, qn: int, qp: int):
    """v_hat for s = step.clamp_min(STEP_EPS), fast path or eager; no gradient of its own."""
    fast = fast_path(v)
    if fast is not None:
        return fast.forward(v, step, qn, qp)  # clamps the step itself
    return eager_forward(v, step.clamp_min(STEP_EPS), qn, qp)


def quantize_backward(
    v: Tensor, step: Tensor, grad: Tensor, qn: int, qp: int, g: float
) -> tuple[Tensor, Tensor]:
    """(grad_v in v's dtype and strides, g * sum(eq. 3) in the step's shape), fast path or eager."""
    fast = fast_path(v)
    if fast is not None:
        grad_v, grad_step = fast.backward(v, step, grad, qn, qp, g)
    else:
        grad_v, grad_s = eager_backward(v, step.clamp_min(STEP_EPS), grad, qn, qp)
        grad_step = (grad_s * g).reshape(step.shape)
    if grad_v.stride() != v.stride():  # the layout the fake below promises the compiler
        grad_v = torch.empty_like(v).copy_(grad_v)
    return grad_v, grad_step


class LsqFunction(torch.autograd.Function):
    """v_hat with the paper's gradients for v and s; saves only v and the step. With `opaque`, the backward
    under torch.compile is one op (lsq::backward) running the fast kernels (lsq.train.use_opaque_backward)."""

    @staticmethod
    def forward(ctx, v, step, qn: int, qp: int, g: float, opaque: bool = False):
        ctx.save_for_backward(v, step)
        ctx.qn, ctx.qp, ctx.g, ctx.opaque = qn, qp, g, opaque
        return quantize(v, step, qn, qp)

    @staticmethod
    def backward(ctx, grad):
        v, step = ctx.saved_tensors
        opaque = ctx.opaque and torch.compiler.is_compiling()
        backward = torch.ops.lsq.backward if opaque else quantize_backward
        grad_v, grad_step = backward(v, step, grad, ctx.qn, ctx.qp, ctx.g)
        return grad_v, grad_step, None, None, None, None


_backward_op = torch.library.custom_op("lsq::backward", quantize_backward, mutates_args=())
_backward_op.register_fake(lambda v, step, *args: (torch.empty_like(v), torch.empty_like(step)))


class LsqQuantizer(nn.Module):
    """One LSQ quantizer with a learnable step size; `bits=None` is the identity. N of g is the
    number of weights, or of an activation's features per sample (grad_scale_n="per_sample", the
    paper) or elements ("numel"). The `initialized` buffer keeps a restored model from re-initializing."""

    def __init__(self, bits: int | None, signed: bool, kind: str, grad_scale_n="per_sample", grad_scale=True):
        super().__init__()
        self.bits, self.signed, self.kind = bits, signed, kind
        self.grad_scale_n, self.grad_scale = grad_scale_n, grad_scale
        if bits is None:
            self.register_parameter("step", None)
            return
        self.qn, self.qp = qrange(bits, signed)
        self.opaque_backward = False  # inside torch.compile: the backward as one op (LsqFunction)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_known = False  # cache of `initialized`, so forward never syncs the device

    def grad_scale_factor(self, v: torch.Tensor) -> float:
        if not self.grad_scale:
            return 1.0
        per_sample = self.kind == "activation" and self.grad_scale_n == "per_sample" and v.dim() > 1
        n = math.prod(v.shape[1:]) if per_sample else v.numel()  # an unbatched input is one sample
        return 1.0 / math.sqrt(max(n, 1) * self.qp)

    @torch.no_grad()
    def init_step(self, v: torch.Tensor) -> None:
        """s = 2 * mean(|v|) / sqrt(Qp)   (section 2.1)."""
        if not self.signed and bool((v < 0).any()):
            warnings.warn(f"unsigned {self.kind} quantizer sees negative inputs; they will clip to 0")
        step = 2 * v.detach().abs().float().mean() / math.sqrt(self.qp)
        what = f"the step size of a {self.bits}-bit {self.kind} quantizer"
        if not math.isfinite(value := float(step)):
            formula = f"2 * mean(|v|) / sqrt(Qp) = {value}"
            raise ValueError(f"cannot initialize {what}: {formula} (its {self.kind} holds NaN or inf)")
        if value == 0.0:  # every value clips until the gradient raises the step
            warnings.warn(f"{what} initialized from all-zero values starts at {STEP_EPS:g}")
        self.step.copy_(step)
        self.initialized.fill_(True)
        self._init_known = True

    def prepare(self, v: torch.Tensor) -> None:
        """Initialize the step from v if v is the first non-empty training batch (empty: no mean)."""
        if not self._init_known and not self.is_initialized() and self.training and v.numel():
            self.init_step(v)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return v
        self.prepare(v)
        g = self.grad_scale_factor(v)
        return LsqFunction.apply(v, self.step, self.qn, self.qp, g, self.opaque_backward)

    def is_initialized(self) -> bool:
        """Read the `initialized` flag (one device sync) and cache it for forward."""
        self._init_known = self.bits is None or bool(self.initialized)
        return self._init_known

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_known = False  # re-read the loaded flag on the next forward


FAST_PATH: bool | None = None  # True/False: on/off; None: LSQ_FAST_PATH decides at the first call
KERNELS: dict = {}  # device type -> its kernels, or None where they could not be built


def fast_path_on() -> bool:
    """FAST_PATH, from LSQ_FAST_PATH (default on) the first time; ValueError for a value it cannot read."""
    global FAST_PATH
    if FAST_PATH is None:
        value = os.environ.get("LSQ_FAST_PATH", "")
        word = value.strip().lower() or "on"
        if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            allowed = "1, true, yes, on or 0, false, no, off (any case), or unset"
            raise ValueError(f"environment variable LSQ_FAST_PATH={value!r}: allowed: {allowed}")
        FAST_PATH = word in ("1", "true", "yes", "on")
    return FAST_PATH


def dense(t: torch.Tensor) -> bool:
    """Contiguous or channels_last: storage the kernels can walk in order."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def fast_path(v: torch.Tensor):
    """The fast kernels for v, or None for the eager path (always inside torch.compile)."""
    if torch.compiler.is_compiling() or not fast_path_on():
        return None
    kind = v.device.type
    if kind not in KERNELS:
        KERNELS[kind] = None
        try:
            if kind == "cpu":
                from .kernels_cpu import CpuKernels

                KERNELS[kind] = CpuKernels()
            elif kind == "cuda":  # eager CUDA is bound by kernel launches: one Triton launch instead of ~7
                from .kernels_cuda import TritonKernels, check_kernels

                KERNELS[kind] = check_kernels(TritonKernels(), v.device)
        except Exception as e:  # no compiler, no Triton, ...: the eager path does the same math
            warnings.warn(f"LSQ fast path unavailable on {kind} ({e}); using the eager path")
    fast = KERNELS[kind]
    return fast if fast is not None and fast.accepts(v) else None
