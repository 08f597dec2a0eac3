"""The quantizer's CPU fast path: the eager path's float32 arithmetic as one C loop each way,
compiled with the system's C compiler on first use, cached on disk and called through ctypes.
Only the step gradient's sum runs in another order (in double precision)."""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from .quantizer import STEP_EPS, dense

C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* v_hat = round(clip(v/s, -Qn, Qp)) * s (eq. 1-2). Comparisons, not fminf, so that NaN passes as
   in torch.clamp; nearbyintf rounds half to even, as torch.round. */
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

/* grad_v = grad * [-Qn < v/s < Qp] (eq. 5, on the unrounded v/s); returns sum(grad * ds),
   ds = round(v/s) - v/s inside, -Qn below, Qp above (eq. 3) */
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

/* A saved v_hat = k * s as its k in one byte (int8 and uint8 share k mod 256), and back. */
void lsq_encode(const float *restrict v, uint8_t *restrict codes, int64_t n, float s, int threads) {
    #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
    for (int64_t i = 0; i < n; i++) codes[i] = (uint8_t)(int)nearbyintf(v[i] / s);
}

void lsq_decode(const int8_t *restrict k, float *restrict out, int64_t n, float s, int is_signed, int threads) {
    #pragma omp parallel for simd schedule(static) num_threads(threads) if(n >= 32768)
    for (int64_t i = 0; i < n; i++) out[i] = (float)(is_signed ? k[i] : (uint8_t)k[i]) * s;
}
"""


def build_library():
    """Compile C_SOURCE (or reuse the cached library) and load it. The cache is keyed by the
    source, the compiler, its flags and the CPU, since -march=native code must not run elsewhere."""
    if not (cc := shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")):
        raise RuntimeError("no C compiler found")
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    cache = os.environ.get("LSQ_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lsq")
    errors = []
    # -fno-trapping-math lets the backward's selects vectorize without AVX-512 masks; same values.
    for flags in (["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"], ["-O3", "-fno-trapping-math"]):
        key = hashlib.sha1("\0".join([C_SOURCE, cc, *flags, platform.machine(), cpu]).encode()).hexdigest()
        # the cache, else a fresh private folder: never a fixed shared path another user could fill first
        for folder in (cache, None):
            try:
                path = os.path.join(folder or tempfile.mkdtemp(prefix="lsq-kernels-"), f"lsq_{key[:16]}.so")
                if not os.path.exists(path):
                    compile_library(cc, flags, path)
                return ctypes.CDLL(path)
            except OSError as e:  # e.g. a read-only home: a private folder next
                errors.append(f"{folder or 'a temporary folder'}: {e}")
            except subprocess.CalledProcessError as e:  # these flags do not work here (no OpenMP)
                errors.append(f"{cc} {' '.join(flags)}: {(e.stderr or '').strip()[-300:]}")
                break
    raise RuntimeError("could not build the C kernels: " + "; ".join(errors))


def compile_library(cc: str, flags: list[str], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        lib = os.path.join(tmp, "lsq_kernels.so")
        cmd = [cc, *flags, "-fPIC", "-shared", "-x", "c", "-", "-o", lib]  # the source on stdin
        subprocess.run(cmd, input=C_SOURCE, check=True, capture_output=True, text=True, timeout=120)
        os.replace(lib, path)  # atomic: a concurrent trial sees no half-written library


class CpuKernels:
    """The fast path's interface for dense float32 CPU tensors: the C loops over their storage."""

    def __init__(self):
        self.lib = lib = build_library()
        f32, i64, ptr, i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.lsq_forward.argtypes = [ptr, ptr, i64, f32, f32, f32, i32]  # (void: the int it returns is unused)
        lib.lsq_backward.argtypes = [ptr, ptr, ptr, i64, f32, f32, f32, i32]
        lib.lsq_backward.restype = ctypes.c_double
        lib.lsq_encode.argtypes = [ptr, ptr, i64, f32, i32]
        lib.lsq_decode.argtypes = [ptr, ptr, i64, f32, i32, i32]

    def accepts(self, v: torch.Tensor) -> bool:
        return v.device.type == "cpu" and v.dtype == torch.float32 and dense(v)

    def run(self, name: str, *args):  # lib.<name>(*args, threads), a tensor as its data pointer
        args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        return getattr(self.lib, name)(*args, torch.get_num_threads())

    def forward(self, v, step, qn, qp):
        out = torch.empty_like(v)  # v's strides: both loops walk the storage in order
        self.run("lsq_forward", v, out, v.numel(), max(step.item(), STEP_EPS), qn, qp)  # (NaN stays NaN)
        return out

    def backward(self, v, step, grad, qn, qp, g):
        if grad.dtype != v.dtype or grad.stride() != v.stride():
            grad = torch.empty_like(v).copy_(grad)
        grad_v, s = torch.empty_like(v), max(step.item(), STEP_EPS)
        total = self.run("lsq_backward", v, grad, grad_v, v.numel(), s, qn, qp)
        return grad_v, torch.full(step.shape, total * g, dtype=step.dtype)  # g * the double sum, rounded once

    def encode(self, v, s, signed):
        k = torch.empty_like(v, dtype=torch.int8 if signed else torch.uint8)  # v's strides
        self.run("lsq_encode", v, k, v.numel(), float(s))
        return k

    def decode(self, k, s):
        out = torch.empty_like(k, dtype=torch.float32)
        self.run("lsq_decode", k, out, k.numel(), float(s), int(k.dtype == torch.int8))
        return out
