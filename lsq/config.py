"""TrialConfig: every key of a trial, its type, default and allowed values; a mistake is a ConfigError."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")  # the ones with model-zoo weights
MODELS = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", *TORCHVISION_MODELS)
DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's own format


def data_layout(dataset: str, root: str) -> str | None:
    """The layout of `dataset` in `root`, from its folders alone: "torchvision" (CIFAR's own format),
    "imagefolder" (train/ and test/; ImageNet: train/ and val/) or None."""
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


# First/last-layer presets: name -> (weight bits, activation bits, in words); "body": the body's bits.
_PRESETS = {
    "body": ("body", "body", "same bits as the body"),
    "fp32": (None, None, "FP32"),
    "w_body_a_fp32": ("body", None, "weights at body bits, input FP32"),
    "w8_a_fp32": (8, None, "weights 8-bit, input FP32"),
    "w8a8": (8, 8, "8-bit weights and input"),
}
PRESETS = {name: (w, a) for name, (w, a, _) in _PRESETS.items()}
PRESET_WORDS = {name: words for name, (_, _, words) in _PRESETS.items()}
BIT_RANGE = (2, 8)
PATH_KEYS = ("data_dir", "init_from")  # the keys that name a file or folder
_EXPLICIT_END = re.compile(r"^w(\d+)a(\d+)$")
_ENDS = ", ".join(PRESETS)


class ConfigError(ValueError):
    """A user's mistake in a config, a search space or a command line. Printed without traceback."""


def did_you_mean(value: Any, allowed) -> str:
    """' (did you mean 'x'?)' for the allowed value closest to a mistyped one, else ''."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _bad(where: str, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}' = {value!r}: {why}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bits(key: str, value: Any, where: str) -> int | None:
    lo, hi = BIT_RANGE
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "fp32", "32")):
        return None
    if not (is_number(value) and value in (32, *range(lo, hi + 1))):
        raise _bad(where, key, value, f"bits must be in {lo}..{hi}, or None/32 for FP32")
    return None if value == 32 else int(value)


def resolve_end(spec: str, w_bits: int | None, a_bits: int | None, key: str = "end") -> tuple:
    """(weight bits, activation bits) of an end layer given its preset and the body's bits."""
    spec = _end(key, spec, "policy")  # a ConfigError for an unknown preset, also when used directly
    if w_bits is None and a_bits is None:
        return (None, None)
    w, a = PRESETS.get(spec) or (None if b == "32" else int(b) for b in _EXPLICIT_END.match(spec).groups())
    return (w_bits if w == "body" else w, a_bits if a == "body" else a)


def _end(key: str, value: Any, where: str) -> str:
    lo, hi = BIT_RANGE
    v = value.strip().lower() if isinstance(value, str) else ""
    m = _EXPLICIT_END.match(v)
    if v not in PRESETS and not (m and all(b == "32" or lo <= int(b) <= hi for b in m.groups())):
        why = "bits out of range" if m else f"unknown preset{did_you_mean(v, PRESETS) if v else ''}"
        allowed = f"a preset ({_ENDS}) or 'wXaY' with X, Y in {lo}..{hi} or 32"
        raise _bad(where, key, value, f"{why}; allowed: {allowed}")
    return v


def _key(default: Any, help: str, **rules: Any) -> Any:
    """A TrialConfig field: its metadata holds `help` (for the CLIs) and the allowed values."""
    return field(default=default, metadata={"help": help, **rules})


@dataclass(frozen=True)
class TrialConfig:
    """One training run."""

    model: str = _key("resnet20", "network", choices=MODELS)
    dataset: str = _key("digits", "data set", choices=DATASETS)
    data_dir: str | None = _key(None, "data set folder (not digits)")
    init_from: str | None = _key(None, "FP32 checkpoint path, or 'torchvision' for model-zoo weights")
    w_bits: int | None = _key(4, "body weight bits; None/32 = FP32", check=_bits)
    a_bits: int | None = _key(4, "body activation bits; None/32 = FP32", check=_bits)
    first: str = _key("w8a8", f"first conv: a preset ({_ENDS}) or explicit wXaY", check=_end)
    last: str = _key("w8a8", f"last linear: a preset ({_ENDS}) or explicit wXaY", check=_end)
    epochs: int = _key(10, "training epochs", min=1)
    lr: float = _key(0.01, "peak learning rate", min=0.0, exclusive=True)
    wd: float = _key(1e-4, "weight decay", min=0.0)
    momentum: float = _key(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = _key(False, "Nesterov momentum")
    schedule: str = _key("cosine", "LR schedule", choices=("cosine", "step"))
    lr_step_size: int = _key(30, "step schedule: epochs per decay", min=1)
    lr_gamma: float = _key(0.1, "step schedule: decay factor", min=0.0, exclusive=True)
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
        """Validate a plain mapping (from YAML, a CLI or Tune) into a TrialConfig."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
        cfg = cls(**{k: coerce(k, v, where) for k, v in values.items()})
        cfg._check_cross(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def _check_cross(self, where: str) -> None:
        if self.nesterov and self.momentum == 0:  # torch.optim.SGD refuses it when the trial starts
            raise _bad(where, "nesterov", True, "needs momentum > 0; allowed: false, or a momentum in (0, 1]")
        if self.dataset != "digits" and not self.data_dir:
            msg = f"{where}: key 'data_dir' is required for dataset '{self.dataset}' (only digits is bundled)"
            raise ConfigError(msg)
        if self.init_from and self.init_from != "torchvision" and not os.path.isfile(self.init_from):
            inside = os.path.join(self.init_from, "checkpoint.pt")  # what a sweep trial's folder holds
            why = "is a folder, not a file" if os.path.isdir(self.init_from) else "no such file"
            why += f"; it holds the checkpoint file {inside}" if os.path.isfile(inside) else ""
            allowed = "(allowed: a path to an FP32 checkpoint, or 'torchvision')"
            raise _bad(where, "init_from", self.init_from, f"{why} {allowed}")
        if self.init_from == "torchvision" and self.model not in TORCHVISION_MODELS:
            why = f"needs a torchvision model ({', '.join(TORCHVISION_MODELS)}), not {self.model!r}"
            raise _bad(where, "init_from", self.init_from, why)

    @property
    def is_fp32(self) -> bool:
        """The FP32 baseline: an FP32 body keeps the whole model FP32, whatever first/last say."""
        return self.w_bits is None and self.a_bits is None

    def end_bits(self, end: str) -> tuple[int | None, int | None]:
        """Resolved (weight bits, activation bits) of the 'first' or 'last' layer."""
        return resolve_end(getattr(self, end), self.w_bits, self.a_bits, end)

    def identity(self) -> tuple:
        """Equal for two configs that train the same network the same way."""
        d = self.to_dict()
        d["first"], d["last"] = self.end_bits("first"), self.end_bits("last")
        return tuple(sorted(d.items()))

    def label(self) -> str:
        """W4A4 / W4A32 / FP32, as in the tables."""
        return "FP32" if self.is_fp32 else f"W{self.w_bits or 32}A{self.a_bits or 32}"


_FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """Check and convert one value for one key. Raises ConfigError naming key, value, allowed."""
    if key not in _FIELDS:
        hint = did_you_mean(key, _FIELDS)
        raise ConfigError(f"{where}: unknown key '{key}'{hint}; allowed keys: {', '.join(_FIELDS)}")
    meta, tp = _FIELDS[key].metadata, str(_FIELDS[key].type)
    if "check" in meta:  # bits and first/last
        return meta["check"](key, value, where)
    if value is None and "None" in tp:
        return None
    if tp == "bool" and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        value = value.lower() in ("true", "yes", "1")
    if tp in ("int", "float") and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value) if tp == "int" else float(value)
    ok = {"bool": isinstance(value, bool), "int": is_number(value) and isinstance(value, int)}
    ok = {**ok, "float": is_number(value)}.get(tp, isinstance(value, str))
    if not ok:
        kind = {"bool": "true or false", "int": "an integer", "float": "a finite number"}.get(tp, "a string")
        raise _bad(where, key, value, f"expected {kind}")
    value = float(value) if tp == "float" else value
    if "choices" in meta and value not in meta["choices"]:
        hint = did_you_mean(value, meta["choices"])
        raise _bad(where, key, value, f"unknown {key}{hint}; allowed: {', '.join(meta['choices'])}")
    lo, hi, exclusive = meta.get("min"), meta.get("max"), meta.get("exclusive")
    if lo is not None and (value < lo or (exclusive and value == lo)):
        raise _bad(where, key, value, f"must be {'>' if exclusive else '>='} {lo}")
    if hi is not None and value > hi:
        raise _bad(where, key, value, f"must be <= {hi}")
    return value
