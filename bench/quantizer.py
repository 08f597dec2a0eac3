"""One LSQ fake-quantization, forward + backward, per call: this project's quantizer against the
paper's reference formulation, PyTorch's fused op, and no quantizer at all.

    python bench/quantizer.py                      # CPU, 2 threads
    python bench/quantizer.py --device cuda
    python bench/quantizer.py --options            # also the implementation options explored

Rows (all measured side by side, interleaved, in one process):
  ours       lsq.quantizer.LsqFunction as the project runs it (fast path where available)
  reference  the paper's formulation as most public LSQ code writes it: grad_scale and
             round_pass as detach tricks, clamp then round
  fused      torch._fake_quantize_learnable_per_tensor_affine (a speed reference only: it tests
             the rounded value for the clip range, so its gradients differ from the paper's in
             the half-step band outside each bound)
  none       no quantizer: v * 1, forward and backward
  empty      an autograd Function with LsqFunction's arguments and saved tensors that only
             allocates its outputs: what any quantizer written as a Python autograd Function
             costs before it computes anything (on CUDA, before its kernel launches)
With --options, also the implementation options explored (see RESULTS.md): the eager path,
eager + a saved mask, torch.compile of the quantizer's functions and the C loop (CPU). On CUDA
"ours" is the Triton kernels of lsq/kernels_cuda.py.

Correctness columns: ours against the paper's formulas in float64 (the step is a power of two,
so v/s is exact and every element must match exactly; the step gradient to 1e-5).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from _common import interleaved, median, ms, paired_ratio, pick_device, record, sync, table  # noqa: I001

from lsq import quantizer as Q
from lsq.kernels_cpu import CpuKernels

# (name, shape, kind, bits, signed): resnet20 / CIFAR activations and weights, resnet18 at 224
SHAPES = [
    ("act resnet20 stage 1", (128, 16, 32, 32), "activation", 4, False),
    ("act resnet20 stage 3", (128, 64, 8, 8), "activation", 4, False),
    ("act resnet18 224 b32", (32, 64, 56, 56), "activation", 4, False),
    ("weight 16x16x3x3", (16, 16, 3, 3), "weight", 4, True),
    ("weight 64x64x3x3", (64, 64, 3, 3), "weight", 4, True),
    ("weight 512x512x3x3", (512, 512, 3, 3), "weight", 4, True),
]


# ------------------------------------------------------------------------- the reference
def grad_scale(x, scale):
    return (x - x * scale).detach() + x * scale


def round_pass(x):
    return (x.round() - x).detach() + x


def reference(v, s, qn, qp, g):
    s = grad_scale(s, g)
    return round_pass((v / s).clamp(-qn, qp)) * s


# ------------------------------------------------------------------------- options explored
class MaskFunction(torch.autograd.Function):
    """Option: eager, forward also saves a 1-byte `inside` mask; backward uses
    dv_hat/ds = round(clip(x)) - x * inside (the same per-element values as eq. 3)."""

    @staticmethod
    def forward(ctx, v, step, qn, qp, g):
        s = step.clamp_min(Q.STEP_EPS)
        x = v / s
        inside = (x > -qn) & (x < qp)
        ctx.save_for_backward(v, s, inside)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return x.clamp_(-qn, qp).round_().mul_(s)

    @staticmethod
    def backward(ctx, grad):
        v, s, inside = ctx.saved_tensors
        x = v / s
        ds = x.clamp(-ctx.qn, ctx.qp).round_().sub_(x.mul_(inside))
        grad_s = torch.dot(grad.reshape(-1), ds.reshape(-1)) * ctx.g
        return grad * inside, grad_s.reshape(s.shape), None, None, None


class EmptyFunction(torch.autograd.Function):
    """The floor of a Python autograd Function: LsqFunction's arguments and saved tensors, its
    outputs allocated (empty_like) and never computed."""

    @staticmethod
    def forward(ctx, v, step, qn, qp, g):
        ctx.save_for_backward(v, step)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return torch.empty_like(v)

    @staticmethod
    def backward(ctx, grad):
        v, step = ctx.saved_tensors
        return torch.empty_like(v), torch.empty_like(step), None, None, None


def kernel_function(kernels):
    """LsqFunction's body with given forward/backward kernels (the fast paths' interface: they
    take the raw step and return its gradient times g)."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v, step, qn, qp, g):
            ctx.save_for_backward(v, step)
            ctx.qn, ctx.qp, ctx.g = qn, qp, g
            return kernels.forward(v, step, qn, qp)

        @staticmethod
        def backward(ctx, grad):
            v, step = ctx.saved_tensors
            grad_v, grad_step = kernels.backward(v, step, grad, ctx.qn, ctx.qp, ctx.g)
            return grad_v, grad_step, None, None, None

    return F


# ------------------------------------------------------------------------- checks
def check_against_paper(v, s, qn, qp, g, up, function=Q.LsqFunction):
    """(elements of forward or grad_v that differ from the paper, relative error of grad_s)."""
    vv, ss = v.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    out = function.apply(vv, ss, qn, qp, g)
    out.backward(up)
    x = v.detach().double().cpu().numpy() / float(s)
    u = up.double().cpu().numpy()
    inside = (x > -qn) & (x < qp)
    ds = np.where(inside, np.round(x) - x, np.where(x <= -qn, -float(qn), float(qp)))
    ref_gs = (u * ds).sum() * g
    bad = int((out.detach().double().cpu().numpy() != np.round(np.clip(x, -qn, qp)) * float(s)).sum())
    bad += int((vv.grad.double().cpu().numpy() != u * inside).sum())
    scale = np.abs(u * ds).sum() * g
    return bad, abs(float(ss.grad) - ref_gs) / max(abs(ref_gs), 1e-6 * scale)


# An option explored (and measured slower than eager on an H100): the quantizer's two
# functions through torch.compile, one fused Triton kernel each way.
class _CompiledKernels:
    """CUDA: _forward and _backward through torch.compile, each one fused kernel (Triton).

    torch.compile builds on the first call; if that fails, the eager path takes over for good.
    """

    def __init__(self):
        from torch._inductor import config

        # Triton's x / y is an approximate division unless asked for eager's IEEE rounding.
        options = (
            {"eager_numerics.division_rounding": True}
            if hasattr(config, "eager_numerics")
            else {"emulate_divison_rounding": True}
            if hasattr(config, "emulate_divison_rounding")
            else {}
        )
        self.compiled = {
            f: torch.compile(f, dynamic=True, options=options) for f in (Q.eager_forward, Q.eager_backward)
        }

    def accepts(self, v: torch.Tensor) -> bool:
        return v.device.type == "cuda" and v.is_floating_point()

    def _call(self, f, *args):
        try:
            return self.compiled[f](*args)
        except Exception as e:
            warnings.warn(f"LSQ fast path failed to compile ({type(e).__name__}: {e}); using the eager path")
            return f(*args)

    def forward(self, v, step, qn, qp):
        return self._call(Q.eager_forward, v, step.clamp_min(Q.STEP_EPS), qn, qp)

    def backward(self, v, step, grad, qn, qp, g):
        grad_v, grad_s = self._call(Q.eager_backward, v, step.clamp_min(Q.STEP_EPS), grad, qn, qp)
        return grad_v, (grad_s * g).reshape(step.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default: 30 CPU, 50 CUDA)")
    p.add_argument("--shapes", help="comma-separated indices into the shape list (default: all)")
    p.add_argument(
        "--options",
        action="store_true",
        help="also time the options explored: eager path, eager + saved mask, torch.compile, "
        "the C loop (CPU)",
    )
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rounds = args.rounds or (50 if device.type == "cuda" else 30)
    inner = 20 if device.type == "cuda" else 1  # CUDA: time 20 calls between syncs
    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]

    impls = {"ours": Q.LsqFunction}
    compile_note = ""
    if args.options:
        impls["ours, eager path"] = Q.LsqFunction  # run with Q.FAST_PATH off, see call()
        impls["eager + saved mask"] = MaskFunction
        kernels = _CompiledKernels()
        impls["torch.compile"] = kernel_function(kernels)
        if device.type == "cpu":
            impls["C loop"] = kernel_function(CpuKernels())
    fast = Q.fast_path(torch.empty(1, device=device))
    path = {None: "eager (no fast path here)"}.get(fast, type(fast).__name__)

    rows, ratio_rows = [], []
    for name, shape, kind, bits, signed in shapes:
        qn, qp = Q.qrange(bits, signed)
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(shape, generator=gen)
        v = (v.relu() if not signed else v).to(device)
        s0 = 2 * v.abs().mean().item() / math.sqrt(qp)
        s = torch.tensor(2.0 ** round(math.log2(s0)), device=device)  # power of two: v/s exact
        n = v[0].numel() if kind == "activation" else v.numel()
        g = 1.0 / math.sqrt(n * qp)
        up = torch.randn(shape, generator=gen).to(device)
        zero = torch.zeros(1, device=device)

        if "torch.compile" in impls:  # build it now, outside the timed rounds
            sync(device)
            t0 = time.perf_counter()
            vv = v.clone().requires_grad_(True)
            impls["torch.compile"].apply(vv, s.clone().requires_grad_(True), qn, qp, g).backward(up)
            sync(device)
            compile_note += f"\ntorch.compile: first call on {name} took {time.perf_counter() - t0:.1f} s."

        vl, sl = v.clone().requires_grad_(True), s.clone().requires_grad_(True)

        def call(f, fast_path=True):
            def run():
                vl.grad = sl.grad = None
                Q.FAST_PATH = fast_path  # read in forward and in backward
                f().backward(up)
                Q.FAST_PATH = True

            return run

        fns = {
            k: call(lambda f=f: f.apply(vl, sl, qn, qp, g), fast_path=k != "ours, eager path")
            for k, f in impls.items()
        }
        fns["reference"] = call(lambda: reference(vl, sl, qn, qp, g))
        fns["fused"] = call(
            lambda: torch._fake_quantize_learnable_per_tensor_affine(vl, sl.reshape(1), zero, -qn, qp, g)
        )
        fns["none"] = call(lambda: vl * 1)
        fns["empty"] = call(lambda: EmptyFunction.apply(vl, sl, qn, qp, g))
        runs = interleaved(fns, rounds, 3, device, inner)
        times = {k: median(t) for k, t in runs.items()}

        def ratio(k, base):
            return f"{paired_ratio(runs, k, base):.2f}"

        bad, gs_err = check_against_paper(v, s, qn, qp, g, up)
        row = {"shape": f"{name} {'x'.join(map(str, shape))}", "bits": f"{bits}{'s' if signed else 'u'}"}
        row.update({f"{k} ms": ms(t) for k, t in times.items()})
        rows.append(row)
        ratio_rows.append(
            {
                "shape": row["shape"],
                "ours / fused": ratio("ours", "fused"),
                "ours / reference": ratio("ours", "reference"),
                "ours / none": ratio("ours", "none"),
                "empty / fused": ratio("empty", "fused"),
                **{f"{k} / fused": ratio(k, "fused") for k in impls if k != "ours"},
                "elements != paper": bad,
                "step grad rel. err": f"{gs_err:.1e}",
            }
        )
        print(row, ratio_rows[-1], flush=True)

    body = (
        f"fast path: {path}; medians of {rounds} interleaved rounds"
        f"{f' of {inner} calls each' if inner > 1 else ''}, ms per fwd+bwd call.\n\n"
        + table(rows)
        + "\n\nRatios (median of per-round ratios; target: ours / fused <= 0.6):\n\n"
        + table(ratio_rows)
        + ("\n" + compile_note if compile_note else "")
    )
    record(f"Quantizer fwd+bwd per call ({device.type})", device, body, append=not args.no_append)


if __name__ == "__main__":
    main()
