"""Bit policies and `quantize_model`: the body's layers get `w_bits` / `a_bits`, the first Conv2d and
the last Linear a preset of lsq.config (w8a8, the paper's, by default) or explicit bits; an FP32 body
keeps the whole model FP32. The first layer's input (an image) is signed; the others follow a ReLU."""

from dataclasses import dataclass

import torch
from torch import nn

from .config import resolve_end
from .layers import QConv2d, QLinear
from .quantizer import STEP_EPS, LsqQuantizer, eager_forward


@dataclass(frozen=True)
class BitPolicy:
    w_bits: int | None
    a_bits: int | None
    first: str | tuple = "w8a8"  # a preset name, 'wXaY', or a (w_bits, a_bits) tuple
    last: str | tuple = "w8a8"

    def end(self, which: str) -> tuple[int | None, int | None]:
        spec = getattr(self, which)
        if isinstance(spec, tuple):
            return (None, None) if self.w_bits is None and self.a_bits is None else spec
        return resolve_end(spec, self.w_bits, self.a_bits, which)


def quantize_model(model: nn.Module, policy: BitPolicy, grad_scale_n="per_sample", grad_scale=True):
    """Swap every Conv2d/Linear for its quantized twin (keeping FP32 weights), in place."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    first = next((n for n, m in layers if isinstance(m, nn.Conv2d)), None)
    last = next((n for n, m in reversed(layers) if isinstance(m, nn.Linear)), None)
    opts = {"grad_scale_n": grad_scale_n, "grad_scale": grad_scale}
    for name, layer in layers:
        if name == first:
            w, a = policy.end("first")
        elif name == last:
            w, a = policy.end("last")
        else:
            w, a = policy.w_bits, policy.a_bits
        cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        parent, _, child = name.rpartition(".")
        q = cls.from_float(layer, w_bits=w, a_bits=a, a_signed=(name == first), quant_opts=opts)
        setattr(model.get_submodule(parent), child, q)
    return model


def quantizers(model: nn.Module):
    """Every active LsqQuantizer of a model."""
    return [m for m in model.modules() if isinstance(m, LsqQuantizer) and m.bits is not None]


@torch.no_grad()
def init_steps(model: nn.Module, images: torch.Tensor) -> None:
    """Initialize every step size from one batch without touching BatchNorm statistics."""
    was_training = model.training
    model.eval()
    for q in quantizers(model):
        q.train()
    model(images)
    model.train(was_training)


@torch.no_grad()
def describe(model: nn.Module):
    """One row per conv/linear layer, in model order: bits and learned step sizes, and the weight
    quantization error w_rel_mse = ||w_hat - w||^2 / ||w||^2 (0 for FP32 weights)."""
    import pandas as pd

    fp32 = LsqQuantizer(None, False, "weight")  # stands in for the quantizers an FP32 layer lacks
    rows = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in layers:
        wq, aq = getattr(m, "w_quant", fp32), getattr(m, "a_quant", fp32)
        w = w_hat = m.weight.float()
        row = {"layer": name, "kind": "conv" if isinstance(m, nn.Conv2d) else "linear", "w_bits": wq.bits}
        row.update(a_bits=aq.bits, a_signed=None, w_step=None, a_step=None)
        if wq.bits is not None:
            w_hat, row["w_step"] = eager_forward(w, wq.step.clamp_min(STEP_EPS), wq.qn, wq.qp), float(wq.step)
        if aq.bits is not None:
            row["a_signed"], row["a_step"] = aq.signed, float(aq.step)
        row["w_rel_mse"] = float(((w_hat - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30))
        rows.append(row)
    table = pd.DataFrame(rows, dtype=object)  # object columns keep None (FP32) as None, not NaN
    return table.astype({"layer": str, "kind": str, "w_rel_mse": float})
