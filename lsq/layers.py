"""QConv2d and QLinear: a conv / linear layer that quantizes its weight and its input activation.

They keep the FP32 layer's parameter names (`weight`, `bias`), so an FP32 state dict maps onto
them one to one; the quantizers add `w_quant.step` and `a_quant.step` (plus their init flags).
What the conv / linear op saves for backward (its quantized input and weight) is kept as 1-byte
integer codes, not float copies (`save_as_codes` in quantizer.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .quantizer import LsqQuantizer, save_as_codes


def _quantizers(layer, w_bits, a_bits, a_signed, **opts):
    layer.w_quant = LsqQuantizer(w_bits, signed=True, kind="weight", **opts)
    layer.a_quant = LsqQuantizer(a_bits, signed=a_signed, kind="activation", **opts)


class QConv2d(nn.Conv2d):
    def __init__(self, *args, w_bits=None, a_bits=None, a_signed=False, quant_opts=None, **kwargs):
        super().__init__(*args, **kwargs)
        _quantizers(self, w_bits, a_bits, a_signed, **(quant_opts or {}))

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **qkw) -> "QConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode,
                device=conv.weight.device, dtype=conv.weight.dtype, **qkw)
        q.load_state_dict(conv.state_dict(), strict=False)
        return q

    def forward(self, x):
        if x.dim() == 3:  # one unbatched (C, H, W) image: a batch of one, so that N is its C*H*W features
            return self.forward(x.unsqueeze(0)).squeeze(0)
        xq, wq = self.a_quant(x), self.w_quant(self.weight)
        with save_as_codes((self.a_quant, xq), (self.w_quant, wq)):  # what backward keeps: 1-byte codes
            return self._conv_forward(xq, wq, self.bias)


class QLinear(nn.Linear):
    def __init__(self, *args, w_bits=None, a_bits=None, a_signed=False, quant_opts=None, **kwargs):
        super().__init__(*args, **kwargs)
        _quantizers(self, w_bits, a_bits, a_signed, **(quant_opts or {}))

    @classmethod
    def from_float(cls, linear: nn.Linear, **qkw) -> "QLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **qkw)
        q.load_state_dict(linear.state_dict(), strict=False)
        return q

    def forward(self, x):
        xq, wq = self.a_quant(x), self.w_quant(self.weight)
        with save_as_codes((self.a_quant, xq), (self.w_quant, wq)):
            return F.linear(xq, wq, self.bias)
