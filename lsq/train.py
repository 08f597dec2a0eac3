"""The trainer for one trial, without Ray, and `python -m lsq.train`. Its checkpoint is torchvision's
reference-script dict (model, optimizer, lr_scheduler, epoch, ...), loaded with weights_only=True."""

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

from .cli import EXIT_HELP, OK, run_command
from .config import ConfigError, TrialConfig
from .data import CIFAR_CLASSES, DATA_DIR_FLAG, load_data
from .files import write_problem
from .models import CIFAR_DEPTHS, build_model, load_error, load_fp32, read_state_dict
from .policy import BitPolicy, quantize_model, quantizers
from .quantizer import fast_path_on


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a stored one is unreadable or belongs elsewhere."""


def uses_channels_last(device: torch.device, model_name: str) -> bool:
    """channels_last on CUDA (cuDNN's fast kernels), and on the CPU where it measured faster."""
    return device.type == "cuda" or model_name in CIFAR_DEPTHS


def use_opaque_backward(model: torch.nn.Module, compile_mode: str, device: torch.device) -> None:
    """Under CUDA graphs (a GPU-bound step) one opaque backward op is faster than traced equations."""
    for q in quantizers(model):
        q.opaque_backward = compile_mode == "reduce-overhead" and device.type == "cuda"


def precision(device: torch.device, amp: bool):
    """The context each batch runs in: bf16 autocast on CUDA with amp, else none. TF32 rounds the
    grid v_bar * s (eq. 2) as bf16 does, so amp=false turns it off too (process-wide, every trial)."""
    if device.type != "cuda":
        return contextlib.nullcontext
    torch.backends.cudnn.allow_tf32 = amp
    torch.backends.cuda.matmul.allow_tf32 = False
    return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext


def param_groups(model: torch.nn.Module, wd: float, step_wd: bool = False) -> list[dict]:
    """Weight decay on weights; LSQ step sizes excluded unless step_wd (BN params decay as usual)."""
    steps = [p for n, p in model.named_parameters() if n.endswith(".step")]
    rest = [p for n, p in model.named_parameters() if not n.endswith(".step")]
    return [{"params": rest, "weight_decay": wd}, {"params": steps, "weight_decay": wd if step_wd else 0.0}]


def lr_factor(cfg: TrialConfig, epoch: int) -> float:
    """LR factor of a 0-based epoch: linear warm-up, then cosine without restarts (the paper's) or steps."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    e, span = epoch - cfg.warmup_epochs, max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * e / span))
    return cfg.lr_gamma ** (e // cfg.lr_step_size)


class Trainer:
    """One trial from a TrialConfig, yielding metrics epoch by epoch. `data_dir_flag`: for messages."""

    def __init__(self, cfg: TrialConfig, data_dir_flag: str = DATA_DIR_FLAG):
        self.cfg = cfg
        try:  # a bad LSQ_FAST_PATH is the user's error: told now, as one
            fast_path_on()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("key 'device' = 'cuda': no CUDA device is available here (allowed: auto, cpu)")
        self.device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # every draw of the data path
        channels_last = uses_channels_last(self.device, cfg.model)
        self.data = load_data(cfg, self.device, self.generator, channels_last, data_dir_flag)
        model = build_model(cfg.model, self.data.num_classes, self.data.in_channels)
        if cfg.init_from:
            load_fp32(model, cfg.init_from, cfg.model)
        policy = BitPolicy(cfg.w_bits, cfg.a_bits, cfg.first, cfg.last)
        quantize_model(model, policy, grad_scale_n=cfg.grad_scale_n, grad_scale=cfg.grad_scale)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)  # eager: state dicts, diagnostics
        use_opaque_backward(self.model, cfg.compile, self.device)
        self.compiled = None  # torch.compile of self.model (one graph per batch shape), made by `net`
        groups = param_groups(model, cfg.wd, cfg.step_wd)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: lr_factor(cfg, e))
        self.autocast = precision(self.device, cfg.amp)
        torch.backends.cudnn.benchmark = self.device.type == "cuda"
        self.epoch, self.best_top1, self.history = 0, 0.0, []  # epochs completed, best top-1, metrics

    @property
    def net(self) -> torch.nn.Module:
        """The module that runs a batch: with compile, eager until every step size is initialized
        (initialization reads the data: it would split the graph), then the compiled one."""
        if self.compiled is None:
            if self.cfg.compile == "none" or not all(q.is_initialized() for q in quantizers(self.model)):
                return self.model
            self.compiled = torch.compile(self.model, mode=self.cfg.compile, dynamic=False)
        if self.cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: last step's graph outputs are free
        return self.compiled

    def train_one_epoch(self) -> float:
        self.model.train()
        total, count = torch.zeros((), device=self.device), 0
        for step, (images, labels) in enumerate(self.data.train):
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = F.cross_entropy(self.net(images), labels)
            loss.backward()
            self.optimizer.step()
            total, count = total + loss.detach() * len(labels), count + len(labels)
            if step % 50 == 0 and not torch.isfinite(total):  # a sync every 50 steps, not every step
                break
        train_loss = float(total) / max(count, 1)
        if not math.isfinite(train_loss):
            raise DivergedError(f"training loss became {train_loss} in epoch {self.epoch + 1}")
        return train_loss

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        loss, top1, top5, n = torch.zeros((), device=self.device), 0, 0, 0
        for images, labels in self.data.test:
            with self.autocast():
                logits = self.net(images).float()
            loss += F.cross_entropy(logits, labels, reduction="sum")
            hits = logits.topk(min(5, self.data.num_classes), dim=1).indices == labels[:, None]
            top1, top5, n = top1 + hits[:, 0].sum(), top5 + hits.any(dim=1).sum(), n + len(labels)
        return {"top1": 100.0 * float(top1) / n, "top5": 100.0 * float(top5) / n, "loss": float(loss) / n}

    def epochs(self):
        """Train the remaining epochs; yield the metrics of each as it completes."""
        while self.epoch < self.cfg.epochs:
            lr, t0 = self.optimizer.param_groups[0]["lr"], time.perf_counter()
            train_loss = self.train_one_epoch()
            speed = self.data.train_size / (time.perf_counter() - t0)  # training images per second
            metrics = self.evaluate()
            self.lr_scheduler.step()
            self.epoch, self.best_top1 = self.epoch + 1, max(self.best_top1, metrics["top1"])
            metrics = {"epoch": self.epoch, **metrics, "train_loss": train_loss, "best_top1": self.best_top1}
            metrics.update(lr=lr, epoch_seconds=time.perf_counter() - t0, images_per_second=speed)
            self.history.append(metrics)
            yield metrics

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {k: getattr(self, k).state_dict() for k in ("model", "optimizer", "lr_scheduler")}
        state.update(epoch=self.epoch, best_top1=self.best_top1, config=self.cfg.to_dict())
        return {**state, "history": self.history, "rng": rng, "version": 1}  # (version of this layout)

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
        for k in ("model", "optimizer", "lr_scheduler"):
            getattr(self, k).load_state_dict(state[k])
        self.epoch, self.best_top1 = int(state["epoch"]), float(state["best_top1"])
        self.history, rng = list(state.get("history", [])), state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def same_trial(stored: dict | None, cfg: TrialConfig) -> bool:
    """Whether a checkpoint's config is this trial's: only where and how it runs may differ, not what
    is trained; a key the checkpoint predates counts as its default."""
    resumable = ("data_dir", "epochs", "workers", "device", "init_from", "compile", "deploy_check")
    if not isinstance(stored, dict):
        return False
    mine, stored = cfg.to_dict(), {**TrialConfig().to_dict(), **stored}
    return set(stored) == set(mine) and all(stored[k] == v for k, v in mine.items() if k not in resumable)


def read_checkpoint(path: str) -> dict:
    """Load a trainer checkpoint safely (weights_only=True); CheckpointError if it is unusable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated, not a checkpoint, or a pickle that would run code)
        raise CheckpointError(f"checkpoint {path} is unreadable ({load_error(e)})") from None
    keys = ("model", "optimizer", "lr_scheduler", "epoch", "rng")
    missing = [k for k in keys if not (isinstance(state, dict) and k in state)]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a trainer checkpoint (missing {', '.join(missing)})")
    return state


def check_init_from(cfg: TrialConfig) -> None:
    """Before a sweep starts: cfg.init_from loads and fits cfg.model on cfg.dataset, or ConfigError
    names the keys that don't. Reads no data (ImageNet's classes: its folders, or the file's fc)."""
    if not cfg.init_from or cfg.init_from == "torchvision":
        return  # torchvision weights always fit; fetching them is the trial's job
    classes = 10 if cfg.dataset == "digits" else CIFAR_CLASSES.get(cfg.dataset)
    train = os.path.join(cfg.data_dir or "", "train")
    if classes is None and os.path.isdir(train):  # imagenet
        classes = sum(1 for e in os.scandir(train) if e.is_dir())
    elif classes is None:
        fc = read_state_dict(cfg.init_from).get("fc.weight")
        classes = fc.shape[0] if fc is not None and fc.dim() == 2 else 1000
    load_fp32(build_model(cfg.model, classes, 1 if cfg.dataset == "digits" else 3), cfg.init_from, cfg.model)


def format_metrics(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']:>3}/{epochs}  lr {m['lr']:.4g}  train_loss {m['train_loss']:.4f}  "
        f"loss {m['loss']:.4f}  top1 {m['top1']:6.2f}  top5 {m['top5']:6.2f}  "
        f"best {m['best_top1']:6.2f}  {m['epoch_seconds']:.1f}s  {m['images_per_second']:.0f} img/s"
    )


def parse_args(argv=None) -> tuple[TrialConfig, argparse.Namespace]:
    """Flags come from TrialConfig, so the CLI never defines a key or a default of its own."""
    p = argparse.ArgumentParser(prog="python -m lsq.train", description="Train one LSQ trial, no Ray.")
    p.epilog, p.argument_default = EXIT_HELP, argparse.SUPPRESS  # (unset flags stay out of `args`)
    for f in dataclasses.fields(TrialConfig):
        if not f.metadata.get("sweep_only"):  # (what the Tune trainable does after training)
            text = f"{f.metadata.get('help', '')} (default: {f.default})"
            names = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
            p.add_argument(*names, dest=f.name, metavar=f.name.upper(), help=text)
    p.add_argument("--bit", help="--w_bits and --a_bits where not given (--bit 4 --w_bits 2 is W2A4)")
    p.add_argument("--save", metavar="PATH", help="write the final checkpoint here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrialConfig) if hasattr(args, f.name)}
    if hasattr(args, "bit"):
        values = {"w_bits": args.bit, "a_bits": args.bit, **values}
    return TrialConfig.from_dict({k: _cli_value(k, v) for k, v in values.items()}, where="command line"), args


def _cli_value(key: str, v: str):
    """A number, or None for 'none'/'null' (but for a key that allows the word: compile)."""
    choices = TrialConfig.__dataclass_fields__[key].metadata.get("choices", ())
    if v.lower() in ("none", "null") and "none" not in choices:
        return None
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(v)
    return v


def main(argv=None) -> int:
    run = types.SimpleNamespace(trainer=None, save=None)  # for the Ctrl-C line

    def body() -> int:
        cfg, args = parse_args(argv)
        threads, run.save = getattr(args, "threads", None), getattr(args, "save", None)
        if threads is not None and threads < 1:  # (torch.set_num_threads raises)
            raise ConfigError(f"--threads {threads}: allowed: a whole number >= 1")
        if run.save is not None and (problem := write_problem("--save", run.save)):  # now, not after training
            raise ConfigError(problem)
        if threads:
            torch.set_num_threads(threads)
        run.trainer = t = Trainer(cfg, data_dir_flag="--data_dir")
        ends = "first=fp32 last=fp32" if cfg.is_fp32 else f"first={cfg.first} last={cfg.last}"
        images = f"{t.data.train_size} train / {t.data.test_size} test images"
        print(f"{cfg.label()} {cfg.model} on {cfg.dataset} ({t.device}); {ends}; {images}", flush=True)
        for m in t.epochs():
            print(format_metrics(m, cfg.epochs), flush=True)
        if run.save is not None:
            os.makedirs(os.path.dirname(os.path.abspath(run.save)), exist_ok=True)
            t.save(run.save)
            print(f"saved {run.save}")
        return OK

    def interrupted() -> str:
        t = run.trainer
        done = "before training" if t is None else f"{t.epoch} of {t.cfg.epochs} epochs trained"
        return f"interrupted ({done})" + ("" if run.save is None else f"; nothing saved to {run.save}")

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    return run_command(body, debug, failures=(CheckpointError, DivergedError), interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
