"""Deployment proof: integer reference inference, and ONNX export with the learned step sizes.

A quantized conv/linear layer computes, in the fake-quantized model (eq. 1-2 of the paper),

    y = conv(v_hat_a, v_hat_w) + b,   v_hat = round(clip(v / s, -Qn, Qp)) * s = q * s

and since conv is bilinear this equals

    y = s_a * s_w * conv(q_a, q_w) + b                                               (*)

with integer codes q_a in [-Qn_a, Qp_a] and q_w in [-Qn_w, Qp_w]. The right-hand side is what
integer hardware runs: one integer multiply-accumulate, one rescale, the bias in float.

1. Integer reference (`deploy_model(model, "int")`): every layer with quantized weights *and*
   quantized input computes (*) exactly: the codes with the fake-quant's own fp32 arithmetic, the
   accumulation exactly in integers (matrix products of the codes in fp32 or float64, whichever
   holds every partial sum exactly; checked integral, then int64), one rescale by s_a*s_w. A
   layer with an FP32 input or FP32 weights (e.g. `first=w8_a_fp32`, W4A32, the FP32 baseline)
   is not integer; it computes in float (float64, rounded once to fp32) and `layer_table` says
   so. BN, ReLU, residual adds and pooling run unchanged, in fp32.

2. ONNX (`export_onnx`): each quantized input becomes QuantizeLinear -> [Clip] ->
   DequantizeLinear with scale = s_a and zero point 0 (uint8 for unsigned activations: 8-bit
   unsigned is [0, 255]; int8 for the signed first layer: 8-bit signed is [-128, 127]). For b < 8
   the int8/uint8 saturation is wider than [-Qn, Qp], so an integer Clip to [-Qn, Qp] follows
   the QuantizeLinear. Every quantized weight is stored as its int8 codes q_w followed by
   DequantizeLinear with scale = s_w. Why this is the same function as LsqQuantizer.forward:
     - QuantizeLinear computes saturate(round(x / scale)) with round half to even, exactly like
       torch.round after the same fp32 division x / s;
     - round and clip commute for integer bounds: clip(round(x), -Qn, Qp) == round(clip(x, -Qn, Qp));
     - DequantizeLinear computes q * scale in fp32, like round(...) * s.
   The model input is the normalized float image, exactly as the PyTorch model takes it.

3. `compare_paths` runs the fake-quant model, the integer reference and onnxruntime on a test
   split and checks them (see the comment above AGREEMENT_TARGET for why these checks):
   predicted classes agree on >= 99.9 % of images (or all but one, on a small split); each
   integer layer matches its fake-quant twin on the same input to fp32 noise; onnxruntime's
   weights are bit-identical and each of its quantizers outputs exactly round(clip(x/s)) of its
   own input. Logit differences are reported.

Command line (loads a trainer checkpoint, writes the ONNX file, validates both paths):

    python -m lsq.export CHECKPOINT.pt|CHECKPOINT_FOLDER [--out model.onnx] [--data_dir DIR] [--json figures.json]

`deployment_check(checkpoint)` returns the same figures as a dict for the reports. onnx and
onnxruntime are an optional extra (requirements-export.txt); without them `deployment_check`
still runs the integer check and gives export_ok None with the reason, while the command line,
whose job is the ONNX file, stops with an error that says what to install.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .config import ConfigError, TrialConfig
from .files import atomic_write, write_problem
from .layers import QConv2d, QLinear
from .models import state_mismatch
from .quantizer import STEP_EPS, LsqQuantizer
from .train import CheckpointError, Trainer, check_threads, read_checkpoint

OPSET = 17
INSTALL_HINT = "pip install -r requirements-export.txt"


# ------------------------------------------------------------------------ shared pieces
def _scale(q: LsqQuantizer) -> torch.Tensor:
    """The step size as the fake quant uses it: s clamped to STEP_EPS, fp32, detached."""
    return q.step.detach().float().clamp_min(STEP_EPS)


def codes(v: torch.Tensor, scale: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """q = round(clip(v / s, -Qn, Qp)): the same fp32 operations, in the same order, as the
    quantizer's forward (lsq/quantizer.py, eq. 1-2: divide, clamp, round half to even), so these
    are exactly the integers the fake-quant model multiplies by s. Returned as fp32 holding integers."""
    return (v.float() / scale).clamp_(-qn, qp).round_()


def _full_fp32_matmul(x: torch.Tensor) -> bool:
    """Whether fp32 matrix products on x's device are full fp32, not TF32 or bf16 (which
    torch.set_float32_matmul_precision or torch.backends.cuda.matmul.allow_tf32 can allow)."""
    tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return torch.get_float32_matmul_precision() == "highest" and not tf32


class DeployLayer(nn.Module):
    """A trained QConv2d / QLinear frozen for deployment: int8 weight codes, step sizes, bias.

    path "int":  the integer reference, (*) in the module docstring.
    path "qdq":  the fake-quant math written as ONNX QuantizeLinear/Clip/DequantizeLinear (for
                 torch.onnx.export; run in PyTorch it computes the fake-quant model's function).
    """

    def __init__(self, layer: QConv2d | QLinear, path: str):
        super().__init__()
        self.path = path
        if isinstance(layer, QConv2d):
            if layer.padding_mode != "zeros":
                raise NotImplementedError(f"padding_mode={layer.padding_mode!r} is not supported for deployment")
            self.op = partial(F.conv2d, stride=layer.stride, padding=layer.padding,
                              dilation=layer.dilation, groups=layer.groups)
            # what _gemm needs; None where it does not apply (a grouped conv, padding as a word)
            self.geometry = (None if layer.groups != 1 or isinstance(layer.padding, str) else
                             (layer.stride, layer.padding, layer.dilation))
            self.fan_in = layer.weight[0].numel()  # K = C_in/groups * kh * kw products per output
        else:
            self.op, self.geometry = F.linear, None
            self.fan_in = layer.in_features
        wq, aq = layer.w_quant, layer.a_quant
        for q in (wq, aq):
            if q.bits is not None and not bool(q.initialized):
                raise ValueError(f"a {q.kind} quantizer was never initialized (its step is the placeholder 1.0); "
                                 "deploy a trained model")
        self.w_bits, self.a_bits = wq.bits, aq.bits
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        if wq.bits is None:  # FP32 weights stay float
            self.weight = nn.Parameter(layer.weight.detach().float().clone(), requires_grad=False)
        else:  # weights: signed, |q_w| <= 2^(b-1) <= 128, stored as int8
            self.w_qn, self.w_qp = wq.qn, wq.qp
            self.register_buffer("w_scale", _scale(wq))
            self.register_buffer("w_codes", codes(layer.weight.detach(), self.w_scale, wq.qn, wq.qp).to(torch.int8))
        if aq.bits is not None:
            self.a_qn, self.a_qp, self.a_signed = aq.qn, aq.qp, aq.signed
            self.register_buffer("a_scale", _scale(aq))
        self.max_abs_acc = 0  # largest integer accumulator seen (the int path): it must fit int32

    @property
    def is_integer(self) -> bool:
        return self.w_bits is not None and self.a_bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.integer_forward(x) if self.path == "int" else self.qdq_forward(x)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Operands: integer codes where quantized (scale s), the float tensor where FP32 (scale 1).
        scale = 1.0
        if self.a_bits is not None:
            x = codes(x, self.a_scale, self.a_qn, self.a_qp)  # q_a
            scale *= float(self.a_scale)
        if self.w_bits is not None:
            w = self.w_codes
            scale *= float(self.w_scale)
        else:
            w = self.weight
        # The multiply-accumulate. For an integer layer this is exact integer arithmetic: each
        # product |q_a * q_w| is at most Qa * Qw (the largest code magnitudes), so every partial
        # sum of the K = fan_in products, in whatever order a kernel adds them, is an integer of
        # magnitude at most bound = K * Qa * Qw: exactly representable in fp32 below 2^24, in
        # float64 below 2^53. That holds for kernels that sum products: matrix products (below)
        # and PyTorch's float64 CPU conv (im2col + GEMM). A transform-based kernel (Winograd,
        # FFT; PyTorch's fp32 CPU conv may use NNPACK's) would not be exact, hence no fp32 conv.
        # The result is also checked to be integral.
        if not self.is_integer:
            acc = self.op(x.double(), w.double())
        else:
            bound = self.fan_in * max(self.a_qn, self.a_qp) * max(self.w_qn, self.w_qp)
            if bound >= 2**53:
                raise RuntimeError("integer accumulator could exceed 2^53: float64 would not be exact")
            fp32 = bound < 2**24 and _full_fp32_matmul(x)
            acc = self._gemm(x, w, torch.float32 if fp32 else torch.float64)
            acc_int = acc.to(torch.int64)  # the integer accumulator
            if not torch.equal(acc_int.double(), acc):
                raise RuntimeError("the accumulation of integer codes was not exact")
            if acc_int.numel():
                self.max_abs_acc = max(self.max_abs_acc, int(acc_int.abs().max()))
            acc = acc_int.double()
        # One rescale by s_a * s_w (the product of two fp32 numbers is exact in float64), the
        # bias added in float64, then one rounding to fp32.
        y = acc * scale
        if self.bias is not None:
            y = y + self.bias.double().view(-1, *([1] * (y.dim() - 2)))
        return y.float()

    def _gemm(self, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """conv(x, w) or linear(x, w) of integer-valued x and w as matrix products in `dtype`;
        float64 out. A conv is the sum over its kernel taps (kh, kw) of (N*H*W, C) @ (C, O):
        the input's pixels, shifted by the tap, against the tap's weights. On the CPU that is
        faster than PyTorch's float64 conv, which runs one small GEMM per image
        (bench/deployment.py)."""
        if self.geometry is None:
            if self.op is F.linear:
                return (x.to(dtype) @ w.to(dtype).t()).double()
            return self.op(x.double(), w.double())  # a grouped conv, or padding given as a word
        (sh, sw), (ph, pw), (dh, dw) = (_pair(g) for g in self.geometry)
        o, c, kh, kw = w.shape
        h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wd = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        taps = w.to(dtype).permute(2, 3, 1, 0)  # (kh, kw, C, O)
        out = []
        step = max(1, 2**24 // (c * h * wd))  # images at a time: one tap's copy <= 2^24 values
        for i in range(0, x.shape[0], step):
            xp = F.pad(x[i:i + step].to(dtype), (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (n, Hp, Wp, C) view
            acc = None
            for a in range(kh):
                for b in range(kw):
                    shifted = xp[:, a * dh:a * dh + (h - 1) * sh + 1:sh, b * dw:b * dw + (wd - 1) * sw + 1:sw]
                    part = shifted.reshape(-1, c) @ taps[a, b]  # (n*h*wd, O)
                    acc = part if acc is None else acc.add_(part)
            out.append(acc.view(-1, h, wd, o).permute(0, 3, 1, 2).double())
        return torch.cat(out)

    def qdq_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits is not None:
            x = _QDQ.apply(x, self.a_scale, self.a_qn, self.a_qp, self.a_signed)
        w = _DQ.apply(self.w_codes, self.w_scale) if self.w_bits is not None else self.weight
        return self.op(x, w, self.bias)


def deploy_model(model: nn.Module, path: str = "int") -> nn.Module:
    """A copy of a quantized model (after quantize_model, trained) in eval mode, with every
    QConv2d/QLinear replaced by a DeployLayer on `path` ("int" or "qdq"). The model is unchanged."""
    if path not in ("int", "qdq"):
        raise ValueError(f"path must be 'int' or 'qdq', not {path!r}")
    deployed = copy.deepcopy(model).eval()
    for name, m in list(deployed.named_modules()):
        if isinstance(m, (QConv2d, QLinear)):
            parent, _, child = name.rpartition(".")
            setattr(deployed.get_submodule(parent) if parent else deployed, child, DeployLayer(m, path))
    return deployed


def layer_table(model: nn.Module) -> list[dict]:
    """One row per conv/linear layer: is it integer, and if not, why (for the CLI and reports)."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            w, a = m.w_quant.bits, m.a_quant.bits
            why = ("" if w is not None and a is not None else "FP32" if w is None and a is None
                   else "input FP32" if a is None else "weights FP32")
            rows.append({"layer": name, "w_bits": w, "a_bits": a, "integer": not why, "why_float": why})
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            rows.append({"layer": name, "w_bits": None, "a_bits": None, "integer": False,
                         "why_float": "not quantized"})
    return rows


# ---------------------------------------------------------------------------------- ONNX
class _QDQ(torch.autograd.Function):
    """Activation fake quant; exports as QuantizeLinear -> [Clip to [-Qn, Qp]] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, qn: int, qp: int, signed: bool):
        # (no x.float() here: the tracer would record it as a Cast that the shortcut path then reads)
        return (x / scale).clamp(-qn, qp).round() * scale

    @staticmethod
    def symbolic(g, x, scale, qn: int, qp: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=dtype))  # zero point 0: symmetric
        q = g.op("QuantizeLinear", x, scale, zero)  # saturate(round_half_even(x / s)) to int8/uint8
        full = (128, 127) if signed else (0, 255)
        if (qn, qp) != full:  # b < 8: clip the integer code to the b-bit range [-Qn, Qp]
            lo = g.op("Constant", value_t=torch.tensor(-qn, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qp, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zero)  # q * s


class _DQ(torch.autograd.Function):
    """Weight: int8 codes -> DequantizeLinear(scale = s_w, zero point 0)."""

    @staticmethod
    def forward(ctx, q, scale):
        return q.float() * scale

    @staticmethod
    def symbolic(g, q, scale):
        return g.op("DequantizeLinear", q, scale, g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8)))


def onnx_missing() -> str | None:
    """None if onnx and onnxruntime import, else the reason (for export_ok = None)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"ONNX export skipped: {e.name or e} is not installed ({INSTALL_HINT})"
    return None


def export_onnx(model: nn.Module, path: str, example: torch.Tensor) -> dict:
    """Write `model` (a quantized model) to `path` as ONNX with QDQ nodes, atomically.

    The graph has one input `image` (normalized, N x C x H x W, N dynamic) and one output
    `logits`. Initializers keep the module names: `<layer>.a_scale`, `<layer>.w_scale`,
    `<layer>.w_codes` (int8). Returns counts of the Q/DQ/Clip nodes."""
    import onnx

    qdq = deploy_model(model, "qdq").cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter honours `symbolic` on autograd Functions, which
        # is how each quantizer becomes its QDQ nodes; it needs no extra package.
        torch.onnx.export(qdq, (example[:1].float().cpu(),), buf, dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False)  # keep weights as int8 codes + DequantizeLinear
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    ops = [n.op_type for n in proto.graph.node]
    return {k: ops.count(k) for k in ("QuantizeLinear", "DequantizeLinear", "Clip")}


def onnx_session(model: str | bytes, fold_batch_norms: bool = True):
    """An onnxruntime CPU session (a file path or the serialized model) with default (full)
    graph optimizations, as deployment runs it; fold_batch_norms=False keeps every one of them
    but ConvBNFusion (see the comment above AGREEMENT_TARGET)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    disabled = [] if fold_batch_norms else ["ConvBNFusion"]
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


# ---------------------------------------------------------------------------- comparison
# What "agree" can mean. The fake-quant model accumulates q*s products in fp32, the integer path
# exactly, onnxruntime in fp32 in its own order. Given the same input, a layer's outputs differ by
# fp32 rounding only (relative ~1e-7). But where that noise puts an activation within ~1e-7 of a
# half step (x/s = k + 0.5), the next quantizer rounds it to k in one path and to k + 1 in the
# other, and that one-step difference propagates to the image's logits (digits W4A4: 1 image in
# 360, its max logit diff 2-3 % of the logit scale, same class; more images at 8 bits and on larger
# inputs, whose many activations meet more half steps). An end-to-end logit tolerance is thus
# either loose or fails on correct exports. So each path is judged by a check that is exact
# where the math is exact, plus the class agreement end to end:
#   int:   every integer layer, run on the fake-quant layer's own input, matches its output to
#          LAYER_TOL (fp32 noise); the accumulators are checked integral (DeployLayer);
#   onnx:  the graph's weights are bit-identical to the fake-quant weights, and every quantizer
#          in onnxruntime outputs exactly round(clip(x/s, -Qn, Qp)) of its own input x, with the
#          model's s, Qn, Qp (zero mismatches);
#   both:  predicted classes agree with the fake-quant model on >= 99.9 % of test images, or on all
#          but one: on a split where 0.1 % is less than one image (digits: 360), one such tie on
#          an image at a class boundary flips its class and would fail a correct export (seen:
#          digits W4A4, the logits of 3 images moved, one of them to the other class).
# The logit differences are reported: max absolute, max relative to the logit scale, and the
# share of images whose logits all match to LOGIT_TOL.
# Float-weight layers (FP32 weights with quantized inputs, FP32 first/last layers) add one more
# source of such noise: onnxruntime's ConvBNFusion folds a float conv's batch norm into its
# weights, a float change in every such layer (integer-weight layers keep their weights behind
# DequantizeLinear, which is not folded). At 8-bit activations after every layer that flips
# enough half steps to fail the class agreement of a correct export (digits W32A8 after 2
# epochs: 98.9 % with the fold, 100 % without; 99.7 % and 100 % after 3). Where a model has float
# layers and misses the target with the fold, but by no more than such flips do (agreement >=
# FOLD_FLOOR), it is judged with every optimization but that one, and the folded agreement is
# reported (onnx_folded_agreement, and in export_reason). A gross error (a wrong scale, wrong
# wiring) misses the floor, or fails the exact per-quantizer check, either way.
FOLD_FLOOR = 98.0  # percent
AGREEMENT_TARGET = 99.9  # percent of test images whose predicted class must agree
LOGIT_TOL = 1e-4  # |logit diff| / logit scale under which an image's logits "match"
LAYER_TOL = 1e-4  # same input: relative output diff of integer vs fake-quant layer (fp32 noise)
CHECK_IMAGES = 64  # images of the first batch on which the per-layer / per-quantizer checks run


class _Agreement:
    """Streaming comparison of one path's logits against the fake-quant model's."""

    KEYS = ("top1", "agreement", "disagreements", "logits_match", "max_logit_diff", "rel_logit_diff")

    def __init__(self):
        self.hits = self.agree = self.n = 0
        self.max_logit = 0.0
        self.diffs: list[torch.Tensor] = []  # per image: max |logit diff|

    def add(self, logits, ref, labels):
        self.hits += int((logits.argmax(1) == labels).sum())
        self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
        self.n += len(labels)
        self.diffs.append((logits - ref).abs().amax(1).cpu())
        self.max_logit = max(self.max_logit, float(ref.abs().max()))

    def result(self, prefix: str) -> dict:
        diffs = torch.cat(self.diffs)
        rel = diffs / max(self.max_logit, 1e-30)  # relative to the logit scale
        values = (100.0 * self.hits / self.n,
                  100.0 * self.agree / self.n,  # agreement: percent of images, same class
                  self.n - self.agree,  # disagreements: images whose class differs
                  100.0 * int((rel <= LOGIT_TOL).sum()) / len(rel),  # a count: float32's mean gave 94.99999 for 95
                  float(diffs.max()),
                  float(rel.max()))
        return {f"{prefix}_{k}": v for k, v in zip(self.KEYS, values, strict=True)}


def _teacher_forcing(model: nn.Module, int_model: nn.Module):
    """Hooks that run each integer layer on the fake-quant layer's own input and record the
    largest relative output difference: the integer math checked without propagated effects."""
    worst = {"rel": 0.0}
    deployed = dict(int_model.named_modules())

    def hook(name):
        def check(module, inputs, out):
            ref = out[:CHECK_IMAGES].float()
            diff = deployed[name](inputs[0][:CHECK_IMAGES]) - ref
            worst["rel"] = max(worst["rel"], float(diff.abs().max()) / max(float(ref.abs().max()), 1e-30))
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (QConv2d, QLinear)) and deployed[n].is_integer]
    return worst, handles


def onnx_code_check(model: nn.Module, onnx_path: str, images: torch.Tensor) -> dict:
    """Check the exported graph against the model it came from, exactly.

    Weights: every `<layer>.w_codes` * `<layer>.w_scale` initializer equals the fake-quant
    weight bit for bit. Activations: the graph is run with each QuantizeLinear's input x and its
    integer code (after the Clip, if any) exposed; every code must equal round(clip(x/s, -Qn, Qp))
    computed the fake-quant's way with the layer's own s, Qn, Qp. Returns onnx_quantizers (how many
    were found; one per quantized activation), onnx_codes_checked, onnx_code_mismatch and
    onnx_weights_exact."""
    import onnx
    from onnx import numpy_helper

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}
    proto = onnx.load(onnx_path)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
    weights_exact = True
    for name, m in layers.items():
        if m.w_quant.bits is not None:
            codes_w, scale_w = inits.get(f"{name}.w_codes"), inits.get(f"{name}.w_scale")
            weights_exact &= (codes_w is not None and scale_w is not None and
                              torch.equal(codes_w.float() * scale_w, m.w_quant(m.weight).detach().cpu()))
    probes = []  # (layer, name of x, name of its code)
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            clip = [c for c in proto.graph.node if c.op_type == "Clip" and c.input[0] == node.output[0]]
            probes.append((node.input[1].removesuffix(".a_scale"), node.input[0],
                           clip[0].output[0] if clip else node.output[0]))
    if not probes:  # an FP32 model: nothing quantized to check
        return {"onnx_quantizers": 0, "onnx_codes_checked": 0, "onnx_code_mismatch": 0,
                "onnx_weights_exact": bool(weights_exact)}
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=t) for _, x, c in probes for t in (x, c) if t not in have)
    sess = onnx_session(proto.SerializeToString())
    names = [t for _, x, c in probes for t in (x, c)]
    checked = mismatch = 0
    for chunk in images[:CHECK_IMAGES].float().cpu().split(8):  # 8 at a time: every activation is kept
        values = dict(zip(names, sess.run(names, {"image": chunk.numpy()})))
        for layer, x, c in probes:
            aq = layers[layer].a_quant if layer in layers else None
            if aq is None or aq.bits is None:
                raise ValueError(f"ONNX QuantizeLinear with scale {layer}.a_scale matches no quantized layer")
            expected = codes(torch.from_numpy(values[x]), _scale(aq), aq.qn, aq.qp)
            got = torch.from_numpy(values[c].astype("int64")).float()
            checked += got.numel()
            mismatch += int((got != expected).sum())
    return {"onnx_quantizers": len(probes), "onnx_codes_checked": checked, "onnx_code_mismatch": mismatch,
            "onnx_weights_exact": bool(weights_exact)}


@torch.no_grad()
def compare_paths(model: nn.Module, loader, onnx_path: str | None = None) -> dict:
    """Run the fake-quant model, the integer reference and (given an exported file) onnxruntime
    on every batch of `loader`; accuracies, agreements and matches in percent, logit differences
    absolute and relative to the largest |logit| of the fake-quant model.

    Keys: fake_top1, n_images, integer_layers, float_layers, quantized_activations;
    int_top1, int_agreement, int_disagreements, int_logits_match, int_max_logit_diff,
    int_rel_logit_diff, int_layer_rel_diff (largest relative layer output diff given the same input), int_max_abs_acc
    (largest integer accumulator): all None without integer layers; with onnx_path the onnx_*
    counterparts of the first six and onnx_code_check's figures."""
    model = model.eval()
    int_model = deploy_model(model, "int")
    table = layer_table(model)
    n_int = sum(r["integer"] for r in table)
    session = onnx_session(onnx_path) if onnx_path else None
    fake_hits = n = 0
    paths = {"int": _Agreement(), "onnx": _Agreement()}
    result = {}
    # The per-layer checks on part of the first batch: they test arithmetic, which few images cover.
    worst, handles = _teacher_forcing(model, int_model) if n_int else ({}, [])
    refs = []  # the fake-quant logits of each batch, for a second onnxruntime pass (below)
    try:
        for images, labels in loader:
            ref = model(images).float()  # (first batch: the hooks check every integer layer)
            refs.append(ref)
            for h in handles:
                h.remove()
            if onnx_path and not n:
                result.update(onnx_code_check(model, onnx_path, images))
            fake_hits += int((ref.argmax(1) == labels).sum())
            n += len(labels)
            if n_int:  # (without integer layers there is no integer path to run)
                paths["int"].add(int_model(images), ref, labels)
            if session is not None:
                paths["onnx"].add(_ort_logits(session, images, ref.device), ref, labels)
    finally:
        for h in handles:
            h.remove()
    result.update({"fake_top1": 100.0 * fake_hits / n, "n_images": n, "integer_layers": n_int,
                   "float_layers": [f"{r['layer']} ({r['why_float']})" for r in table if not r["integer"]],
                   "quantized_activations": sum(r["a_bits"] is not None for r in table)})
    if n_int:
        result.update(paths["int"].result("int"))
        result["int_layer_rel_diff"] = worst["rel"]
        result["int_max_abs_acc"] = max(m.max_abs_acc for m in int_model.modules() if isinstance(m, DeployLayer))
    else:  # nothing runs in integers: no integer figures rather than a float model's
        result.update(dict.fromkeys([f"int_{k}" for k in _Agreement.KEYS] + ["int_layer_rel_diff", "int_max_abs_acc"]))
    if session is not None:
        result.update(paths["onnx"].result("onnx"))
        result["onnx_folded_agreement"] = None
        if (result["float_layers"] and not agreement_ok(result, "onnx")
                and result["onnx_agreement"] >= FOLD_FLOOR):  # see the comment above AGREEMENT_TARGET
            unfolded, again = onnx_session(onnx_path, fold_batch_norms=False), _Agreement()
            for (images, labels), ref in zip(loader, refs):  # (the test split comes in a fixed order)
                again.add(_ort_logits(unfolded, images, ref.device), ref, labels)
            result["onnx_folded_agreement"] = result["onnx_agreement"]
            result.update(again.result("onnx"))
    return result


def _ort_logits(session, images: torch.Tensor, device) -> torch.Tensor:
    """The exported model's logits for a batch, from an onnxruntime session."""
    out = session.run(["logits"], {"image": images.float().cpu().contiguous().numpy()})[0]
    return torch.from_numpy(out).to(device)


def agreement_ok(r: dict, prefix: str) -> bool:
    """Path `prefix`'s predicted classes agree with the fake-quant model's on AGREEMENT_TARGET %
    of the images, and never need to on more than all but one (the comment above it says why)."""
    allowed = max(1, int(r["n_images"] * (100 - AGREEMENT_TARGET) / 100 + 1e-6))
    return r[f"{prefix}_disagreements"] <= allowed


def passes(r: dict, prefix: str) -> bool | None:
    """The deployment targets for path `prefix` ("int" or "onnx"), see the comment above
    AGREEMENT_TARGET. None where the path has no figures."""
    if r.get(f"{prefix}_agreement") is None:
        return None
    ok = agreement_ok(r, prefix)
    if prefix == "int":
        return ok and r["int_layer_rel_diff"] <= LAYER_TOL
    return (ok and r["onnx_weights_exact"] and r["onnx_code_mismatch"] == 0
            and r["onnx_quantizers"] == r["quantized_activations"])


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_file(checkpoint_path: str) -> str:
    """The file a checkpoint path stands for: a sweep's checkpoint folder (the report's
    `checkpoint` column) stands for the checkpoint.pt inside it."""
    if os.path.isdir(checkpoint_path):
        return os.path.join(checkpoint_path, "checkpoint.pt")  # lsq.trainable.CHECKPOINT_FILE (no Ray here)
    return checkpoint_path


def _read(checkpoint_path: str) -> dict:
    """A trainer checkpoint that holds its trial config, or CheckpointError. A sweep's checkpoint
    folder stands for the checkpoint.pt inside it."""
    if os.path.isdir(checkpoint_path):
        inside = _checkpoint_file(checkpoint_path)
        if not os.path.isfile(inside):
            raise CheckpointError(f"checkpoint {checkpoint_path}: a folder without checkpoint.pt (allowed: a "
                                  "trainer checkpoint file, or a sweep trial's checkpoint_NNNNNN folder)")
        checkpoint_path = inside
    if not os.path.isfile(checkpoint_path):
        raise CheckpointError(f"checkpoint {checkpoint_path}: no such file")
    state = read_checkpoint(checkpoint_path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {checkpoint_path} holds no trial config (key 'config')")
    return state


def load_trained(checkpoint_path: str, data_dir: str | None = None) -> tuple[nn.Module, object, TrialConfig, dict]:
    """(model on the CPU in eval mode, data, config, checkpoint) from a trainer checkpoint.

    The model is rebuilt by the Trainer from the checkpoint's own config, so construction is the
    one the trial used; `init_from` is dropped (the checkpoint holds every weight) and `data_dir`
    may point elsewhere than where the trial ran."""
    state = _read(checkpoint_path)
    values = {**state["config"], "init_from": None, "device": "cpu"}
    if data_dir is not None:
        values["data_dir"] = data_dir
    cfg = TrialConfig.from_dict(values, where=f"config of checkpoint {checkpoint_path}")
    trainer = Trainer(cfg, data_dir_flag="--data_dir")  # (where the data set is not where the trial had it)
    stored = state["model"]
    problem = state_mismatch(trainer.model.state_dict(), stored)
    if problem:
        raise CheckpointError(f"checkpoint {checkpoint_path}: its weights do not fit its config "
                              f"({cfg.label()} {cfg.model}): {problem}")
    trainer.model.load_state_dict(stored)
    model = trainer.model.cpu().eval()
    for q in model.modules():
        if isinstance(q, LsqQuantizer) and q.bits is not None and not bool(q.initialized):
            raise CheckpointError(f"checkpoint {checkpoint_path}: a step size was never initialized "
                                  "(a model saved before its first training step)")
    return model, trainer.data, cfg, state


def deployment_check(checkpoint_path: str, data_dir: str | None = None, out: str | None = None) -> dict:
    """The deployment figures of one trainer checkpoint, for the reports and the CLI.

    Returns int_top1, export_ok, agreement (integer vs fake-quant, percent), onnx_agreement, plus
    fake_top1, onnx_top1, the logit differences, int_ok, export_reason (why export_ok is None or
    False, or how it passed with ConvBNFusion off) and onnx_path. Writes the ONNX file to `out`,
    or to a temporary file it removes.
    export_ok is None (with export_reason) where onnx/onnxruntime are not installed.
    Raises CheckpointError / ConfigError for an unusable checkpoint or data folder."""
    model, data, cfg, state = load_trained(checkpoint_path, data_dir)
    missing = onnx_missing()
    counts, tmpdir, failed = None, None, None
    if missing is None:
        if out is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="lsq-export-")
            path = os.path.join(tmpdir.name, "model.onnx")
        else:
            path = out
        try:
            example, _ = next(iter(data.test))
            counts = export_onnx(model, path, example)
        except OSError as e:
            raise ConfigError(f"cannot write the ONNX file {path}: {e.strerror or e}") from None
        except Exception as e:  # the exporter failed: a result for the report, not a crash
            failed = f"ONNX export failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    try:
        r = compare_paths(model, data.test, None if missing or failed else path)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    r.update({"label": cfg.label(), "model": cfg.model, "dataset": cfg.dataset, "epoch": state.get("epoch"),
              "agreement": r["int_agreement"], "int_ok": passes(r, "int"),
              "onnx_path": None if out is None or missing else out, "onnx_nodes": counts})
    if missing or failed:
        r.update(dict.fromkeys([f"onnx_{k}" for k in _Agreement.KEYS] + [
            "onnx_quantizers", "onnx_codes_checked", "onnx_code_mismatch", "onnx_weights_exact"]))
        r.update({"export_ok": None if missing else False, "export_reason": missing or failed, "onnx_path": None})
    else:
        r["export_ok"] = passes(r, "onnx")
        folded = r.get("onnx_folded_agreement")
        if r["export_ok"]:
            r["export_reason"] = None if folded is None else (
                f"passed with onnxruntime's ConvBNFusion off; with it classes agree on {folded:.2f}% (it folds the "
                "float layers' batch norms into their weights, a float rounding change)")
        else:
            r["export_reason"] = (
                f"onnxruntime: classes agree on {r['onnx_agreement']:.2f}% of images (target >= {AGREEMENT_TARGET}%, "
                f"or all but one); "
                f"{r['onnx_code_mismatch']} of {r['onnx_codes_checked']} activation codes differ from "
                f"round(clip(x/s)); weights bit-identical: {r['onnx_weights_exact']}; "
                f"{r['onnx_quantizers']} QuantizeLinear for {r['quantized_activations']} quantized activations")
    return r


# --------------------------------------------------------------------------- command line
def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def default_onnx_path(checkpoint: str) -> str:
    """Beside a checkpoint file; for a sweep's checkpoint folder (which Tune may delete), a file
    in the current folder named after the trial and the checkpoint."""
    if os.path.isdir(checkpoint):
        folder = os.path.normpath(os.path.abspath(checkpoint))
        return f"{os.path.basename(os.path.dirname(folder))}_{os.path.basename(folder)}.onnx"
    return os.path.splitext(checkpoint)[0] + ".onnx"


def check_outputs(checkpoint: str, out: str, json_path: str | None, out_given: bool = True) -> None:
    """Before any work, ConfigError where the ONNX file (`out`) or the figures (`json_path`)
    could not be written, or would replace the checkpoint being read (`--out CKPT`; a checkpoint
    named *.onnx, whose default --out is itself) or each other. Writes nothing."""
    read = _checkpoint_file(checkpoint)
    for flag, path in (("--out", out), ("--json", json_path)):
        if path is None:
            continue
        problem = write_problem(flag, path)
        if problem:
            raise ConfigError(problem)
        if os.path.exists(path) and os.path.samefile(path, read):  # (also through a link)
            if flag == "--out" and not out_given:
                raise ConfigError(f"--out {path} (the default: the checkpoint's path with .onnx): is the checkpoint "
                                  f"being read ({read}); allowed: another path, given with --out")
            raise ConfigError(f"{flag} {path}: is the checkpoint being read ({read}); allowed: another path")
    if json_path is not None and os.path.realpath(json_path) == os.path.realpath(out):
        raise ConfigError(f"--json {json_path}: is also the ONNX file (--out {out}); allowed: another path")


def _identity(path: str):
    """(mtime, inode) of a file, None where there is none: atomic_write changes both."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lsq.export",
                                description="Export a trained LSQ checkpoint to ONNX (QDQ with the learned step "
                                            "sizes) and check integer inference and onnxruntime against it.",
                                epilog="exit status: 0 all checks pass, 1 a check failed, 2 bad input")
    p.add_argument("checkpoint", help="a trainer checkpoint (.pt), or a sweep trial's checkpoint_NNNNNN folder")
    p.add_argument("--out", help="ONNX file to write (default: the checkpoint's path with .onnx; for a folder, "
                                 "<trial>_<checkpoint_NNNNNN>.onnx here)")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="data set folder, if not the trial's")
    p.add_argument("--json", metavar="PATH", help="also write the figures (deployment_check's dict) here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    written = {}  # path -> its (mtime, inode) before the run, to say on Ctrl-C what was written
    try:
        check_threads(args.threads)
        if args.threads:
            torch.set_num_threads(args.threads)
        _read(args.checkpoint)  # a bad checkpoint is the first thing to report
        out = args.out if args.out is not None else default_onnx_path(args.checkpoint)
        check_outputs(args.checkpoint, out, args.json, out_given=args.out is not None)
        written = {path: _identity(path) for path in (out, args.json) if path is not None}
        missing = onnx_missing()
        if missing:
            raise ConfigError(missing.replace("ONNX export skipped: ", "cannot export: "))
        r = deployment_check(args.checkpoint, args.data_dir, out)
        if args.json:
            try:
                atomic_write(args.json, (json.dumps(r, indent=1) + "\n").encode())
            except OSError as e:
                raise ConfigError(f"--json {args.json}: cannot write: {e.strerror or e}") from None
    except (ConfigError, CheckpointError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, what was written, and the shell's status for SIGINT
        if args.debug:
            raise
        done = [path for path, before in written.items() if _identity(path) != before]
        print(f"interrupted; {'wrote ' + ' and '.join(done) if done else 'nothing written'}", file=sys.stderr)
        return 130
    nodes = r["onnx_nodes"]
    floats = r["float_layers"]
    floats = ", ".join(floats) if len(floats) <= 3 else f"{len(floats)} layers ({floats[0]}, ...)"
    print(f"{r['label']} {r['model']} on {r['dataset']}, epoch {r['epoch']}: {r['n_images']} test images; "
          f"{r['integer_layers']} integer layers, float: {floats or 'none'}")
    if nodes:
        print(f"wrote {out} ({nodes['QuantizeLinear']} QuantizeLinear, {nodes['DequantizeLinear']} DequantizeLinear, "
              f"{nodes['Clip']} Clip)")
    print(f"fake-quant top1 {r['fake_top1']:6.2f}   (PyTorch fp32, CPU)")
    for name, k in (("integer", "int"), ("onnxruntime", "onnx")):
        if r[f"{k}_top1"] is None:
            print(f"{name:<11} n/a: {'no integer layers' if k == 'int' else r['export_reason']}")
            continue
        print(f"{name:<11} top1 {_fmt(r[f'{k}_top1'], '6.2f')}   classes agree {_fmt(r[f'{k}_agreement'], '.2f')}%   "
              f"logits match (<= {LOGIT_TOL:g} rel) {_fmt(r[f'{k}_logits_match'], '.2f')}%   "
              f"max |logit diff| {_fmt(r[f'{k}_max_logit_diff'], '.3g')} (rel {_fmt(r[f'{k}_rel_logit_diff'], '.3g')})")
    if r["onnx_codes_checked"]:
        print(f"onnxruntime quantizers on their own input: {r['onnx_code_mismatch']} of {r['onnx_codes_checked']} "
              f"codes differ from round(clip(x/s)); weights bit-identical to the fake quant: {r['onnx_weights_exact']}")
    if r["int_max_abs_acc"] is not None:
        print(f"integer layers on the fake-quant layer's own input: max rel output diff {r['int_layer_rel_diff']:.2g}; "
              f"largest accumulator {r['int_max_abs_acc']} (int32 holds {2**31 - 1})")
    print(f"int_top1 {_fmt(r['int_top1'], '.2f')}  int_ok {r['int_ok']}  export_ok {r['export_ok']}")
    if r["export_reason"]:
        print(r["export_reason"])
    return 0 if r["export_ok"] and r["int_ok"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
