"""One training step (forward, backward, SGD step): FP32 against W8A8, W4A4 and W2A2 QAT
(first/last layer w8a8, the paper's setting), all in one process, interleaved.

    python bench/train_step.py                                  # CPU: resnet20 b128 32x32, resnet18 b32 64x64
    python bench/train_step.py --device cuda --models resnet20:128:32,resnet18:256:224 --compile fp32,w4a4

The step is the trainer's (lsq/train.py): cross-entropy, zero_grad(set_to_none), backward, SGD
with momentum, in the trainer's memory layout (lsq.train.uses_channels_last); on CUDA also its
bf16 autocast. The batch is random data held on the device, so only the model is timed.

Memory, per config:
  peak   the step's high-water mark of allocated bytes above what was live before it, plus the
         model's own parameters and optimizer state. CUDA: torch.cuda.max_memory_allocated.
         CPU: the same from the profiler's memory timeline (torch's CPU allocator keeps no
         statistics; the process's RSS, used before, moved by 10-20 % from run to run).
  saved  bytes that autograd keeps for backward (saved_tensors_hooks, each storage counted
         once), the parameters themselves left out (they are live anyway): what QAT adds to the
         activation memory, exactly. --bf16 shows it under CUDA's bf16 autocast on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from _common import interleaved, median, ms, paired_ratio, pick_device, record, sync, table  # noqa: I001

from lsq import quantizer as Q
from lsq.layers import QConv2d
from lsq.models import TORCHVISION, build_model
from lsq.policy import BitPolicy, init_steps, quantize_model
from lsq.train import param_groups, use_opaque_backward, uses_channels_last

BITS = {"fp32": None, "w8a8": 8, "w4a4": 4, "w2a2": 2}
DGRAD = "-dgrad"  # e.g. w4a4-dgrad: the image's step gradient through the first conv's input gradient


def config_bits(name: str) -> int | None:
    return BITS[name.removesuffix(DGRAD)]


def known(name: str) -> bool:
    base = name.removesuffix(DGRAD)
    return base in BITS and (base == name or BITS[base] is not None)


def num_classes(model_name: str) -> int:
    return 1000 if model_name in TORCHVISION else 10  # ImageNet / CIFAR-10


def parse_specs(p: argparse.ArgumentParser, models: str, configs: str) -> tuple[list, list[str]]:
    """--models (model:batch:image_size, comma-separated) and --configs (names in BITS, a quantized
    one optionally with -dgrad), checked."""
    unknown = [c for c in configs.split(",") if not known(c)]
    if unknown:
        p.error(
            f"--configs: {', '.join(unknown)} unknown (allowed: {', '.join(BITS)}; a quantized one "
            f"with {DGRAD}, e.g. w4a4{DGRAD})"
        )
    specs = []
    for spec in models.split(","):
        parts = spec.split(":")
        if len(parts) != 3 or not all(n.isdigit() and int(n) > 0 for n in parts[1:]):
            p.error(f"--models: {spec!r} is not model:batch:image_size (e.g. resnet20:128:32)")
        specs.append((parts[0], int(parts[1]), int(parts[2])))
    return specs, configs.split(",")


def batch(model_name: str, n: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of n images and labels (seed 0), contiguous in NCHW."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes(model_name), (n,), generator=gen).to(device)
    return x, y


class Setup:
    """A model in one config, its optimizer, and a step like Trainer.train_one_epoch's."""

    def __init__(
        self, name, model_name, bits, x, y, device, compile_mode=None, bf16=False, channels_last=None
    ):
        torch.manual_seed(0)
        model = build_model(model_name, num_classes(model_name))
        if bits is not None:
            quantize_model(model, BitPolicy(bits, bits))  # first/last: w8a8
            if name.removesuffix(" compiled").endswith(
                DGRAD
            ):  # the image's quantizer and conv each on their own
                for m in model.modules():
                    if isinstance(m, QConv2d):
                        m.image_conv_devices = ()
        cuda = device.type == "cuda"
        if channels_last is None:  # the trainer's layout
            channels_last = uses_channels_last(device, model_name)
        self.model = model.to(
            device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        if bits is not None:
            init_steps(self.model, x)
        self.opt = torch.optim.SGD(param_groups(self.model, 1e-4), lr=0.01, momentum=0.9)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cuda or bf16 else None
        self.name, self.x, self.y, self.device = name, x, y, device
        self.compile_seconds = None
        self.cudagraphs = compile_mode == "reduce-overhead"
        if compile_mode:
            use_opaque_backward(self.model, compile_mode, device)  # as the trainer does
            self.model = torch.compile(self.model, mode=compile_mode)
            sync(device)
            t0 = time.perf_counter()
            self.step()
            self.step()
            sync(device)
            self.compile_seconds = time.perf_counter() - t0

    def step(self):
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.autocast:
            with self.autocast():
                loss = F.cross_entropy(self.model(self.x), self.y)
        else:
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state_bytes(self) -> int:
        """Parameters, buffers and optimizer state: what stays live between steps."""
        own = [*self.model.parameters(), *self.model.buffers()]
        own += [t for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in own)

    def saved_bytes(self) -> int:
        storages = {}
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}  # live anyway

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if self.autocast:
                with self.autocast():
                    loss = F.cross_entropy(self.model(self.x), self.y)
            else:
                loss = F.cross_entropy(self.model(self.x), self.y)
        del loss
        return sum(storages.values())


# ------------------------------------------------------------------------- peak memory
def _cpu_allocated_peak(step) -> int:
    """How far step() raises the bytes held by torch's CPU allocator: the high-water mark of its
    memory timeline (every allocation and free, as the profiler records them) above its start.
    The CPU's counterpart of torch.cuda.max_memory_allocated; exact, unlike the process's RSS."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline is deprecated in favour of CUDA-only tools
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step()
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(categories) for categories in sizes]
    return max(totals) - totals[0]


def step_peak_bytes(setup: Setup) -> int | None:
    """How far one step raises allocated memory above what was live before it (None: cannot tell here)."""
    device = setup.device
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        return _cpu_allocated_peak(setup.step)
    except Exception as e:  # a profiler that cannot export a timeline: say so, do not guess
        print(f"no CPU memory timeline ({type(e).__name__}: {e}); peak memory n/a")
        return None


def mb(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--models", default="resnet20:128:32,resnet18:32:64", help="comma-separated model:batch:image_size"
    )
    p.add_argument(
        "--configs",
        default="fp32,w8a8,w4a4,w2a2",
        help=f"from {', '.join(BITS)}; a quantized one with {DGRAD} (e.g. w4a4{DGRAD}) takes the image's "
        "step gradient through the first conv's input gradient (on CUDA the path lsq.layers.ImageConv "
        "replaced; on the CPU the trainer's own)",
    )
    p.add_argument(
        "--compile", default="", help="configs to also time under torch.compile(model), e.g. fp32,w4a4"
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead"],
        help="torch.compile mode for --compile (reduce-overhead: CUDA graphs too)",
    )
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default: 10 CPU, 30 CUDA)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="CPU: bf16 autocast as on CUDA (for its saved bytes: the CPU's bf16 times mean little)",
    )
    p.add_argument("--eager-quantizer", action="store_true", help="LSQ_FAST_PATH=0: the eager quantizer")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.eager_quantizer:
        Q.FAST_PATH = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rounds = args.rounds or (30 if device.type == "cuda" else 10)
    specs, configs = parse_specs(p, args.models, args.configs)
    compiled = [c for c in args.compile.split(",") if c]

    rows, notes = [], []
    for model_name, n, size in specs:
        x, y = batch(model_name, n, size, device)
        if uses_channels_last(device, model_name):
            x = x.contiguous(memory_format=torch.channels_last)

        setups = {c: Setup(c, model_name, config_bits(c), x, y, device, bf16=args.bf16) for c in configs}
        for c in compiled:
            setups[c + " compiled"] = Setup(
                c + " compiled",
                model_name,
                config_bits(c),
                x,
                y,
                device,
                compile_mode=args.compile_mode,
                bf16=args.bf16,
            )
            notes.append(
                f"{model_name} {c}: torch.compile(mode={args.compile_mode!r})'s first two steps took "
                f"{setups[c + ' compiled'].compile_seconds:.1f} s"
            )
        for s in setups.values():  # warm-up outside the timed rounds (cudnn.benchmark, allocator)
            s.step()
        runs = interleaved({k: s.step for k, s in setups.items()}, rounds, 2, device)
        t = {k: median(v) for k, v in runs.items()}

        # memory: one step each, after the timed ones (allocated bytes are deterministic)
        peak = {k: step_peak_bytes(s) for k, s in setups.items()}
        peak = {k: (None if v is None else v + setups[k].state_bytes()) for k, v in peak.items()}
        # what autograd saves: eager configs only (a compiled graph plans its own saved tensors,
        # and probing it with hooks would recompile it)
        saved = {k: (None if "compiled" in k else s.saved_bytes()) for k, s in setups.items()}

        base = "fp32" if "fp32" in setups else next(iter(setups))
        for k in setups:
            ref = base if "compiled" not in k or base + " compiled" not in setups else base + " compiled"
            rows.append(
                {
                    "model": f"{model_name} b{n} {size}x{size}",
                    "config": k,
                    "ms / step": ms(t[k]),
                    "images / s": f"{n / t[k]:.0f}",
                    f"time / {ref}": f"{paired_ratio(runs, k, ref):.2f}",
                    "peak MB": mb(peak[k]),
                    "peak ratio": "n/a"
                    if peak[k] is None or peak[ref] is None
                    else f"{peak[k] / peak[ref]:.2f}",
                    "saved MB": mb(saved[k]),
                    "saved ratio": "n/a"
                    if saved[k] is None or saved[ref] is None
                    else f"{saved[k] / saved[ref]:.2f}",
                }
            )
            print(rows[-1], flush=True)
        del setups

    cols = ["model", "config", "ms / step", "images / s"]
    cols += sorted({c for r in rows for c in r if c.startswith("time / ")})
    cols += ["peak MB", "peak ratio", "saved MB", "saved ratio"]
    rows = [{c: r.get(c, "") for c in cols} for r in rows]
    fast = Q.fast_path(torch.empty(1, device=device))
    amp = "bf16 autocast" if device.type == "cuda" or args.bf16 else "float32"
    body = (
        f"Quantizer: {'eager path' if fast is None else type(fast).__name__}; {amp}. Medians of {rounds} "
        "interleaved rounds; time ratios are medians of per-round ratios against FP32 (compiled configs against "
        "compiled FP32 where both ran). Targets: W4A4 / FP32 time <= 1.3 (CPU, resnet20 b128), "
        "<= 1.25 (H100, resnet18); peak memory <= 1.3x FP32.\n\n"
        + table(rows, cols)
        + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
    )
    record(f"Training step, FP32 vs QAT ({device.type})", device, body, append=not args.no_append)


if __name__ == "__main__":
    main()
