"""QConv2d and QLinear: a conv / linear layer that quantizes its weight and its input activation.
They keep the FP32 layer's `weight` and `bias`, and add `w_quant.step` and `a_quant.step`."""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import STEP_EPS, LsqQuantizer, dense, derivatives, fast_path, quantize


def to_codes(v_hat: torch.Tensor, s: torch.Tensor, signed: bool) -> torch.Tensor:
    """k = round(v_hat / s) as int8 (uint8 for unsigned ranges): a saved v_hat = k * s kept in 1 byte,
    exact for float32 and for bfloat16 with |k| <= 127 (`compactable` allows no more)."""
    fast = fast_path(v_hat)
    if fast is not None:
        return fast.encode(v_hat, s, signed)
    x = v_hat / s if v_hat.dtype == torch.float32 else v_hat.float().div_(s)
    return x.round_().to(torch.int8 if signed else torch.uint8)


def from_codes(k: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """k * s in float32, then in `dtype`: the forward's very product, and its very cast."""
    fast = fast_path(s)  # s: a float32 scalar on the codes' device
    v_hat = fast.decode(k, s) if fast is not None and dense(k) else k.float().mul_(s)
    return v_hat if dtype == torch.float32 else v_hat.to(dtype)


def compactable(q: LsqQuantizer, out: torch.Tensor) -> bool:
    """Whether q's output can be saved as codes: float32, or bfloat16 (8 bits) for ranges up to 7 bits."""
    if q.bits is None or not out.requires_grad:
        return False
    return out.dtype == torch.float32 or (out.dtype == torch.bfloat16 and max(q.qn, q.qp) <= 127)


def save_as_codes(*pairs):
    """Context for one layer's op, `pairs` being (quantizer, its output): an output (or a view of it)
    that autograd saves is kept as codes. A no-op without autograd and under torch.compile."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # first: nothing below is traceable
        return contextlib.nullcontext()
    # the hooks live with every saved tensor until backward, so they hold no tensor: only addresses
    targets = {(out.untyped_storage().data_ptr(), out.dtype): q for q, out in pairs if compactable(q, out)}
    if not targets:
        return contextlib.nullcontext()
    outer_pack, outer_unpack = torch._C._autograd._top_saved_tensors_default_hooks(False) or (None, None)

    def pack(t):
        q = targets.get((t.untyped_storage().data_ptr(), t.dtype))  # None: t as autograd gave it
        s = None if q is None else q.step.detach().clamp_min(STEP_EPS)  # the forward's s
        kept = t if q is None else to_codes(t.detach(), s, q.signed)  # (codes in t's layout)
        return s, t.dtype, (outer_pack(kept) if outer_pack else kept)

    def unpack(packed):
        s, dtype, t = packed
        t = outer_unpack(t) if outer_unpack else t
        return t if s is None else from_codes(t, s, dtype)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _weight_grad(grad_y, inp, kernel: tuple, geometry: tuple, bias: bool):
    """(dL/dw, dL/db or None) of conv2d(inp, w, b, *geometry): the conv's weight gradient alone."""
    w = inp.new_empty((grad_y.shape[1], inp.shape[1], *kernel))  # read for its shape only
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, inp, w, [w.shape[0]] if bias else None, *geometry, False, [0, 0], 1, [False, True, bias]
    )
    return grad_w, grad_b


class ImageConv(torch.autograd.Function):
    """conv2d(x_hat, w_hat, bias) for an input x that needs no gradient (the image). By the conv's
    linearity the step's gradient (eq. 3) sum(dL/dx_hat * dx_hat/ds) = sum(w_hat * wgrad(ds, dL/dy)):
    a weight gradient, not the costly input gradient; in float32 under bf16 autocast (cancellations)."""

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
        ds = derivatives(x, step.clamp_min(STEP_EPS), ctx.qn, ctx.qp)[1]  # float32
        wide = dtype in (torch.float32, torch.float64)  # else bf16 / fp16: the ds half in float32
        grad_y, grad_w, grad_b = grad_y.to(dtype), None, None
        want_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]  # not for a frozen weight and bias
        if want_w:
            x_hat = quantize(x, step, ctx.qn, ctx.qp).to(dtype)  # the forward's, recomputed
            inp = torch.cat([x_hat, ds.to(dtype)], 1) if wide else x_hat  # stacked: one pass over dL/dy
            grad_w, grad_b = _weight_grad(grad_y, inp, kernel, ctx.geometry, ctx.has_bias)
            grad_w, grad_ds = grad_w[:, :c].to(w_hat.dtype), grad_w[:, c:]
        if not (want_w and wide):
            up = grad_y if wide else grad_y.float()
            grad_ds, _ = _weight_grad(up, ds.to(up.dtype), kernel, ctx.geometry, False)
        grad_step = (grad_ds * w_hat.to(dtype).to(grad_ds.dtype)).sum() * ctx.g  # w_hat as the conv used it
        return None, grad_step.to(step.dtype).reshape(step.shape), grad_w, grad_b, None, None, None, None


class _Quantized:
    """What QConv2d and QLinear share: the weight and input quantizers, and from_float."""

    def __init__(self, *args, w_bits=None, a_bits=None, a_signed=False, quant_opts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_quant = LsqQuantizer(w_bits, signed=True, kind="weight", **(quant_opts or {}))
        self.a_quant = LsqQuantizer(a_bits, signed=a_signed, kind="activation", **(quant_opts or {}))

    @classmethod
    def from_float(cls, layer: nn.Module, **qkw):
        """The quantized twin of an FP32 layer, with its weights."""
        like = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
        q = cls(**{k: getattr(layer, k) for k in cls.COPIED}, **like, **qkw)
        q.load_state_dict(layer.state_dict(), strict=False)
        return q


class QConv2d(_Quantized, nn.Conv2d):
    COPIED = "in_channels out_channels kernel_size stride padding dilation groups padding_mode".split()
    # ImageConv on these devices only: on the CPU the weight gradient of 2C channels costs what
    # the input gradient does, and the C loop's double sum is more accurate
    image_conv_devices = ("cuda",)

    def forward(self, x):
        if x.dim() == 3:  # one unbatched (C, H, W) image: a batch of one, so that N is its C*H*W features
            return self.forward(x.unsqueeze(0)).squeeze(0)
        aq = self.a_quant
        if self.takes_image(x):
            aq.prepare(x)
            w_hat, g = self.w_quant(self.weight), aq.grad_scale_factor(x)
            geometry = (self.stride, self.padding, self.dilation)
            return ImageConv.apply(x, aq.step, w_hat, self.bias, geometry, aq.qn, aq.qp, g)
        xq, wq = aq(x), self.w_quant(self.weight)
        with save_as_codes((aq, xq), (self.w_quant, wq)):
            return self._conv_forward(xq, wq, self.bias)

    def takes_image(self, x) -> bool:
        """Whether ImageConv applies: an input that needs no gradient where the step does, a plain
        conv, and an input quantizer without hooks (ImageConv does not call it)."""
        q = self.a_quant
        here = torch.is_grad_enabled() and x.device.type in self.image_conv_devices
        wanted = q.bits is not None and q.step.requires_grad and not x.requires_grad
        plain = self.groups == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
        return here and wanted and plain and not (q._forward_hooks or q._forward_pre_hooks)


class QLinear(_Quantized, nn.Linear):
    COPIED = "in_features out_features".split()

    def forward(self, x):
        xq, wq = self.a_quant(x), self.w_quant(self.weight)
        with save_as_codes((self.a_quant, xq), (self.w_quant, wq)):
            return F.linear(xq, wq, self.bias)
