"""FP32 models by name, and loading FP32 weights into them (`init_from`).

CIFAR ResNets (resnet20/32/44/56) follow He et al. 2016, section 4.2: a 3x3 conv with 16
filters, three stages of n basic blocks with 16, 32 and 64 filters (6n+2 layers), global
average pooling and a linear classifier. Shortcuts use **option A**: identity, and where the
shape changes, a stride-2 subsample padded with zero channels. So every shortcut is
parameter-free (resnet20 has 0.27M parameters) and no conv hides in the shortcut path.
resnet8 is the same design with n = 1 (not one of the paper's depths): a quick model for smoke
runs and tests, which torch.compile builds in about half the time resnet20 takes.

resnet18/34/50 are torchvision's ImageNet models, unchanged but for the first conv where the
input has other than 3 channels (the 1-channel digits set).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, not_a_file

CIFAR_DEPTHS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
TORCHVISION = ("resnet18", "resnet34", "resnet50")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x):
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:  # option A: zero channels, split evenly before and after
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """An FP32 model, randomly initialized."""
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes, in_channels)
    if name in TORCHVISION:
        import torchvision  # only for these models: its import costs a trial worker about a second

        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model
    raise ConfigError(f"key 'model' = {name!r}: unknown model; allowed: {', '.join([*CIFAR_DEPTHS, *TORCHVISION])}")


def load_error(e: Exception) -> str:
    """torch.load's failure in one line. weights_only refusals name what the file would import
    (e.g. posix.system), not torch's generic advice to retry with weights_only=False."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        detail = next((ln for ln in lines[1:] if "GLOBAL" in ln or "Unsupported" in ln), None)
        if detail and "GLOBAL" in detail:
            return f"refused by weights_only: {detail}"
        return f"not a PyTorch checkpoint ({detail or 'weights_only unpickler failed'})"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_state_dict(path: str) -> dict:
    """An FP32 state dict from a checkpoint file: plain, or under 'model' / 'state_dict'.

    Loaded with weights_only=True: a file whose unpickling would run code is refused.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"key 'init_from' = {path!r}: {not_a_file(path)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise ConfigError(
            f"key 'init_from' = {path!r}: not a loadable checkpoint (loaded with weights_only=True; "
            f"files that would run code when unpickled are refused): {load_error(e)}"
        ) from None
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"key 'init_from' = {path!r}: expected a state dict of tensors, or a dict holding one "
            "under 'model' or 'state_dict'"
        )
    # checkpoints saved from a DataParallel / DDP model prefix every key with 'module.'
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def state_mismatch(own: dict, stored: dict) -> str | None:
    """Why a stored state dict does not fit a model's own: missing, unexpected and misshapen keys."""
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    shapes = sorted(k for k in set(own) & set(stored) if own[k].shape != stored[k].shape)
    if not (missing or unexpected or shapes):
        return None

    def few(keys):
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    parts = [f"missing keys: {few(missing)}" if missing else "",
             f"unexpected keys: {few(unexpected)}" if unexpected else "",
             "shape mismatch: " + few([f"{k} {tuple(stored[k].shape)} vs {tuple(own[k].shape)}" for k in shapes])
             if shapes else ""]
    return "; ".join(p for p in parts if p)


def load_fp32(model: nn.Module, init_from: str, name: str = "") -> nn.Module:
    """Load FP32 weights into an FP32 model before it is quantized."""
    if init_from == "torchvision":
        if name not in TORCHVISION:
            raise ConfigError(f"key 'init_from' = 'torchvision' needs one of {', '.join(TORCHVISION)}, not {name!r}")
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            state = weights.get_state_dict(progress=False)
        except Exception as e:
            raise ConfigError(
                f"key 'init_from' = 'torchvision': could not fetch {name} weights ({type(e).__name__}: {e}); "
                "with no network, download them elsewhere and pass the file's path"
            ) from None
    else:
        state = read_state_dict(init_from)
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ConfigError(f"key 'init_from' = {init_from!r} holds NaN or infinite values ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}); allowed: a checkpoint of finite FP32 weights")
    if any(k.endswith(("w_quant.step", "a_quant.step")) for k in state):
        raise ConfigError(f"key 'init_from' = {init_from!r} is a quantized model (it holds LSQ step sizes); "
                          "allowed: an FP32 checkpoint, e.g. one trained with w_bits=a_bits=32")
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"key 'init_from' = {init_from!r} does not fit model {name or type(model).__name__}: {problem}")
    model.load_state_dict(state)
    return model
