"""TrialConfig: every key of a trial, its type, default and allowed values; a mistake is a ConfigError."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
from typing import Any

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")  # the ones with model-zoo weights
MODELS = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", *TORCHVISION_MODELS)
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's own format


def data_layout(dataset: str, root: str) -> str | None:
    """`dataset`'s layout in `root`: "torchvision", "imagefolder" (train/ + test/ or val/) or None."""
    has = lambda *names: all(os.path.isdir(os.path.join(root, n)) for n in names)  # noqa: E731
    if dataset in CIFAR_FOLDERS and has(CIFAR_FOLDERS[dataset]):
        return "torchvision"
    return "imagefolder" if has("train", "test" if dataset in CIFAR_FOLDERS else "val") else None


def data_missing(dataset: str, root: str) -> str | None:
    """What `root` lacks for `dataset` (what was looked for), or None."""
    if dataset == "digits" or data_layout(dataset, root):
        return None
    if dataset in CIFAR_FOLDERS:
        return f"neither {CIFAR_FOLDERS[dataset]}/ (torchvision's format) nor train/ and test/ (ImageFolder)"
    return "no train/ and val/ (ImageFolder, val/ sorted into class folders)"


# First/last-layer presets: name -> (weight bits, activation bits); "body": the body's bits.
PRESETS = {
    "body": ("body", "body"),
    "fp32": (None, None),
    "w_body_a_fp32": ("body", None),
    "w8_a_fp32": (8, None),
    "w8a8": (8, 8),
}
PATH_KEYS = ("data_dir", "init_from")  # the keys that name a file or folder
_EXPLICIT_END = re.compile(r"^w(\d+)a(\d+)$")
_ENDS = ", ".join(PRESETS)


class ConfigError(ValueError):
    """A user's mistake in a config, a search space or a command line. Printed without traceback."""


def did_you_mean(value: Any, allowed) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _bad(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}' = {value!r}: {why}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bits(key: str, value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "fp32", "32")):
        return None
    if not (is_number(value) and value in (32, *range(2, 9))):
        raise _bad(where, key, value, "bits must be in 2..8, or None/32 for FP32")
    return None if value == 32 else int(value)


def resolve_end(spec: str, w_bits: int | None, a_bits: int | None, key: str = "end") -> tuple:
    """(weight bits, activation bits) of an end layer given its preset and the body's bits."""
    spec = _end(key, spec, "policy")  # a ConfigError for an unknown preset, also when used directly
    if w_bits is None and a_bits is None:
        return (None, None)
    w, a = PRESETS.get(spec) or (None if b == "32" else int(b) for b in _EXPLICIT_END.match(spec).groups())
    return (w_bits if w == "body" else w, a_bits if a == "body" else a)


def _end(key: str, value: Any, where: str) -> str:
    v = value.strip().lower() if isinstance(value, str) else ""
    m = _EXPLICIT_END.match(v)
    if v not in PRESETS and not (m and all(b == "32" or int(b) in range(2, 9) for b in m.groups())):
        why = "bits out of range" if m else f"unknown preset{did_you_mean(v, PRESETS) if v else ''}"
        allowed = f"a preset ({_ENDS}) or 'wXaY' with X, Y in 2..8 or 32"
        raise _bad(where, key, value, f"{why}; allowed: {allowed}")
    return v


def _key(default: Any, help: str, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **rules})


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    model: str = _key("resnet20", "network", choices=MODELS)
    dataset: str = _key("digits", "data set", choices=DATASETS)
    data_dir: str | None = _key(None, "data set folder (not digits)")
    init_from: str | None = _key(None, "FP32 checkpoint path, or 'torchvision' for model-zoo weights")
    w_bits: int | None = _key(4, "body weight bits; None/32 = FP32", check=_bits)
    a_bits: int | None = _key(4, "body activation bits; None/32 = FP32", check=_bits)
    first: str = _key("w8a8", f"first conv: a preset ({_ENDS}) or explicit wXaY", check=_end)
    last: str = _key("w8a8", f"last linear: a preset ({_ENDS}) or explicit wXaY", check=_end)
    epochs: int = _key(10, "training epochs", min=1)
    lr: float = _key(0.01, "peak learning rate", above=0.0)
    wd: float = _key(1e-4, "weight decay", min=0.0)
    momentum: float = _key(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = _key(False, "Nesterov momentum")
    schedule: str = _key("cosine", "LR schedule", choices=("cosine", "step"))
    lr_step_size: int = _key(30, "step schedule: epochs per decay", min=1)
    lr_gamma: float = _key(0.1, "step schedule: decay factor", above=0.0)
    warmup_epochs: int = _key(0, "linear LR warm-up epochs", min=0)
    batch_size: int = _key(128, "training batch size", min=1)
    seed: int = _key(0, "random seed", min=0)
    grad_scale_n: str = _key("per_sample", "N in g = 1/sqrt(N*Qp)", choices=("per_sample", "numel"))
    grad_scale: bool = _key(True, "scale the step-size gradient (False: g = 1)")
    step_wd: bool = _key(False, "apply weight decay to step sizes too")
    workers: int = _key(4, "DataLoader workers (ImageNet only)", min=0)
    device: str = _key("auto", "training device", choices=("auto", "cpu", "cuda"))
    compile: str = _key("none", "torch.compile mode", choices=("none", "default", "reduce-overhead"))
    amp: bool = _key(True, "CUDA: bf16 autocast (false: float32)")
    deploy_check: bool = _key(True, "check integer inference and ONNX export (not ImageNet)", sweep_only=True)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrialConfig":
        """Validate a plain mapping (from YAML, a CLI or Tune) into a TrialConfig, cross-checked."""
        cfg = cls(**{k: coerce(k, v, where) for k, v in values.items()})
        if cfg.nesterov and cfg.momentum == 0:  # torch.optim.SGD refuses it when the trial starts
            raise _bad(where, "nesterov", True, "needs momentum > 0; allowed: false, or a momentum in (0, 1]")
        if cfg.dataset != "digits" and not cfg.data_dir:
            msg = f"{where}: key 'data_dir' is required for dataset '{cfg.dataset}' (only digits is bundled)"
            raise ConfigError(msg)
        if cfg.init_from and cfg.init_from != "torchvision" and not os.path.isfile(cfg.init_from):
            inside = os.path.join(cfg.init_from, "checkpoint.pt")  # what a sweep trial's folder holds
            why = "is a folder, not a file" if os.path.isdir(cfg.init_from) else "no such file"
            why += f"; it holds the checkpoint file {inside}" if os.path.isfile(inside) else ""
            allowed = "(allowed: a path to an FP32 checkpoint, or 'torchvision')"
            raise _bad(where, "init_from", cfg.init_from, f"{why} {allowed}")
        if cfg.init_from == "torchvision" and cfg.model not in TORCHVISION_MODELS:
            why = f"needs a torchvision model ({', '.join(TORCHVISION_MODELS)}), not {cfg.model!r}"
            raise _bad(where, "init_from", cfg.init_from, why)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    @property
    def is_fp32(self) -> bool:
        """The FP32 baseline: an FP32 body keeps the whole model FP32, whatever first/last say."""
        return self.w_bits is None and self.a_bits is None

    def end_bits(self, end: str) -> tuple[int | None, int | None]:
        return resolve_end(getattr(self, end), self.w_bits, self.a_bits, end)

    def identity(self) -> "TrialConfig":
        """Equal for two configs that train the same network the same way: first/last as their bits."""
        return dataclasses.replace(self, first=self.end_bits("first"), last=self.end_bits("last"))

    def label(self) -> str:
        """W4A4 / W4A32 / FP32, as in the tables."""
        return "FP32" if self.is_fp32 else f"W{self.w_bits or 32}A{self.a_bits or 32}"


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """Check and convert one value for one key. Raises ConfigError naming key, value, allowed."""
    fields = {f.name: f for f in dataclasses.fields(TrialConfig)}
    if key not in fields:
        hint = did_you_mean(key, fields)
        raise ConfigError(f"{where}: unknown key '{key}'{hint}; allowed keys: {', '.join(fields)}")
    meta, tp = fields[key].metadata, str(fields[key].type)
    if "check" in meta:  # bits and first/last
        return meta["check"](key, value, where)
    if value is None and "None" in tp:
        return None
    kinds = {"bool": "true or false", "int": "an integer", "float": "a finite number"}
    if isinstance(value, str) and tp in kinds:  # a command line's words
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        with contextlib.suppress(ValueError, KeyError):
            value = {"int": int, "float": float}.get(tp, words.__getitem__)(value.lower())
    ok = {"bool": isinstance(value, bool), "int": is_number(value) and isinstance(value, int)}
    if not {**ok, "float": is_number(value)}.get(tp, isinstance(value, str)):
        raise _bad(where, key, value, f"expected {kinds.get(tp, 'a string')}")
    value = float(value) if tp == "float" else value
    if "choices" in meta and value not in meta["choices"]:
        hint = did_you_mean(value, meta["choices"])
        raise _bad(where, key, value, f"unknown {key}{hint}; allowed: {', '.join(meta['choices'])}")
    for sign, limit in ((">=", meta.get("min")), (">", meta.get("above")), ("<=", meta.get("max"))):
        if limit is not None and not {">=": value >= limit, ">": value > limit, "<=": value <= limit}[sign]:
            raise _bad(where, key, value, f"must be {sign} {limit}")
    return value
