"""Bit policies: which bits go where, and `quantize_model` that applies one to an FP32 model.

The body (every conv and linear layer in between) gets `w_bits` / `a_bits`. The two ends get a
preset or explicit bits:

    preset          weights      input activation
    body            body bits    body bits
    fp32            FP32         FP32
    w_body_a_fp32   body bits    FP32
    w8_a_fp32       8-bit        FP32
    w8a8            8-bit        8-bit        (the paper's choice, the default)

`first` is the first Conv2d in module order, `last` the last Linear. An FP32 body
(w_bits = a_bits = None) is the FP32 baseline: the whole model stays FP32.

Signedness: the first layer sees a normalized image (negative values), so its activation
quantizer is signed; every other conv/linear input follows a ReLU in a ResNet and is unsigned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import resolve_end
from .layers import QConv2d, QLinear
from .quantizer import LsqQuantizer



@dataclass(frozen=True)
class BitPolicy:
    w_bits: int | None
    a_bits: int | None
    first: str | tuple = "w8a8"  # a preset name, 'wXaY', or a (w_bits, a_bits) tuple
    last: str | tuple = "w8a8"

    @property
    def is_fp32(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    def end(self, which: str) -> tuple[int | None, int | None]:
        spec = getattr(self, which)
        if isinstance(spec, tuple):
            return (None, None) if self.is_fp32 else spec
        return resolve_end(spec, self.w_bits, self.a_bits, which)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, policy: BitPolicy, grad_scale_n: str = "per_sample",
                   grad_scale: bool = True) -> nn.Module:
    """Swap every Conv2d/Linear for its quantized twin (keeping FP32 weights), in place."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    first, last = (convs[0] if convs else None), (linears[-1] if linears else None)
    opts = {"grad_scale_n": grad_scale_n, "grad_scale": grad_scale}
    for name, layer in layers:
        if policy.is_fp32:
            w, a = None, None
        elif name == first:
            w, a = policy.end("first")
        elif name == last:
            w, a = policy.end("last")
        else:
            w, a = policy.w_bits, policy.a_bits
        cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
        _replace(model, name, cls.from_float(layer, w_bits=w, a_bits=a, a_signed=(name == first), quant_opts=opts))
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
    """One row per conv/linear layer, in model order: what the policy did and what was learned.

    w_rel_mse is the weight quantization error ||w_hat - w||^2 / ||w||^2 (0 for FP32 weights).
    """
    import pandas as pd

    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        wq, aq = getattr(m, "w_quant", None), getattr(m, "a_quant", None)
        w_bits = wq.bits if wq is not None else None
        a_bits = aq.bits if aq is not None else None
        rel_mse = 0.0
        if w_bits is not None:
            w = m.weight.float()
            s = wq.step.clamp_min(1e-8)
            w_hat = (w / s).clamp(-wq.qn, wq.qp).round() * s
            rel_mse = float(((w_hat - w) ** 2).sum() / (w**2).sum().clamp_min(1e-30))
        rows.append({
            "layer": name,
            "kind": "conv" if isinstance(m, nn.Conv2d) else "linear",
            "w_bits": w_bits,
            "a_bits": a_bits,
            "a_signed": bool(aq.signed) if aq is not None and a_bits is not None else None,
            "w_step": float(wq.step) if w_bits is not None else None,
            "a_step": float(aq.step) if a_bits is not None else None,
            "w_rel_mse": rel_mse,
        })
    cols = ["layer", "kind", "w_bits", "a_bits", "a_signed", "w_step", "a_step", "w_rel_mse"]
    # object columns keep None (FP32) as None instead of pandas turning it into NaN
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in cols}).astype(
        {"layer": str, "kind": str, "w_rel_mse": float})
