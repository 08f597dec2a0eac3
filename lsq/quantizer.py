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

Speed: `_forward` and `_backward` below are the equations, written once in torch ops (the eager
path). On the CPU (float32) the same arithmetic runs as one fused pass each way: a small C loop
compiled with the system's C compiler on first use (well under a second, then cached on disk)
and called through ctypes. On CUDA, where eager calls are bound by kernel launches, it is small
Triton kernels (lsq/_triton.py: one launch forward, two backward), checked against the eager
path once per process. Either falls back to the eager path when it cannot be built (the CUDA
kernels also when their check disagrees; the C loop is checked by the tests, not at run time),
and LSQ_FAST_PATH=0 (or false, no, off) turns both off.
tests/test_quantizer_fastpath.py checks that the fast paths give the eager path's results.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

import torch
from torch import nn

STEP_EPS = 1e-8  # s is clamped to this in forward, so it can never reach zero or go negative


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) with the quantized integers in [-Qn, Qp]."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _forward(v, s, qn: int, qp: int):
    """v_hat = round(clip(v/s, -Qn, Qp)) * s   (eq. 1-2), in fp32, returned in v's dtype."""
    v_hat = torch.round(torch.clamp(v.float() / s, -qn, qp)) * s
    # No in-place op, and a cast only where the dtype differs. torch.compile traces this inside
    # LsqFunction.forward, and in torch 2.11 either one (clamp_/round_/mul_ on x, or a `.to()`
    # that returns its own input, as for a float32 weight) cut the backward off: zero gradients
    # for every weight and step size, and a compiled model that silently stopped learning
    # (pytorch/pytorch#180642; the "compiled training is wrong on CUDA" of bench/RESULTS.md,
    # which reproduces on the CPU with torch 2.11 and not with 2.14). tests/test_quantizer.py
    # keeps this function free of both.
    return v_hat if v_hat.dtype == v.dtype else v_hat.to(v.dtype)


def _eq3(v, s, qn: int, qp: int):
    """(inside, dv_hat/ds) in fp32: the mask -Qn < v/s < Qp on the unrounded value (eq. 5), and
    eq. 3: round(v/s) - v/s inside, -Qn below, Qp above."""
    x = v.float() / s
    below, above = x <= -qn, x >= qp
    inside = ~(below | above)
    return inside, torch.where(inside, x.round() - x, torch.where(below, -float(qn), float(qp)))


def _backward(v, s, grad, qn: int, qp: int):
    """(grad_v, sum(grad * dv_hat/ds)) for the upstream gradient `grad`   (eq. 3 and 5)."""
    grad = grad.float()
    inside, ds = _eq3(v, s, qn, qp)
    return (grad * inside).to(v.dtype), (grad * ds).sum()


def quantize(v, step, qn: int, qp: int):
    """v_hat with s = step.clamp_min(STEP_EPS), on the fast path where there is one: the body of
    LsqFunction's forward, for use inside an autograd Function (it defines no gradient itself)."""
    fast = _fast_path(v)  # one fused pass where available; the same arithmetic
    if fast is not None:
        return fast.forward(v, step, qn, qp)  # clamps the step itself
    return _forward(v, step.clamp_min(STEP_EPS), qn, qp)


class LsqFunction(torch.autograd.Function):
    """v_hat = round(clip(v/s, -Qn, Qp)) * s with the paper's gradients for v and s.

    Saves only v (which the previous layer usually holds already) and the step; backward
    recomputes v/s in one pass. Computes in fp32 whatever the input dtype, and returns the input
    dtype. The step is used as s = step.clamp_min(STEP_EPS), and its gradient is g times the
    sum of eq. 3 (the clamp passes it through).
    """

    @staticmethod
    def forward(ctx, v, step, qn: int, qp: int, g: float):
        ctx.save_for_backward(v, step)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return quantize(v, step, qn, qp)

    @staticmethod
    def backward(ctx, grad):
        v, step = ctx.saved_tensors
        grad_v, grad_step = _backward_any(v, step, grad, ctx.qn, ctx.qp, ctx.g)
        return grad_v, grad_step, None, None, None


class LsqFunctionOpaqueBackward(LsqFunction):
    """LsqFunction whose backward, inside torch.compile, is one opaque op (lsq::backward below)
    running the fast path's kernels, where LsqFunction's is traced as equations. The forward
    stays traced either way: it fuses into the previous layer's batch norm and ReLU.

    Why: traced, inductor fuses the step gradient's sum into the neighbouring batch norm's
    backward reductions, and on an H200 some of those fused kernels took 0.18-0.36 ms, where the
    Triton backward passes over the same tensor in about 0.02 ms. Under CUDA graphs, where a
    step is GPU-bound, resnet18 b128 224x224 W4A4 took 11.5 ms a step with this against 12.3 ms
    traced. Without CUDA graphs a step is bound by the host, and the op's dispatch costs more
    than it saves (26.5 against 19.1 ms). `LsqQuantizer.opaque_backward` picks this class;
    lsq.train.use_opaque_backward sets it for compile=reduce-overhead on CUDA.
    """

    @staticmethod
    def backward(ctx, grad):
        v, step = ctx.saved_tensors
        backward = torch.ops.lsq.backward if torch.compiler.is_compiling() else _backward_any
        grad_v, grad_step = backward(v, step, grad, ctx.qn, ctx.qp, ctx.g)
        return grad_v, grad_step, None, None, None


def _backward_any(v: torch.Tensor, step: torch.Tensor, grad: torch.Tensor, qn: int, qp: int,
                  g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LsqFunction's backward on the fast path or the eager one: (grad_v, grad_step), grad_v in
    v's dtype and strides, grad_step = g * sum(eq. 3) in the step's shape."""
    fast = _fast_path(v)
    if fast is not None:
        grad_v, grad_step = fast.backward(v, step, grad, qn, qp, g)
    else:
        grad_v, grad_s = _backward(v, step.clamp_min(STEP_EPS), grad, qn, qp)
        grad_step = (grad_s * g).reshape(step.shape)
    if grad_v.stride() != v.stride():  # the layout the fake below promises the compiler
        grad_v = torch.empty_like(v).copy_(grad_v)
    return grad_v, grad_step


_backward_op = torch.library.custom_op("lsq::backward", _backward_any, mutates_args=())


@_backward_op.register_fake
def _(v, step, grad, qn, qp, g):
    return torch.empty_like(v), torch.empty_like(step)


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
        self.opaque_backward = False  # inside torch.compile: LsqFunctionOpaqueBackward
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
        if not math.isfinite(value := float(step)):  # one device sync, once per quantizer
            raise ValueError(f"cannot initialize the step size of a {self.bits}-bit {self.kind} quantizer: "
                             f"2 * mean(|v|) / sqrt(Qp) = {value} (its {self.kind} holds NaN or infinite values)")
        if value == 0.0:
            warnings.warn(f"{self.kind} quantizer initialized from all-zero values: its step size starts at "
                          f"{STEP_EPS:g} and every value it quantizes clips until the gradient raises it")
        self.step.copy_(step)
        self.initialized.fill_(True)
        self._init_known = True

    def prepare(self, v: torch.Tensor) -> None:
        """Initialize the step from v if v is the first (non-empty) training batch; forward calls
        this, as does a layer that applies the quantizer itself (QConv2d on the image)."""
        if not self._init_known:
            if bool(self.initialized):
                self._init_known = True
            elif self.training and v.numel():  # an empty batch has no mean: the next one initializes
                self.init_step(v)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return v
        self.prepare(v)
        function = LsqFunctionOpaqueBackward if self.opaque_backward else LsqFunction
        return function.apply(v, self.step, self.qn, self.qp, self.grad_scale_factor(v))

    def is_initialized(self) -> bool:
        """Read the `initialized` flag (one device sync) and cache it for forward."""
        self._init_known = self.bits is None or bool(self.initialized)
        return self._init_known

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_known = False  # re-read the loaded flag on the next forward

    def extra_repr(self) -> str:
        if self.bits is None:
            return "bits=None (FP32)"
        return f"bits={self.bits}, signed={self.signed}, kind={self.kind}, range=[-{self.qn}, {self.qp}]"


# ------------------------------------------------------------------ compact saved tensors
# A quantized layer's op (conv, linear) saves its quantized input and weight for backward. In
# QAT that is an fp32 copy of every activation on top of the one FP32 training keeps (the
# quantizer saves its own input v, which the ReLU before it keeps anyway). But v_hat = k * s
# with an integer k in [-Qn, Qp], so the op's saved copy is stored as k (1 byte per element)
# plus s, and rebuilt for backward as the very same product k * s: bit for bit the tensor the
# forward used (tests/test_layers.py checks this and the gradients). Under bf16 autocast the
# activations' v_hat is bf16(k * s), 2 bytes: rebuilt as the same product and the same cast.


def _codes(v_hat: torch.Tensor, s: torch.Tensor, signed: bool) -> torch.Tensor:
    """k = v_hat / s as int8 (uint8 for unsigned ranges). For a float32 v_hat = k * s the
    quotient is k within a few ulps, so round() recovers k exactly (|k| <= 255); for a bfloat16
    one within |k| * 2^-8, so exactly for |k| <= 127 (`_compact` allows no more)."""
    fast = _fast_path(v_hat)
    if fast is not None:
        return fast.encode(v_hat, s, signed)
    x = v_hat / s if v_hat.dtype == torch.float32 else v_hat.float().div_(s)  # one temporary, not three
    return x.round_().to(torch.int8 if signed else torch.uint8)


def _decode(codes: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * s in float32, then in `dtype`: the forward's very product, and its very cast."""
    fast = _fast_path(s)  # s: a float32 scalar on the codes' device
    v_hat = fast.decode(codes, s) if fast is not None and _dense(codes) else codes.float().mul_(s)
    return v_hat if dtype == torch.float32 else v_hat.to(dtype)


def _compact(q: LsqQuantizer, out: torch.Tensor) -> bool:
    """Whether `out` = k * s, saved for backward, can be kept as its codes k and rebuilt bit for
    bit. bfloat16 (CUDA autocast: the activations) has 8 significant bits, so only for |k| <= 127:
    every range up to 7 bits, not the 8-bit first and last layers."""
    if q.bits is None or not out.requires_grad:
        return False
    return out.dtype == torch.float32 or (out.dtype == torch.bfloat16 and max(q.qn, q.qp) <= 127)


def save_as_codes(*pairs):
    """Context for one layer's op: `pairs` are (quantizer, its output). While the op runs, an
    output (or a view of it: linear saves w_hat.t()) that autograd saves for backward is kept as
    1-byte codes instead of a float copy, and rebuilt as codes * s when backward unpacks it.
    float32 outputs, and bfloat16 ones of ranges up to 7 bits (`_compact`); others are saved as
    they are, as is autocast's bfloat16 copy of a float32 weight. A no-op where nothing is saved
    (inference), under torch.compile (which plans its own saved tensors) and for FP32
    quantizers. Hooks the caller has set (offloading, a memory probe) still see what is saved:
    they get the codes."""
    # autograd keeps both hooks with every saved tensor until backward, so they hold no tensor:
    # an output is recognized by the address of its storage
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # first: nothing below is traceable
        return contextlib.nullcontext()
    targets = [(q, out.dtype, out.untyped_storage().data_ptr()) for q, out in pairs if _compact(q, out)]
    if not targets:
        return contextlib.nullcontext()
    outer_pack, outer_unpack = torch._C._autograd._top_saved_tensors_default_hooks(False) or (None, None)

    def pack(t):
        s = None  # None: t as autograd gave it (e.g. autocast's bf16 copy of a float32 weight)
        ptr, dtype = t.untyped_storage().data_ptr(), t.dtype
        for q, out_dtype, out_ptr in targets:
            if ptr == out_ptr and dtype == out_dtype:
                s = q.step.detach().clamp_min(STEP_EPS)  # the forward's s: the same op on the same value
                t = _codes(t.detach(), s, q.signed)  # in t's layout: elementwise ops keep strides
                break
        return s, dtype, (outer_pack(t) if outer_pack else t)

    def unpack(packed):
        s, dtype, t = packed
        t = outer_unpack(t) if outer_unpack else t
        return t if s is None else _decode(t, s, dtype)  # the forward's k * s, bit for bit

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# ------------------------------------------------------------------------------ fast paths
# The eager path above runs about a dozen passes over the tensor per call. These do the very
# same arithmetic in one pass forward and one backward. Only speed differs: every element
# gets the same float32 operations in the same order (the step gradient's sum is accumulated
# in another order, in double precision on the CPU).

# True: the fast kernels where they build; False: the eager path. None: the environment variable
# LSQ_FAST_PATH decides, read at the first call (tests and benchmarks set True or False).
FAST_PATH: bool | None = None


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off in any case; unset or empty
    is `default`. Anything else is a ValueError naming the variable, its value and what is allowed."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={value!r}: allowed: 1, true, yes, on or 0, false, no, off "
                     "(any case), or unset")


def fast_path_on() -> bool:
    """FAST_PATH, from LSQ_FAST_PATH (default on) the first time; ValueError for a value it cannot read."""
    global FAST_PATH
    if FAST_PATH is None:
        FAST_PATH = env_switch("LSQ_FAST_PATH", True)
    return FAST_PATH

_C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* v_hat = round(clip(v/s, -Qn, Qp)) * s   (eq. 1-2). Written with comparisons, not fminf, so
   that NaN propagates as in torch.clamp; nearbyintf rounds half to even, as torch.round. */
void lsq_forward(const float *restrict v, float *restrict out, int64_t n,
                 float s, float qn, float qp, int threads) {
    #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
    for (int64_t i = 0; i < n; i++) {
        float x = v[i] / s;
        x = x < -qn ? -qn : x;
        x = x > qp ? qp : x;
        out[i] = nearbyintf(x) * s;
    }
}

/* grad_v = grad * [-Qn < v/s < Qp]   (eq. 5, on the unrounded v/s)
   returns sum(grad * ds), ds = round(v/s) - v/s inside, -Qn below, Qp above   (eq. 3) */
double lsq_backward(const float *restrict v, const float *restrict grad, float *restrict grad_v,
                    int64_t n, float s, float qn, float qp, int threads) {
    double sum = 0.0;
    #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768) reduction(+:sum)
    for (int64_t i = 0; i < n; i++) {
        float x = v[i] / s;
        int below = x <= -qn, above = x >= qp, inside = !(below | above);
        grad_v[i] = grad[i] * (float)inside;
        float ds = inside ? nearbyintf(x) - x : (below ? -qn : qp);
        sum += (double)(grad[i] * ds);
    }
    return sum;
}

/* A saved v_hat = k * s as its integer k, one byte each, and back: the very same float32
   product k * s (tests/test_layers.py). */
void lsq_encode(const float *restrict v, void *restrict codes, int64_t n, float s, int is_signed, int threads) {
    if (is_signed) {
        int8_t *c = codes;
        #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
        for (int64_t i = 0; i < n; i++) c[i] = (int8_t)nearbyintf(v[i] / s);
    } else {
        uint8_t *c = codes;
        #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
        for (int64_t i = 0; i < n; i++) c[i] = (uint8_t)nearbyintf(v[i] / s);
    }
}

void lsq_decode(const void *restrict codes, float *restrict out, int64_t n, float s, int is_signed, int threads) {
    if (is_signed) {
        const int8_t *c = codes;
        #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
        for (int64_t i = 0; i < n; i++) out[i] = (float)c[i] * s;
    } else {
        const uint8_t *c = codes;
        #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
        for (int64_t i = 0; i < n; i++) out[i] = (float)c[i] * s;
    }
}
"""


def _build_c_library():
    """Compile _C_SOURCE and load it. The library is cached on disk, keyed by the source, the
    compiler, its flags and the CPU (-march=native code must not run on another CPU)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found")
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    folders = [os.environ.get("LSQ_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lsq"),
               tempfile.gettempdir()]
    errors = []
    # -fno-trapping-math: the compiler may evaluate both sides of a select (no program here looks
    # at floating-point exception flags), which is what lets the backward's loop vectorize
    # without AVX-512's masks: 4 ms -> 1 ms for 2M values on an AVX2 CPU. The values are the same.
    for flags in (["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"],
                  ["-O3", "-fno-trapping-math"]):  # OpenMP is optional
        key = hashlib.sha1("\0".join([_C_SOURCE, cc, *flags, platform.machine(), cpu]).encode()).hexdigest()
        for folder in folders:
            path = os.path.join(folder, f"lsq_kernels_{key[:16]}.so")
            try:
                if not os.path.exists(path):
                    _compile(cc, flags, path)
                return _load(path)
            except OSError as e:  # e.g. a read-only home: try the next folder
                errors.append(f"{folder}: {e}")
            except subprocess.CalledProcessError as e:  # these flags do not work here
                errors.append(f"{cc} {' '.join(flags)}: {(e.stderr or '').strip()[-300:]}")
                break
    raise RuntimeError("could not build the C kernels: " + "; ".join(errors))


def _compile(cc: str, flags: list[str], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src, lib = os.path.join(tmp, "lsq_kernels.c"), os.path.join(tmp, "lsq_kernels.so")
        with open(src, "w") as f:
            f.write(_C_SOURCE)
        subprocess.run([cc, *flags, "-fPIC", "-shared", src, "-o", lib],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(lib, path)  # atomic: a concurrent trial sees no half-written library


def _load(path: str):
    lib = ctypes.CDLL(path)
    f32, i64, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p
    lib.lsq_forward.argtypes = [ptr, ptr, i64, f32, f32, f32, ctypes.c_int]
    lib.lsq_forward.restype = None
    lib.lsq_backward.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32, ctypes.c_int]
    lib.lsq_backward.restype = ctypes.c_double
    for f in (lib.lsq_encode, lib.lsq_decode):
        f.argtypes = [ptr, ptr, i64, f32, ctypes.c_int, ctypes.c_int]
        f.restype = None
    return lib


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


class _CpuKernels:
    """float32 CPU tensors, contiguous or channels_last: the C loops above over the storage."""

    def __init__(self):
        self.lib = _build_c_library()

    def accepts(self, v: torch.Tensor) -> bool:
        return v.device.type == "cpu" and v.dtype == torch.float32 and _dense(v)

    # A small weight's call is mostly the Python around the loops (16x16x3x3: 10 us of C in about
    # 130 us), so it stays lean: the step read as a Python float, and its gradient made in one op.
    # Reading it through clamp_min and scaling a tensor of the sum cost about 40 us more a call
    # (bench/RESULTS.md, tenth session).

    @staticmethod
    def step_value(step) -> float:
        """float(step.clamp_min(STEP_EPS)) without the tensor op: the same float32 value once the
        call passes it as a C float, and a NaN step stays NaN (max returns its first argument
        unless the second compares greater)."""
        return max(step.item(), STEP_EPS)

    def forward(self, v, step, qn, qp):
        out = torch.empty_like(v)  # same strides as v: both loops walk the storage in order
        self.lib.lsq_forward(v.data_ptr(), out.data_ptr(), v.numel(), self.step_value(step), qn, qp,
                             torch.get_num_threads())
        return out

    def backward(self, v, step, grad, qn, qp, g):
        if grad.dtype != v.dtype or grad.stride() != v.stride():
            grad = torch.empty_like(v).copy_(grad)
        grad_v = torch.empty_like(v)
        total = self.lib.lsq_backward(v.data_ptr(), grad.data_ptr(), grad_v.data_ptr(), v.numel(),
                                      self.step_value(step), qn, qp, torch.get_num_threads())
        return grad_v, torch.full(step.shape, total * g, dtype=step.dtype)  # g * the double sum, rounded once

    def encode(self, v, s, signed):
        codes = torch.empty_like(v, dtype=torch.int8 if signed else torch.uint8)  # v's strides
        self.lib.lsq_encode(v.data_ptr(), codes.data_ptr(), v.numel(), float(s), int(signed), torch.get_num_threads())
        return codes

    def decode(self, codes, s):
        out = torch.empty_like(codes, dtype=torch.float32)
        self.lib.lsq_decode(codes.data_ptr(), out.data_ptr(), codes.numel(), float(s),
                            int(codes.dtype == torch.int8), torch.get_num_threads())
        return out


_kernels: dict = {}  # device type -> kernels, or None where they could not be built


def _checked(fast, device: torch.device):
    """`fast` once it has built and run on `device` and agreed with the eager path on a small
    tensor of each dtype the trainer feeds it (float32 weights, bfloat16 activations): the
    forward (also for a step below STEP_EPS, which it must clamp), grad_v and the codes bit for
    bit, and g times the step gradient to 1e-4 (a sum in another order). Raises otherwise, so
    that a GPU or Triton version the kernels do not work on falls back to the eager path with a
    warning, not a failed trial."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen) * 4
    for dtype in (torch.float32, torch.bfloat16):
        v, grad = x.to(device, dtype), torch.randn(3000, generator=gen).to(device, dtype)
        s = torch.tensor(0.3, device=device)
        v_hat = _forward(v, s, 8, 7)
        k = fast.encode(v_hat, s, True)
        grad_v, grad_step = fast.backward(v, s, grad, 8, 7, 0.5)
        eager_v, eager_s = _backward(v, s, grad, 8, 7)
        tiny = torch.tensor(-1.0, device=device)  # below STEP_EPS: the kernels clamp it as clamp_min does
        same = (torch.equal(fast.forward(v, s, 8, 7), v_hat)
                and torch.equal(grad_v, eager_v) and grad_step.shape == s.shape
                and bool(torch.isclose(grad_step, eager_s * 0.5, rtol=1e-4, atol=1e-6))  # a sum in another order
                and torch.equal(fast.forward(v * 1e-7, tiny, 8, 7), _forward(v * 1e-7, tiny.clamp_min(STEP_EPS), 8, 7))
                and torch.equal(k.float(), torch.clamp(v.float() / s, -8, 7).round())
                and torch.equal(fast.decode(k, s), k.float() * s))
        if not same:
            raise RuntimeError(f"{type(fast).__name__} disagrees with the eager path on {dtype}")
    return fast


def _fast_path(v: torch.Tensor):
    """The fast kernels for v, or None for the eager path."""
    if torch.compiler.is_compiling() or not fast_path_on():  # inside a compiled model, stay traceable
        return None
    kind = v.device.type
    if kind not in _kernels:
        _kernels[kind] = None
        try:
            if kind == "cpu":
                _kernels[kind] = _CpuKernels()
            elif kind == "cuda":  # eager CUDA is launch-bound: one Triton launch instead of ~7
                from lsq.kernels_cuda import TritonKernels

                _kernels[kind] = _checked(TritonKernels(), v.device)
        except Exception as e:  # no compiler, no Triton, ...: the eager path does the same math
            warnings.warn(f"LSQ fast path unavailable on {kind} ({e}); using the eager path")
    fast = _kernels[kind]
    return fast if fast is not None and fast.accepts(v) else None
