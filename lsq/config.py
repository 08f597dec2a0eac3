"""TrialConfig: the one schema for a trial.

Every key, its type, default and allowed values live here and nowhere else. The single-run
CLI (`python -m lsq.train`), the search spaces (`lsq/space.py`), the Tune trainable and the
reports all read this file. A user's mistake raises `ConfigError` with one message that names
the key, the value and what is allowed.

Bits: an int in 2..8, or None for FP32. 32 is accepted in input as an alias of None.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

MODELS = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet18", "resnet34", "resnet50")
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's own format


def data_layout(dataset: str, root: str) -> str | None:
    """Which layout of `dataset` the folder `root` holds, judged from its folders alone (no file
    is read, no torch imported): "torchvision" (CIFAR's own format), "imagefolder" (train/ and
    test/, ImageNet's train/ and val/) or None. lsq.data reads what this finds; the sweep checks
    with it before anything starts."""
    has = lambda *names: all(os.path.isdir(os.path.join(root, n)) for n in names)  # noqa: E731
    if dataset in CIFAR_FOLDERS and has(CIFAR_FOLDERS[dataset]):
        return "torchvision"
    return "imagefolder" if has("train", "test" if dataset in CIFAR_FOLDERS else "val") else None


def data_missing(dataset: str, root: str) -> str | None:
    """What the folder `root` lacks for `dataset` (`data_layout`): None where it holds a layout
    lsq.data reads, else the layouts that were looked for. The embedded digits need no folder."""
    if dataset == "digits" or data_layout(dataset, root):
        return None
    if dataset in CIFAR_FOLDERS:
        return f"neither {CIFAR_FOLDERS[dataset]}/ (torchvision's format) nor train/ and test/ (ImageFolder)"
    return "no train/ and val/ (ImageFolder, val/ sorted into class folders)"
# First/last-layer presets: name -> (weight bits, activation bits); "body" means the body's bits.
PRESETS = {
    "body": ("body", "body"),
    "fp32": (None, None),
    "w_body_a_fp32": ("body", None),
    "w8_a_fp32": (8, None),
    "w8a8": (8, 8),
}
PRESET_WORDS = {
    "body": "same bits as the body",
    "fp32": "FP32",
    "w_body_a_fp32": "weights at body bits, input FP32",
    "w8_a_fp32": "weights 8-bit, input FP32",
    "w8a8": "8-bit weights and input",
}
BIT_RANGE = (2, 8)
INT_MAX = 2**63 - 1  # any integer key
PATH_KEYS = ("data_dir", "init_from")  # the keys that name a file or folder
_EXPLICIT_END = re.compile(r"^w(\d+)a(\d+)$")


class ConfigError(ValueError):
    """A user's mistake in a config, a search space or a command line. Printed without traceback."""


def not_a_file(path: str) -> str:
    """Why `path`, which os.path.isfile refused, is not a checkpoint file: for a folder, the
    checkpoint.pt a sweep's trial keeps in its checkpoint_NNNNNN folders, if it holds one."""
    if not os.path.isdir(path):
        return "no such file"
    inside = os.path.join(path, "checkpoint.pt")
    return f"is a folder, not a file{f'; it holds the checkpoint file {inside}' if os.path.isfile(inside) else ''}"


def _choice(*allowed):
    return {"choices": allowed}


@dataclass(frozen=True)
class TrialConfig:
    """One training run. Field metadata holds the allowed values; `help` feeds the CLIs."""

    model: str = field(default="resnet20", metadata={**_choice(*MODELS), "help": "network"})
    dataset: str = field(default="digits", metadata={**_choice(*DATASETS), "help": "data set"})
    data_dir: str | None = field(default=None, metadata={"help": "data set folder (not digits)"})
    init_from: str | None = field(
        default=None,
        metadata={"help": "FP32 checkpoint path, or 'torchvision' for model-zoo weights"},
    )
    w_bits: int | None = field(default=4, metadata={"bits": True, "help": "body weight bits; None/32 = FP32"})
    a_bits: int | None = field(default=4, metadata={"bits": True, "help": "body activation bits; None/32 = FP32"})
    first: str = field(
        default="w8a8",
        metadata={"end": True, "help": "first conv: a preset (%s) or explicit wXaY" % ", ".join(PRESETS)},
    )
    last: str = field(
        default="w8a8",
        metadata={"end": True, "help": "last linear: a preset (%s) or explicit wXaY" % ", ".join(PRESETS)},
    )
    epochs: int = field(default=10, metadata={"min": 1, "help": "training epochs"})
    lr: float = field(default=0.01, metadata={"min": 0.0, "exclusive": True, "help": "peak learning rate"})
    wd: float = field(default=1e-4, metadata={"min": 0.0, "help": "weight decay"})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "help": "SGD momentum"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum"})
    schedule: str = field(default="cosine", metadata={**_choice("cosine", "step"), "help": "LR schedule"})
    lr_step_size: int = field(default=30, metadata={"min": 1, "help": "step schedule: epochs per decay"})
    lr_gamma: float = field(default=0.1, metadata={"min": 0.0, "exclusive": True, "help": "step schedule: decay factor"})
    warmup_epochs: int = field(default=0, metadata={"min": 0, "help": "linear LR warm-up epochs"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "training batch size"})
    seed: int = field(default=0, metadata={"min": 0, "help": "random seed"})
    grad_scale_n: str = field(
        default="per_sample",
        metadata={**_choice("per_sample", "numel"), "help": "N in the step-size gradient scale 1/sqrt(N*Qp)"},
    )
    grad_scale: bool = field(default=True, metadata={"help": "scale the step-size gradient (False: g = 1)"})
    step_wd: bool = field(default=False, metadata={"help": "apply weight decay to step sizes too"})
    workers: int = field(default=4, metadata={"min": 0, "help": "DataLoader workers (ImageNet only)"})
    device: str = field(default="auto", metadata={**_choice("auto", "cpu", "cuda"), "help": "training device"})
    compile: str = field(
        default="none",
        metadata={**_choice("none", "default", "reduce-overhead"),
                  "help": "torch.compile the model with this mode (reduce-overhead: CUDA graphs too); "
                          "costs up to a minute of compiling in the first epoch, and falls back to eager "
                          "if the first compiled step's gradients disagree with eager"},
    )
    amp: bool = field(
        default=True,
        metadata={"help": "CUDA: train under bf16 autocast, fast, but a conv/linear then sees bf16(k*s), up to "
                          "|k|/256 of a step from k*s (at 8 bits, adjacent levels can merge); false: float32 "
                          "with TF32 off, each quantized value k*s to float32 precision. The CPU always trains in float32"},
    )
    deploy_check: bool = field(
        default=True,
        metadata={"sweep_only": True,
                  "help": "after the last epoch, run the deployment check (integer inference and the ONNX "
                          "export, lsq/export.py) on the whole test split, on the CPU: about 3 minutes for "
                          "CIFAR-10 on 2 threads, while the trial holds its GPU; never for ImageNet (a "
                          "sweep's trials only: `python -m lsq.train` has `python -m lsq.export` for it)"},
    )

    # ----------------------------------------------------------------- construction
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrialConfig":
        """Validate a plain mapping (from YAML, a CLI or Tune) into a TrialConfig."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
        for key in values:
            check_key(key, where)
        kwargs = {k: coerce(k, v, where) for k, v in values.items()}
        cfg = cls(**kwargs)
        cfg._check_cross(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def _check_cross(self, where: str) -> None:
        if self.nesterov and self.momentum == 0:  # torch.optim.SGD refuses it when the trial starts
            raise ConfigError(f"{where}: key 'nesterov' = True needs momentum > 0 (momentum = 0); "
                              "allowed: nesterov false, or a momentum in (0, 1]")
        if self.dataset != "digits" and not self.data_dir:
            raise ConfigError(f"{where}: key 'data_dir' is required for dataset '{self.dataset}' (only 'digits' is embedded)")
        if self.init_from and self.init_from != "torchvision" and not os.path.isfile(self.init_from):
            raise ConfigError(
                f"{where}: key 'init_from' = {self.init_from!r}: {not_a_file(self.init_from)} "
                "(allowed: a path to an FP32 checkpoint, or 'torchvision')"
            )
        if self.init_from == "torchvision" and self.model not in ("resnet18", "resnet34", "resnet50"):
            raise ConfigError(
                f"{where}: key 'init_from' = 'torchvision' needs a torchvision model "
                f"(resnet18, resnet34, resnet50), not {self.model!r}"
            )

    # ----------------------------------------------------------------- derived values
    @property
    def is_fp32(self) -> bool:
        """The FP32 baseline: an FP32 body keeps the whole model FP32, whatever first/last say."""
        return self.w_bits is None and self.a_bits is None

    def end_bits(self, end: str) -> tuple[int | None, int | None]:
        """Resolved (weight bits, activation bits) of the 'first' or 'last' layer."""
        return resolve_end(getattr(self, end), self.w_bits, self.a_bits, end)

    def normalized(self) -> "TrialConfig":
        """Canonical form used to find duplicate cells: the FP32 baseline ignores first/last."""
        if self.is_fp32:
            return dataclasses.replace(self, first="fp32", last="fp32")
        return self

    def identity(self) -> tuple:
        """Two configs with equal identity train the same network the same way."""
        n = self.normalized()
        d = n.to_dict()
        d["first"], d["last"] = n.end_bits("first"), n.end_bits("last")
        return tuple(sorted(d.items(), key=lambda kv: kv[0]))

    def label(self) -> str:
        """W4A4 / W4A32 / FP32, as in the tables."""
        if self.is_fp32:
            return "FP32"
        return f"W{self.w_bits or 32}A{self.a_bits or 32}"


# --------------------------------------------------------------------------------- helpers
_FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}


def check_key(key: str, where: str = "config") -> None:
    if key not in _FIELDS:
        close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint}; allowed keys: {', '.join(_FIELDS)}")


def _bits(key: str, value: Any, where: str) -> int | None:
    lo, hi = BIT_RANGE
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "fp32", "32")):
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or int(value) != value):
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected bits {lo}..{hi}, or None/32 for FP32")
    value = int(value)
    if value == 32:
        return None
    if not lo <= value <= hi:
        raise ConfigError(f"{where}: key '{key}' = {value}: bits must be in {lo}..{hi}, or None/32 for FP32")
    return value


def resolve_end(spec: str, w_bits: int | None, a_bits: int | None,
                key: str = "end") -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of an end layer given its preset and the body's bits."""
    spec = _end(key, spec, "policy")  # a ConfigError for an unknown preset, also when used directly
    if w_bits is None and a_bits is None:
        return (None, None)
    if spec in PRESETS:
        w, a = PRESETS[spec]
        return (w_bits if w == "body" else w, a_bits if a == "body" else a)
    m = _EXPLICIT_END.match(spec)
    w, a = (_bits("end", int(m.group(i)), "end") for i in (1, 2))
    return (w, a)


def _end(key: str, value: Any, where: str) -> str:
    allowed = f"a preset ({', '.join(PRESETS)}) or explicit 'wXaY' with X, Y in {BIT_RANGE[0]}..{BIT_RANGE[1]} or 32"
    if not isinstance(value, str):
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected {allowed}")
    v = value.strip().lower()
    if v in PRESETS:
        return v
    m = _EXPLICIT_END.match(v)
    if m:
        for g in (1, 2):
            try:
                _bits(key, int(m.group(g)), where)  # range check
            except ConfigError:  # name the whole value the user wrote, not just one number
                raise ConfigError(f"{where}: key '{key}' = {value!r}: bits {m.group(g)} out of range; "
                                  f"allowed: {allowed}") from None
        return v
    close = difflib.get_close_matches(v, list(PRESETS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"{where}: key '{key}' = {value!r}: unknown preset{hint}; allowed: {allowed}")


def _type_name(tp: str) -> str:
    return tp.replace(" | None", " or None")


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """Check and convert one value for one key. Raises ConfigError naming key, value, allowed."""
    check_key(key, where)
    f = _FIELDS[key]
    meta, tp = f.metadata, str(f.type)
    if meta.get("bits"):
        return _bits(key, value, where)
    if meta.get("end"):
        return _end(key, value, where)
    if value is None:
        if "None" in tp:
            return None
        raise ConfigError(f"{where}: key '{key}' = None: expected {_type_name(tp)}")
    if tp.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: key '{key}' = {value!r}: expected true or false")
    if tp.startswith("int"):
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected an integer")
        if value > INT_MAX:  # the reports store every key in a 64-bit column; torch seeds take no more
            raise ConfigError(f"{where}: key '{key}' = {value}: must be <= {INT_MAX} (2^63 - 1)")
    elif tp.startswith("float"):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a finite number")
        value = float(value)
    elif tp.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' = {value!r}: expected a string")
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: key '{key}' = {value!r}: unknown {key}{hint}; allowed: {', '.join(meta['choices'])}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive") and value == lo)):
        rel = ">" if meta.get("exclusive") else ">="
        raise ConfigError(f"{where}: key '{key}' = {value!r}: must be {rel} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: key '{key}' = {value!r}: must be <= {hi}")
    return value
