"""The trainer for one trial. No Ray here: it runs on a bare GPU box with only PyTorch.

    cfg -> data, FP32 model (+ init_from weights) -> quantize_model(BitPolicy) -> SGD + schedule
        -> for each epoch: train_one_epoch, evaluate -> metrics (+ a checkpoint, by the caller)

The checkpoint is a dict in the layout of torchvision's reference scripts (`model`, `optimizer`,
`lr_scheduler`, `epoch`) plus ours (`best_top1`, `config`, `history`, `rng`). It is loaded
with weights_only=True. Restoring it continues at the next epoch, bit-identical on the CPU.

Single run from the shell, with the original project's flags:

    python -m lsq.train --epochs 120 --lr 0.01 --bit 4 --dataset cifar10 \\
        --data_dir data/cifar10 --init_from checkpoint/cifar10_resnet_fp32.pth --wd 1e-4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .config import ConfigError, TrialConfig, coerce
from .data import CIFAR_CLASSES, DATA_DIR_FLAG, load_data
from .files import write_problem
from .models import CIFAR_DEPTHS, build_model, load_error, load_fp32, read_state_dict
from .policy import BitPolicy, describe, quantize_model, quantizers
from .quantizer import fast_path_on

CHECKPOINT_VERSION = 1


# torch.set_num_threads takes any positive number, but far above a machine's cores its thread pool
# crashes the process (100000: a segfault); 1024 still works, and exceeds the cores of today's
# largest machines (a few hundred)
MAX_THREADS = 1024


def check_threads(threads: int | None) -> None:
    """ConfigError unless --threads is unset or a whole number in 1..MAX_THREADS."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:  # (torch.set_num_threads raises below 1)
        raise ConfigError(f"--threads {threads}: allowed: a whole number from 1 to {MAX_THREADS}")


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a stored one is unreadable or belongs elsewhere."""


def pick_device(cfg: TrialConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device' = 'cuda': no CUDA device is available here (allowed: auto, cpu)")
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class SGD(torch.optim.SGD):
    """torch.optim.SGD, the same code and the same state dict, without importing torch._dynamo.

    torch.optim's methods are wrapped to keep torch.compile out of them, and each wrapper imports
    torch._dynamo on its first call: about 2 s of every new trial worker's start on 2 cores. The
    trainer never compiles its optimizer, so it calls the methods underneath. `step` keeps what
    its wrapper did besides: no autograd while the parameters are updated. Checkpoints hold
    torch.optim.SGD's state dict, and either class loads the other's.
    """

    # inspect.unwrap: to the function under every wrapper, including the profiling hook that
    # torch.optim.SGD.step gains once any torch.optim.SGD exists (the hook wraps ours as well)
    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    _step = inspect.unwrap(torch.optim.SGD.step)

    @torch.no_grad()
    def step(self, closure=None):
        return SGD._step(self, closure)


def uses_channels_last(device: torch.device, model_name: str) -> bool:
    """The memory layout the trainer runs in. CUDA: channels_last, the layout of cuDNN's fast
    bf16 kernels. CPU: channels_last for the CIFAR ResNets, whose training step it made 1.1-1.25x
    faster, and contiguous for the torchvision ResNets, where it measured 0.98-1.07x the time
    (`python bench/layout.py`, bench/RESULTS.md)."""
    return device.type == "cuda" or model_name in CIFAR_DEPTHS


def use_opaque_backward(model: torch.nn.Module, compile_mode: str, device: torch.device) -> None:
    """Under CUDA graphs (compile=reduce-overhead on CUDA) a training step is GPU-bound, and the
    quantizers' backward runs faster as one opaque op than as traced equations; otherwise the
    step is host-bound and the traced backward is faster (lsq.quantizer.LsqFunctionOpaqueBackward
    has the figures). Sets every quantizer's `opaque_backward` accordingly."""
    on = compile_mode == "reduce-overhead" and device.type == "cuda"
    for q in quantizers(model):
        q.opaque_backward = on


def precision(device: torch.device, amp: bool):
    """The context each batch runs in (a fresh one per use): bf16 autocast on CUDA with amp,
    nothing otherwise. On CUDA it also sets TF32, process-wide and so for every trial a reused
    worker runs: TF32 keeps 10 of float32's 23 mantissa bits, and like bf16 (7) it would round the
    k*s a quantized layer computes with, so amp=false turns it off for convolutions and matrix
    products alike; with amp, the convolutions left in float32 may use it (PyTorch's default)."""
    if device.type != "cuda":
        return contextlib.nullcontext
    torch.backends.cudnn.allow_tf32 = amp
    torch.backends.cuda.matmul.allow_tf32 = False
    return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext


def param_groups(model: torch.nn.Module, wd: float, step_wd: bool = False) -> list[dict]:
    """Weight decay on weights; LSQ step sizes excluded unless step_wd (BN params decay as usual)."""
    steps = [p for n, p in model.named_parameters() if n.endswith(".step")]
    rest = [p for n, p in model.named_parameters() if not n.endswith(".step")]
    return [{"params": rest, "weight_decay": wd},
            {"params": steps, "weight_decay": wd if step_wd else 0.0}]


def compiled_step_faults(named_eager_compiled) -> list[str]:
    """What is wrong with a compiled step's gradients next to eager ones on the same batch, as
    (name, eager grad, compiled grad) triples; [] when they agree. Agreement can only be loose:
    under bf16 autocast a quantized network is chaotic (eager against eager on inputs scaled by
    1 + 1e-3 gives gradient cosines of 0.3-1.0 at W2A2-W8A8, and compiled against eager the
    same), so this catches gross faults, not small ones:
      - a parameter whose eager gradient is non-zero gets none, or zero;
      - the weights' (all but the step sizes) gradient is off by over 2x in norm, or has a
        cosine under 0.1 with eager (noise gave 0.27 or more);
      - the step sizes' gradient is off by over 5x in norm (noise: 0.7-2.1x)."""
    lost, with_grad, groups = [], 0, {"weights": ([], []), "step sizes": ([], [])}
    for name, e, c in named_eager_compiled:
        if e is None:
            continue
        if bool(e.any()):
            with_grad += 1
            if c is None or not bool(c.any()):
                lost.append(name)
        eager, compiled = groups["step sizes" if name.endswith(".step") else "weights"]
        eager.append(e.double().flatten())
        compiled.append((torch.zeros_like(e) if c is None else c).double().flatten())
    faults = [f"no gradient for {len(lost)} of the {with_grad} parameters that have one eager ({', '.join(lost[:3])}"
              f"{', ...' if len(lost) > 3 else ''})"] if lost else []
    for group, (eager, compiled) in groups.items():
        if not eager:
            continue
        e, c = torch.cat(eager), torch.cat(compiled)
        if float(e.norm()) == 0.0:
            continue
        ratio = float(c.norm() / e.norm())
        cosine = float(e @ c / (e.norm() * c.norm())) if ratio > 0 else 0.0
        limit = 5.0 if group == "step sizes" else 2.0
        if not 1 / limit <= ratio <= limit:
            faults.append(f"{group}: gradient norm {ratio:.3g}x eager (allowed {1 / limit:g}-{limit:g}x)")
        elif group == "weights" and cosine < 0.1:
            faults.append(f"{group}: gradient cosine {cosine:.3f} with eager (allowed >= 0.1)")
    return faults


def lr_factor(cfg: TrialConfig, epoch: int) -> float:
    """LR multiplier for a 0-based epoch: linear warm-up, then cosine without restarts or step."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e, span = epoch - cfg.warmup_epochs, max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / span))
    return cfg.lr_gamma ** (e // cfg.lr_step_size)


class Trainer:
    """One trial: build everything from a TrialConfig, then yield metrics epoch by epoch.
    `data_dir_flag`: how the command being run sets key 'data_dir' (the sweep's --set data_dir by
    default), named where the data set is not found."""

    def __init__(self, cfg: TrialConfig, log=None, data_dir_flag: str = DATA_DIR_FLAG):
        self.cfg, self.log = cfg, log or (lambda msg: None)
        try:  # now, not at the first quantizer call: a bad LSQ_FAST_PATH is the user's error, told as one
            fast_path_on()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.device = pick_device(cfg)
        cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # every draw of the data path
        channels_last = uses_channels_last(self.device, cfg.model)
        self.data = load_data(cfg, self.device, self.generator, channels_last=channels_last,
                              data_dir_flag=data_dir_flag)

        model = build_model(cfg.model, self.data.num_classes, self.data.in_channels)
        if cfg.init_from:
            load_fp32(model, cfg.init_from, cfg.model)
        policy = BitPolicy(cfg.w_bits, cfg.a_bits, cfg.first, cfg.last)
        quantize_model(model, policy, grad_scale_n=cfg.grad_scale_n, grad_scale=cfg.grad_scale)
        self.model = model.to(self.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        # self.model is the eager module (state dicts, diagnostics); self.net is what runs the
        # batches: the same module, or torch.compile of it (sharing its parameters)
        use_opaque_backward(self.model, cfg.compile, self.device)
        self.compiled = (None if cfg.compile == "none" else
                         torch.compile(self.model, mode=cfg.compile, dynamic=False))  # one graph per batch shape: train, test, last test batch
        self._compiled_ready = False
        self._compiled_checked = False  # the first compiled step is checked against eager

        self.optimizer = SGD(param_groups(model, cfg.wd, cfg.step_wd), lr=cfg.lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(cfg, e))
        self.autocast = precision(self.device, cfg.amp)
        if cuda:
            torch.backends.cudnn.benchmark = True
        self.epoch = 0  # epochs completed
        self.best_top1 = 0.0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one epoch
    @property
    def net(self) -> torch.nn.Module:
        """The module that runs a batch. With compile: eager until every step size is
        initialized (initialization looks at the data, and would split the compiled graph),
        then the compiled module."""
        if self.compiled is None:
            return self.model
        if not self._compiled_ready:
            self._compiled_ready = all(q.is_initialized() for q in quantizers(self.model))
        if self._compiled_ready and self.cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are free
        return self.compiled if self._compiled_ready else self.model

    def train_one_epoch(self) -> float:
        self.model.train()
        total, count = torch.zeros((), device=self.device), 0
        for step, (images, labels) in enumerate(self.data.train):
            net = self.net
            first_compiled = net is not self.model and not self._compiled_checked
            reference = self._eager_step(images, labels) if first_compiled else None
            with self.autocast():
                loss = F.cross_entropy(net(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if first_compiled:
                self._check_compiled(*reference)
            self.optimizer.step()
            total += loss.detach() * len(labels)
            count += len(labels)
            if step % 50 == 0 and not torch.isfinite(total):  # a sync every 50 steps, not every step
                break
        train_loss = float(total) / max(count, 1)
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss became {train_loss} in epoch {self.epoch + 1}")
        return train_loss

    def _eager_step(self, images, labels):
        """The eager gradients of the batch the compiled model is about to take first, and the
        buffers (BatchNorm statistics) the eager step leaves; the buffers are then put back."""
        before = [b.detach().clone() for b in self.model.buffers()]
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            F.cross_entropy(self.model(images), labels).backward()
        grads = [p.grad for p in self.model.parameters()]
        after = [b.detach().clone() for b in self.model.buffers()]
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), before):
                b.copy_(saved)
        return grads, after

    def _check_compiled(self, eager_grads, eager_buffers) -> None:
        """The compiled step's gradients (in .grad) against the eager ones on the same batch. A
        compiler fault that changes what is learned (torch 2.11 gave no gradient to any LSQ
        weight; see _forward in quantizer.py) makes this trial go on eager, from the eager
        step's gradients and buffers, with a warning."""
        self._compiled_checked = True
        named = list(self.model.named_parameters())
        faults = compiled_step_faults((n, e, p.grad) for (n, p), e in zip(named, eager_grads))
        if not faults:
            self.log(f"compile={self.cfg.compile}: the first compiled step's gradients agree with eager")
            return
        message = (f"compile={self.cfg.compile}: the first compiled step's gradients disagree with eager "
                   f"({'; '.join(faults)}) with torch {torch.__version__} on {self.device.type}; "
                   "this trial goes on without torch.compile")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.compiled = None
        with torch.no_grad():
            for (_, p), e in zip(named, eager_grads):
                p.grad = e
            for b, saved in zip(self.model.buffers(), eager_buffers):
                b.copy_(saved)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        k = min(5, self.data.num_classes)
        loss, top1, topk = (torch.zeros((), device=self.device) for _ in range(3))
        n = 0
        for images, labels in self.data.test:
            with self.autocast():
                logits = self.net(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum")
            hits = logits.topk(k, dim=1).indices == labels[:, None]
            top1 += hits[:, 0].sum()
            topk += hits.any(dim=1).sum()
            n += len(labels)
        return {"top1": 100.0 * float(top1) / n, "top5": 100.0 * float(topk) / n, "loss": float(loss) / n}

    def epochs(self):
        """Train the remaining epochs; yield the metrics of each as it completes."""
        while self.epoch < self.cfg.epochs:
            lr = self.optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            train_loss = self.train_one_epoch()
            train_seconds = time.perf_counter() - t0
            metrics = self.evaluate()
            self.lr_scheduler.step()
            self.epoch += 1
            self.best_top1 = max(self.best_top1, metrics["top1"])
            metrics = {"epoch": self.epoch, **metrics, "train_loss": train_loss, "best_top1": self.best_top1,
                       "lr": lr, "epoch_seconds": time.perf_counter() - t0,
                       "images_per_second": self.data.train_size / train_seconds}
            self.history.append(metrics)
            yield metrics

    def layers(self) -> list[dict]:
        """Per-layer diagnostics: bits, learned step sizes, weight quantization error."""
        return describe(self.model).to_dict("records")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "epoch": self.epoch,
                "best_top1": self.best_top1, "config": self.cfg.to_dict(), "history": self.history,
                "rng": rng, "version": CHECKPOINT_VERSION}

    def save(self, path: str) -> None:
        """Write atomically: a crash or a full disk never leaves a half-written checkpoint."""
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except BaseException as e:  # (Ctrl-C too: no half-written .tmp file left behind)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if isinstance(e, OSError):
                raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}") from None
            raise

    def load(self, path: str) -> None:
        state = read_checkpoint(path)
        if not same_trial(state.get("config"), self.cfg):
            raise CheckpointError(f"checkpoint {path} was written by a different trial config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.best_top1 = int(state["epoch"]), float(state["best_top1"])
        self.history = list(state.get("history", []))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


# keys that may differ between a checkpoint and the run that resumes it
_RESUMABLE_CHANGES = ("data_dir", "epochs", "workers", "device", "init_from", "compile", "deploy_check")


def same_trial(stored: dict | None, cfg: TrialConfig) -> bool:
    """Whether a checkpoint's config is this trial's. A key the checkpoint predates (added in a
    later version) counts as its default, which is what that version trained with."""
    if not isinstance(stored, dict):
        return False
    defaults = TrialConfig().to_dict()

    def fixed(d):
        return {k: v for k, v in {**defaults, **d}.items() if k not in _RESUMABLE_CHANGES}
    return fixed(stored) == fixed(cfg.to_dict())


def read_checkpoint(path: str) -> dict:
    """Load a trainer checkpoint safely (weights_only=True); CheckpointError if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a pickle that would run code
        raise CheckpointError(f"checkpoint {path} is unreadable ({load_error(e)})") from None
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "epoch", "rng") if not (isinstance(state, dict) and k in state)]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a trainer checkpoint (missing {', '.join(missing)})")
    model = state["model"]
    if not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
        # (loading it would fail deep in load_state_dict, or in a comparison of shapes, with a TypeError)
        raise CheckpointError(f"checkpoint {path} is not a trainer checkpoint (its 'model' is of type "
                              f"{type(model).__name__}, not a state dict of tensors)")
    return state


def check_init_from(cfg: TrialConfig) -> None:
    """Before a sweep starts anything: cfg.init_from loads (weights_only=True) and fits cfg.model
    on cfg.dataset, or ConfigError names the keys that don't match. Reads no data: the classes
    and input channels come from the data set's name (ImageNet: the class folders, or the file's)."""
    if not cfg.init_from or cfg.init_from == "torchvision":
        return  # torchvision weights always fit; fetching them is the trial's job
    classes, channels = {"digits": (10, 1), **{k: (n, 3) for k, n in CIFAR_CLASSES.items()}}.get(cfg.dataset, (None, 3))
    if classes is None:  # imagenet
        train = os.path.join(cfg.data_dir or "", "train")
        if os.path.isdir(train):
            classes = sum(1 for e in os.scandir(train) if e.is_dir())
        else:
            fc = read_state_dict(cfg.init_from).get("fc.weight")
            classes = fc.shape[0] if fc is not None and fc.dim() == 2 else 1000
    load_fp32(build_model(cfg.model, classes, channels), cfg.init_from, cfg.model)


def format_metrics(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.4g}  train_loss {m['train_loss']:.4f}  "
            f"loss {m['loss']:.4f}  top1 {m['top1']:6.2f}  top5 {m['top5']:6.2f}  "
            f"best {m['best_top1']:6.2f}  {m['epoch_seconds']:.1f}s  {m['images_per_second']:.0f} img/s")


# ---------------------------------------------------------------------- command line
def parse_args(argv=None) -> tuple[TrialConfig, argparse.Namespace]:
    """Flags come from TrialConfig, so the CLI never defines a key or a default of its own."""
    p = argparse.ArgumentParser(prog="python -m lsq.train", description="Train one LSQ trial, no Ray.",
                                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrialConfig):
        if f.metadata.get("sweep_only"):  # what the Tune trainable does after training, not this CLI
            continue
        names = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        p.add_argument(*sorted(names), dest=f.name, metavar=f.name.upper(),
                       help=f"{f.metadata.get('help', '')} (default: {f.default})")
    p.add_argument("--bit", help="sets --w_bits and --a_bits where they are not given themselves "
                   "(the original project's flag: --bit 4 --w_bits 2 is W2A4)")
    p.add_argument("--save", metavar="PATH", help="write the final checkpoint here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrialConfig) if hasattr(args, f.name)}
    if hasattr(args, "bit"):
        values.setdefault("w_bits", args.bit)
        values.setdefault("a_bits", args.bit)
    # command-line strings: parse each value for its key (e.g. '4', 'None', '1e-4', 'true')
    values = {k: coerce(k, _cli_value(k, v), "command line") for k, v in values.items()}
    return TrialConfig.from_dict(values, where="command line"), args


def _cli_value(key: str, v: str):
    """'none'/'null' is None for a key that can be None (bits, data_dir, ...); for a key whose
    allowed values include the word 'none' (compile) it stays that word."""
    if v.lower() in ("none", "null") and "none" not in TrialConfig.__dataclass_fields__[key].metadata.get("choices", ()):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv=None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    trainer, save, saved = None, None, False  # (for the message of a Ctrl-C: epochs trained, what was saved)
    try:
        cfg, args = parse_args(argv)
        threads, save = getattr(args, "threads", None), getattr(args, "save", None)
        check_threads(threads)
        problem = save is not None and write_problem("--save", save)
        if problem:  # now, not after the training it would throw away
            raise ConfigError(problem)
        if threads:
            torch.set_num_threads(threads)
        trainer = Trainer(cfg, log=lambda message: print(message, flush=True), data_dir_flag="--data_dir")
        print(f"{cfg.label()} {cfg.model} on {cfg.dataset} ({trainer.device}); first={cfg.normalized().first} last={cfg.normalized().last}; "
              f"{trainer.data.train_size} train / {trainer.data.test_size} test images", flush=True)
        for m in trainer.epochs():
            print(format_metrics(m, cfg.epochs), flush=True)
        if save is not None:
            os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
            trainer.save(save)
            saved = True
            print(f"saved {save}")
        return 0
    except (ConfigError, CheckpointError, DivergedError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for SIGINT
        if debug:
            raise
        done = "before training" if trainer is None else f"{trainer.epoch} of {trainer.cfg.epochs} epochs trained"
        kept = "" if save is None else f"; saved {save}" if saved else f"; nothing saved to {save}"
        print(f"interrupted ({done}){kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
