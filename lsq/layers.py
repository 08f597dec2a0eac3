"""QConv2d and QLinear: a conv / linear layer that quantizes its weight and its input activation.

They keep the FP32 layer's parameter names (`weight`, `bias`), so an FP32 state dict maps onto
them one to one; the quantizers add `w_quant.step` and `a_quant.step` (plus their init flags).
What the conv / linear op saves for backward (its quantized input and weight) is kept as 1-byte
integer codes, not float copies (`save_as_codes` in quantizer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import STEP_EPS, LsqQuantizer, _eq3, quantize, save_as_codes


def _quantizers(layer, w_bits, a_bits, a_signed, **opts):
    layer.w_quant = LsqQuantizer(w_bits, signed=True, kind="weight", **opts)
    layer.a_quant = LsqQuantizer(a_bits, signed=a_signed, kind="activation", **opts)


def _weight_grad(grad_y, inp, kernel: tuple, geometry: tuple, bias: bool):
    """(dL/dw, dL/db or None) of conv2d(inp, w, b, *geometry) for the output gradient grad_y:
    the conv's weight gradient alone (no input gradient), in grad_y's and inp's dtype."""
    w = inp.new_empty((grad_y.shape[1], inp.shape[1], *kernel))  # read for its shape only
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, inp, w, [w.shape[0]] if bias else None, *geometry, False, [0, 0], 1, [False, True, bias])
    return grad_w, grad_b


class _ImageConv(torch.autograd.Function):
    """conv2d(x_hat, w_hat, bias) with x_hat = round(clip(x/s, -Qn, Qp)) * s, for an input x that
    needs no gradient: the image, at the first layer. Then dL/dx_hat is wanted only for the
    step size's gradient (eq. 3, times g):

        dL/ds = g * sum(dL/dx_hat * dx_hat/ds),   dL/dx_hat = the conv's input gradient.

    An FP32 model never computes that input gradient (nothing upstream needs it), and for a conv
    with 3 input channels it is the slowest conv of the step: 1.57 ms of resnet18's 11.5 on an
    H200. But the sum is a scalar product, and the input gradient is the adjoint of the conv,
    which is linear in its input; so is the conv's weight gradient wgrad(input, dL/dy). So

        sum(dL/dx_hat * ds) = sum(dL/dy * conv(ds, w_hat)) = sum(w_hat * wgrad(ds, dL/dy)),

    and the weight gradient is computed anyway: backward computes it for [x_hat, ds] stacked as
    2C input channels, one call, and reads dL/dw_hat from the first C and the step's sum from the
    other C, dotted with w_hat. The same sum in another order; tests/test_layers.py checks it
    against the paper's formula.

    Under bf16 autocast the conv and its weight gradient run in bf16, and a bf16 weight gradient
    rounds each of its entries to 8 significant bits before they are dotted with w_hat: with the
    sum's cancellations, 1-4 % off on random data. So there the ds half is its own call in
    float32: TF32 on CUDA with amp, whose 10 mantissa bits hold a bf16 gradient exactly and round
    ds, element by element, where the errors average out over the image. The result is closer
    to the formula than the old path through the bf16 input gradient (bench/_triton_lsq.py
    measures the error against the sum of the terms' absolute values: 6e-7 on an H200; the old
    path, on the CPU's bf16, 3e-5).
    """

    @staticmethod
    def forward(ctx, x, step, w_hat, bias, geometry: tuple, qn: int, qp: int, g: float):
        y = F.conv2d(quantize(x, step, qn, qp), w_hat, bias, *geometry)  # geometry: stride, padding, dilation
        ctx.save_for_backward(x, step, w_hat)
        ctx.qn, ctx.qp, ctx.g, ctx.geometry, ctx.has_bias = qn, qp, g, geometry, bias is not None
        ctx.dtype = y.dtype  # the conv's own: bfloat16 under autocast, which casts its inputs
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, step, w_hat = ctx.saved_tensors
        c, kernel, dtype = x.shape[1], w_hat.shape[2:], ctx.dtype
        x_hat = quantize(x, step, ctx.qn, ctx.qp).to(dtype)  # the forward's, recomputed
        ds = _eq3(x, step.clamp_min(STEP_EPS), ctx.qn, ctx.qp)[1]  # float32
        grad_y = grad_y.to(dtype)
        wide = dtype in (torch.float32, torch.float64)  # else bf16 / fp16: the ds half in float32
        want_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]  # not for a frozen weight and bias
        grad_w = grad_b = None
        if want_w and wide:  # one call for x_hat and ds, stacked
            both, grad_b = _weight_grad(grad_y, torch.cat([x_hat, ds.to(dtype)], 1), kernel, ctx.geometry,
                                        ctx.has_bias)
            grad_w, grad_ds = both[:, :c].to(w_hat.dtype), both[:, c:]
        else:
            if want_w:
                grad_w, grad_b = _weight_grad(grad_y, x_hat, kernel, ctx.geometry, ctx.has_bias)
                grad_w = grad_w.to(w_hat.dtype)
            up = grad_y if wide else grad_y.float()
            grad_ds, _ = _weight_grad(up, ds.to(up.dtype), kernel, ctx.geometry, False)
        grad_step = (grad_ds * w_hat.to(dtype).to(grad_ds.dtype)).sum() * ctx.g  # w_hat as the conv used it
        return None, grad_step.to(step.dtype).reshape(step.shape), grad_w, grad_b, None, None, None, None


class QConv2d(nn.Conv2d):
    # On these device types an input that needs no gradient (the image) is quantized inside the
    # conv's own autograd Function, _ImageConv, whose backward gets the step size's gradient
    # without the input gradient (a_quant is not called as a module there: no save_as_codes, no
    # opaque_backward, which that layer does not need). Elsewhere the quantizer and the conv run
    # each on their own, as for any other input. Not on the CPU: there the weight gradient of
    # 6 input channels costs what the input gradient of 3 does (mkldnn, resnet20's first layer:
    # 31 against 8 ms for 3 channels, input gradient 22 ms), and its float32 sums give the step
    # gradient to 1e-5, where the C loop's double sum over the input gradient gives 1e-6.
    image_conv_devices = ("cuda",)

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
        if self._takes_image(x):
            aq = self.a_quant
            aq.prepare(x)
            geometry = (self.stride, self.padding, self.dilation)
            return _ImageConv.apply(x, aq.step, self.w_quant(self.weight), self.bias, geometry, aq.qn, aq.qp,
                                    aq.grad_scale_factor(x))
        xq, wq = self.a_quant(x), self.w_quant(self.weight)
        with save_as_codes((self.a_quant, xq), (self.w_quant, wq)):  # what backward keeps: 1-byte codes
            return self._conv_forward(xq, wq, self.bias)

    def _takes_image(self, x) -> bool:
        """Whether _ImageConv applies: an input that needs no gradient, where the step size does,
        a plain conv (zero padding given in numbers, one group), and an input quantizer that
        nobody watches (_ImageConv does its work without calling it, so its hooks would not run)."""
        aq = self.a_quant
        return (x.device.type in self.image_conv_devices and aq.bits is not None and torch.is_grad_enabled()
                and aq.step.requires_grad and not x.requires_grad and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and not (aq._forward_hooks or aq._forward_pre_hooks))


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
