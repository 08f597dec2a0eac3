"""FP32 models by name, and loading FP32 weights into them (`init_from`). CIFAR ResNets: He et al.
2016, section 4.2 (6n+2 layers) with option-A shortcuts; resnet8 (n = 1) is for smoke runs."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODELS, ConfigError

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
        x = x[:, :, :: self.stride, :: self.stride]  # option A: a subsample (a view), zero channels around it
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)) if self.pad else x

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        for i, (cin, width, stride) in enumerate([(16, 16, 1), (16, 32, 2), (32, 64, 2)], 1):
            blocks = [BasicBlock(cin, width, stride), *(BasicBlock(width, width, 1) for _ in range(n - 1))]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """An FP32 model, randomly initialized."""
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes, in_channels)
    if name in TORCHVISION:
        import torchvision  # only here: its import costs a trial worker about a second

        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model
    raise ConfigError(f"key 'model' = {name!r}: unknown model; allowed: {', '.join(MODELS)}")


def few(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_error(e: Exception) -> str:
    """torch.load's failure in one line; a weights_only refusal names what the file would import."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    if not lines[0].startswith("Weights only load failed"):
        return f"{type(e).__name__}: {lines[0]}"
    detail = next((ln for ln in lines[1:] if "GLOBAL" in ln or "Unsupported" in ln), "the unpickler failed")
    refused = "GLOBAL" in detail
    return f"refused by weights_only: {detail}" if refused else f"not a PyTorch checkpoint ({detail})"


def read_state_dict(path: str) -> dict:
    """An FP32 state dict (plain, or under 'model'/'state_dict'), loaded with weights_only=True."""
    where = f"key 'init_from' = {path!r}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a missing file, not a pickle, a refused one, truncated, ...)
        how = "loaded with weights_only=True; files that would run code when unpickled are refused"
        raise ConfigError(f"{where}: not a loadable checkpoint ({how}): {load_error(e)}") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        expected = "a state dict of tensors, or a dict holding one under 'model' or 'state_dict'"
        raise ConfigError(f"{where}: expected {expected}")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # (saved from DataParallel / DDP)


def state_mismatch(own: dict, stored: dict) -> str | None:
    """Why a stored state dict does not fit a model's own: missing, unexpected and misshapen keys."""
    missing, unexpected = sorted(set(own) - set(stored)), sorted(set(stored) - set(own))
    resized = [k for k in sorted(set(own) & set(stored)) if own[k].shape != stored[k].shape]
    shapes = [f"{k} {tuple(stored[k].shape)} vs {tuple(own[k].shape)}" for k in resized]
    parts = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatch": shapes}
    return "; ".join(f"{what}: {few(keys)}" for what, keys in parts.items() if keys) or None


def load_fp32(model: nn.Module, init_from: str, name: str = "") -> nn.Module:
    """Load FP32 weights (a file, or 'torchvision' for its pretrained ones) into an FP32 model."""
    where = f"key 'init_from' = {init_from!r}"
    if init_from == "torchvision":
        try:
            from torchvision.models import get_model_weights

            state = get_model_weights(name).DEFAULT.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 (no network, a proxy, a bad cache: all one message)
            offline = "with no network, download them elsewhere and pass the file's path"
            raise ConfigError(f"{where}: could not fetch {name} weights ({e!r}); {offline}") from None
    else:
        state = read_state_dict(init_from)
    nan = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if nan:
        allowed = "allowed: a checkpoint of finite FP32 weights"
        raise ConfigError(f"{where} holds NaN or infinite values ({few(nan)}); {allowed}")
    if any(k.endswith(("w_quant.step", "a_quant.step")) for k in state):
        allowed = "allowed: an FP32 checkpoint, e.g. one trained with w_bits=a_bits=32"
        raise ConfigError(f"{where} is a quantized model (it holds LSQ step sizes); {allowed}")
    if problem := state_mismatch(model.state_dict(), state):
        raise ConfigError(f"{where} does not fit model {name or type(model).__name__}: {problem}")
    model.load_state_dict(state)
    return model
