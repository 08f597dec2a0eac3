"""Deployment proof: integer reference inference, and ONNX export with the learned step sizes.

With v_hat = q * s (eq. 1-2) a layer's conv(v_hat_a, v_hat_w) + b is s_a * s_w * conv(q_a, q_w) + b:
one integer multiply-accumulate and one rescale, which `deploy_model(model, "int")` runs exactly.
`export_onnx` writes quantizers as QuantizeLinear -> [Clip to [-Qn, Qp]] -> DequantizeLinear, the
same function (round half to even; clip and round commute for integer bounds). `compare_paths`
checks both against the fake-quant model. onnx and onnxruntime are an optional extra.
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

from .cli import EXIT_HELP, FAILED, OK, run_command
from .config import ConfigError, TrialConfig
from .files import atomic_write, write_problem
from .layers import QConv2d, QLinear
from .models import state_mismatch
from .quantizer import STEP_EPS, LsqQuantizer, codes, eager_forward
from .train import CheckpointError, Trainer, read_checkpoint

OPSET = 17
INSTALL_HINT = "pip install -r requirements-export.txt"


def step_size(q: LsqQuantizer) -> torch.Tensor:
    """s as the fake quant uses it: the step clamped to STEP_EPS, float32, detached."""
    return q.step.detach().float().clamp_min(STEP_EPS)


def full_fp32_matmul(x: torch.Tensor) -> bool:
    """Whether float32 matrix products on x's device are full float32, not TF32 or bf16."""
    tf32 = x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return torch.get_float32_matmul_precision() == "highest" and not tf32


class DeployLayer(nn.Module):
    """A trained QConv2d / QLinear frozen for deployment: int8 weight codes, step sizes, bias.
    path "int": the integer reference; "qdq": the fake quant as ONNX Q/DQ nodes (for export)."""

    def __init__(self, layer: QConv2d | QLinear, path: str):
        super().__init__()
        self.path = path
        self.op, self.geometry, self.fan_in = F.linear, None, layer.weight[0].numel()  # products per output
        if isinstance(layer, QConv2d):
            st, pad, dil = self.geometry = (layer.stride, layer.padding, layer.dilation)
            self.op = partial(F.conv2d, stride=st, padding=pad, dilation=dil, groups=layer.groups)
            if layer.groups != 1 or isinstance(pad, str):
                self.geometry = None  # gemm leaves such a conv to F.conv2d
        wq, aq = layer.w_quant, layer.a_quant
        self.w_bits, self.a_bits = wq.bits, aq.bits
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        if wq.bits is None:
            self.register_buffer("weight", layer.weight.detach().float().clone())
        else:  # signed weights: |q_w| <= 128, int8
            self.w_qn, self.w_qp = wq.qn, wq.qp
            self.register_buffer("w_scale", step_size(wq))
            k = codes(layer.weight.detach(), self.w_scale, wq.qn, wq.qp)
            self.register_buffer("w_codes", k.to(torch.int8))
        if aq.bits is not None:
            self.a_qn, self.a_qp, self.a_signed = aq.qn, aq.qp, aq.signed
            self.register_buffer("a_scale", step_size(aq))
        self.max_abs_acc = 0  # the largest integer accumulator seen: it must fit int32

    @property
    def is_integer(self) -> bool:
        return self.w_bits is not None and self.a_bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.integer_forward(x) if self.path == "int" else self.qdq_forward(x)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, w = 1.0, self.weight if self.w_bits is None else self.w_codes  # codes where quantized
        if self.a_bits is not None:
            x, scale = codes(x, self.a_scale, self.a_qn, self.a_qp), float(self.a_scale)
        if self.w_bits is not None:
            scale *= float(self.w_scale)
        if not self.is_integer:
            acc = self.op(x.double(), w.double())
        else:
            # Every partial sum of the products, in any order, is an integer of magnitude <= bound:
            # exact in float32 below 2^24 (float64: 2^53) in matrix products; not so in Winograd convs
            bound = self.fan_in * max(self.a_qn, self.a_qp) * max(self.w_qn, self.w_qp)
            fp32 = bound < 2**24 and full_fp32_matmul(x)
            acc = self.gemm(x, w, torch.float32 if fp32 else torch.float64)
            acc_int = acc.to(torch.int64)
            if not torch.equal(acc_int.double(), acc):
                raise RuntimeError("the accumulation of integer codes was not exact")
            if acc_int.numel():
                self.max_abs_acc = max(self.max_abs_acc, int(acc_int.abs().max()))
            acc = acc_int.double()
        y = acc * scale  # one rescale (s_a * s_w is exact in float64), the bias, one rounding
        if self.bias is not None:
            y = y + self.bias.double().view(-1, *([1] * (y.dim() - 2)))
        return y.float()

    def gemm(self, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """conv(x, w) or linear(x, w) as matrix products in `dtype` (a conv as im2col), float64 out."""
        if self.geometry is None:
            if self.op is F.linear:
                return (x.to(dtype) @ w.to(dtype).t()).double()
            return self.op(x.double(), w.double())  # a grouped conv, or padding given as a word
        st, pad, dil = self.geometry
        _, o, h, wd = F.conv2d(x.to("meta", torch.float), w.to("meta", torch.float), None, st, pad, dil).shape
        step = max(1, 2**24 // (w[0].numel() * h * wd))  # images at a time: 2^24 values unfolded
        cols = [
            F.unfold(x[i : i + step].to(dtype), w.shape[2:], dil, pad, st) for i in range(0, len(x), step)
        ]
        return torch.cat([w.to(dtype).reshape(o, -1) @ col for col in cols]).view(-1, o, h, wd).double()

    def qdq_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits is not None:
            x = QDQ.apply(x, self.a_scale, self.a_qn, self.a_qp, self.a_signed)
        w = DQ.apply(self.w_codes, self.w_scale) if self.w_bits is not None else self.weight
        return self.op(x, w, self.bias)


def deploy_model(model: nn.Module, path: str = "int") -> nn.Module:
    """A copy of a trained quantized model in eval mode, each QConv2d/QLinear a DeployLayer."""
    deployed = copy.deepcopy(model).eval()
    for name, m in list(deployed.named_modules()):
        if isinstance(m, (QConv2d, QLinear)):
            parent, _, child = name.rpartition(".")
            setattr(deployed.get_submodule(parent), child, DeployLayer(m, path))
    return deployed


def layer_table(model: nn.Module) -> list[dict]:
    """One row per conv/linear layer: is it integer, and if not, why."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        quantized = isinstance(m, (QConv2d, QLinear))
        w, a = (m.w_quant.bits, m.a_quant.bits) if quantized else (None, None)
        why = ["", "input FP32", "weights FP32", "FP32"][2 * (w is None) + (a is None)]
        why = why if quantized else "not quantized"
        rows.append({"layer": name, "w_bits": w, "a_bits": a, "integer": not why, "why_float": why})
    return rows


# ---------------------------------------------------------------------------------- ONNX
class QDQ(torch.autograd.Function):
    """Activation fake quant; exports as QuantizeLinear -> [Clip to [-Qn, Qp]] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, qn: int, qp: int, signed: bool):
        return eager_forward(x, scale, qn, qp)

    @staticmethod
    def symbolic(g, x, scale, qn: int, qp: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=dtype))  # zero point 0: symmetric
        q = g.op("QuantizeLinear", x, scale, zero)  # saturate(round_half_even(x / s))
        if (qn, qp) != ((128, 127) if signed else (0, 255)):  # below 8 bits: clip to [-Qn, Qp]
            lo = g.op("Constant", value_t=torch.tensor(-qn, dtype=dtype))
            q = g.op("Clip", q, lo, g.op("Constant", value_t=torch.tensor(qp, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero)  # q * s


class DQ(torch.autograd.Function):
    """Weight: int8 codes -> DequantizeLinear(scale = s_w, zero point 0)."""

    @staticmethod
    def forward(ctx, q, scale):
        return q.float() * scale

    @staticmethod
    def symbolic(g, q, scale):
        return g.op("DequantizeLinear", q, scale, g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8)))


def onnx_missing() -> str | None:
    """None if onnx and onnxruntime import, else the reason."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"ONNX export skipped: {e.name or e} is not installed ({INSTALL_HINT})"
    return None


def export_onnx(model: nn.Module, path: str, example: torch.Tensor) -> dict:
    """Write a quantized model to `path` as ONNX with Q/DQ nodes, atomically: input `image`
    (N dynamic), output `logits`, initializers named <layer>.a_scale, .w_scale, .w_codes (int8).
    Returns the counts of the QuantizeLinear, DequantizeLinear and Clip nodes."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
        warnings.simplefilter("ignore")
        # dynamo=False: the TorchScript exporter honours `symbolic` on autograd Functions
        axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
        names = {"input_names": ["image"], "output_names": ["logits"], "dynamic_axes": axes}
        qdq, example = deploy_model(model, "qdq").cpu(), (example[:1].float().cpu(),)
        # do_constant_folding=False keeps the weights as int8 codes + DequantizeLinear
        torch.onnx.export(
            qdq, example, buf, dynamo=False, opset_version=OPSET, do_constant_folding=False, **names
        )
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    ops = [n.op_type for n in proto.graph.node]
    return {k: ops.count(k) for k in ("QuantizeLinear", "DequantizeLinear", "Clip")}


def onnx_session(model: str | bytes, fold_batch_norms: bool = True):
    """An onnxruntime CPU session with full graph optimizations, as deployment runs it; with
    fold_batch_norms=False every one but ConvBNFusion."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    disabled = [] if fold_batch_norms else ["ConvBNFusion"]
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


# ---------------------------------------------------------------------------- comparison
# float32 noise near a half step rounds an activation differently in another path and moves the
# logits, so each path is checked exactly where the math is exact (integer layers on the fake-quant
# layer's own input; ONNX weights and each quantizer's codes), plus the classes end to end.
# onnxruntime's ConvBNFusion folds float layers' batch norms, a float change that flips more half
# steps: a model with float layers missing the target by no more (>= FOLD_FLOOR) is judged without it.
FOLD_FLOOR = 98.0  # percent
AGREEMENT_TARGET = 99.9  # percent of test images whose predicted class must agree
LOGIT_TOL = 1e-4  # |logit diff| / logit scale under which an image's logits "match"
LAYER_TOL = 1e-4  # same input: relative output diff of integer vs fake-quant layer
CHECK_IMAGES = 64  # images of the first batch for the per-layer and per-quantizer checks


class Agreement:
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
        match = 100.0 * int((rel <= LOGIT_TOL).sum()) / len(rel)  # from a count: exact percentages
        values = (100.0 * self.hits / self.n, 100.0 * self.agree / self.n, self.n - self.agree, match)
        values += (float(diffs.max()), float(rel.max()))
        return {f"{prefix}_{k}": v for k, v in zip(self.KEYS, values, strict=True)}


def teacher_forcing(model: nn.Module, int_model: nn.Module):
    """Hooks that run each integer layer on the fake-quant layer's own input, and the largest
    relative output difference they find (a dict, filled as the model runs)."""
    worst, deployed = {"rel": 0.0}, dict(int_model.named_modules())

    def hook(name):
        def check(module, inputs, out):
            ref = out[:CHECK_IMAGES].float()
            diff = deployed[name](inputs[0][:CHECK_IMAGES]) - ref
            worst["rel"] = max(worst["rel"], float(diff.abs().max()) / max(float(ref.abs().max()), 1e-30))

        return check

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    return worst, [m.register_forward_hook(hook(n)) for n, m in layers if deployed[n].is_integer]


def onnx_code_check(model: nn.Module, onnx_path: str, images: torch.Tensor) -> dict:
    """The exported graph against its model, exactly: every w_codes * w_scale is the fake-quant
    weight, and every QuantizeLinear's code (after its Clip) is round(clip(x/s, -Qn, Qp)) of its
    own input x in onnxruntime."""
    import onnx
    from onnx import numpy_helper

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))}
    proto = onnx.load(onnx_path)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in proto.graph.initializer}
    exact = True
    for name, m in layers.items():
        if m.w_quant.bits is not None:
            k, s = inits.get(f"{name}.w_codes"), inits.get(f"{name}.w_scale")
            w_hat = m.w_quant(m.weight).detach().cpu()
            exact &= k is not None and s is not None and torch.equal(k.float() * s, w_hat)
    probes = []  # (layer, x, its code)
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            clip = [
                c.output[0] for c in proto.graph.node if c.op_type == "Clip" and c.input[0] == node.output[0]
            ]
            probes.append((node.input[1].removesuffix(".a_scale"), node.input[0], (clip or node.output)[0]))
    checked = mismatch = 0
    if probes:
        names = [t for _, x, k in probes for t in (x, k)]
        have = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in have)
        session = onnx_session(proto.SerializeToString())
        for chunk in images[:CHECK_IMAGES].float().cpu().split(8):  # 8 at a time: every activation is kept
            values = dict(zip(names, session.run(names, {"image": chunk.numpy()})))
            for layer, x, k in probes:
                aq = layers[layer].a_quant
                got = torch.from_numpy(values[k].astype("int64")).float()
                checked += got.numel()
                mismatch += int(
                    (got != codes(torch.from_numpy(values[x]), step_size(aq), aq.qn, aq.qp)).sum()
                )
    figures = (len(probes), checked, mismatch, bool(exact))
    return dict(
        zip(["onnx_quantizers", "onnx_codes_checked", "onnx_code_mismatch", "onnx_weights_exact"], figures)
    )


def onnx_logits(session, images: torch.Tensor, device) -> torch.Tensor:
    out = session.run(["logits"], {"image": images.float().cpu().contiguous().numpy()})[0]
    return torch.from_numpy(out).to(device)


@torch.no_grad()
def compare_paths(model: nn.Module, loader, onnx_path: str | None = None) -> dict:
    """The fake-quant model, the integer reference and (given an exported file) onnxruntime on
    every batch of `loader`: fake_top1, n_images, integer_layers, float_layers,
    quantized_activations; the int_ and onnx_ figures of Agreement (None without integer layers);
    int_layer_rel_diff, int_max_abs_acc, onnx_folded_agreement and onnx_code_check's figures."""
    model = model.eval()
    int_model, table = deploy_model(model, "int"), layer_table(model)
    n_int = sum(r["integer"] for r in table)
    session = onnx_session(onnx_path) if onnx_path else None
    paths, result, refs = {"int": Agreement(), "onnx": Agreement()}, {}, []
    worst, handles = teacher_forcing(model, int_model) if n_int else ({}, [])  # on the first batch
    fake_hits = n = 0
    try:
        for images, labels in loader:
            ref = model(images).float()
            refs.append(ref)
            for h in handles:
                h.remove()
            if onnx_path and not n:
                result.update(onnx_code_check(model, onnx_path, images))
            fake_hits += int((ref.argmax(1) == labels).sum())
            n += len(labels)
            if n_int:
                paths["int"].add(int_model(images), ref, labels)
            if session is not None:
                paths["onnx"].add(onnx_logits(session, images, ref.device), ref, labels)
    finally:
        for h in handles:
            h.remove()
    result["fake_top1"], result["n_images"], result["integer_layers"] = 100.0 * fake_hits / n, n, n_int
    result["float_layers"] = [f"{r['layer']} ({r['why_float']})" for r in table if not r["integer"]]
    result["quantized_activations"] = sum(r["a_bits"] is not None for r in table)
    if n_int:
        result.update(paths["int"].result("int"))
        result["int_layer_rel_diff"] = worst["rel"]
        result["int_max_abs_acc"] = max(
            m.max_abs_acc for m in int_model.modules() if isinstance(m, DeployLayer)
        )
    else:  # nothing runs in integers: no integer figures
        result.update(
            dict.fromkeys([f"int_{k}" for k in Agreement.KEYS] + ["int_layer_rel_diff", "int_max_abs_acc"])
        )
    if session is not None:
        result.update(paths["onnx"].result("onnx"))
        result["onnx_folded_agreement"] = None
        if (
            result["float_layers"]
            and not agreement_ok(result, "onnx")
            and result["onnx_agreement"] >= FOLD_FLOOR
        ):
            unfolded, again = onnx_session(onnx_path, fold_batch_norms=False), Agreement()
            for (images, labels), ref in zip(loader, refs):  # (the test split comes in a fixed order)
                again.add(onnx_logits(unfolded, images, ref.device), ref, labels)
            result["onnx_folded_agreement"] = result["onnx_agreement"]
            result.update(again.result("onnx"))
    return result


def agreement_ok(r: dict, prefix: str) -> bool:
    """Path `prefix`'s classes agree with the fake quant's on AGREEMENT_TARGET %, or all but one."""
    allowed = max(1, int(r["n_images"] * (100 - AGREEMENT_TARGET) / 100 + 1e-6))
    return r[f"{prefix}_disagreements"] <= allowed


def passes(r: dict, prefix: str) -> bool | None:
    """The deployment targets for path "int" or "onnx"; None where the path has no figures."""
    if r.get(f"{prefix}_agreement") is None:
        return None
    if prefix == "int":
        return agreement_ok(r, prefix) and r["int_layer_rel_diff"] <= LAYER_TOL
    quantizers_found = r["onnx_quantizers"] == r["quantized_activations"]
    return (
        agreement_ok(r, prefix)
        and r["onnx_weights_exact"]
        and r["onnx_code_mismatch"] == 0
        and quantizers_found
    )


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_file(path: str) -> str:
    """A sweep trial's checkpoint folder stands for the checkpoint.pt inside it."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def read_trained(path: str) -> dict:
    """A trainer checkpoint that holds its trial config; ConfigError where it is not one."""
    file = checkpoint_file(path)
    if file != path and not os.path.isfile(file):
        raise ConfigError(
            f"checkpoint {path}: a folder without checkpoint.pt (allowed: a trainer checkpoint file, or a sweep "
            "trial's checkpoint_NNNNNN folder)"
        )
    if not os.path.isfile(file):
        raise ConfigError(f"checkpoint {file}: no such file")
    try:
        state = read_checkpoint(file)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"checkpoint {file} holds no trial config (key 'config')")
    return state


def load_trained(path: str, data_dir: str | None = None) -> tuple[nn.Module, object, TrialConfig, dict]:
    """(model on the CPU in eval mode, data, config, checkpoint), the model rebuilt by the Trainer
    from the checkpoint's own config; `data_dir` may point elsewhere than where the trial ran."""
    state = read_trained(path)
    values = {**state["config"], "init_from": None, "device": "cpu"}  # the checkpoint holds every weight
    if data_dir is not None:
        values["data_dir"] = data_dir
    cfg = TrialConfig.from_dict(values, where=f"config of checkpoint {path}")
    trainer = Trainer(cfg, data_dir_flag="--data_dir")
    problem = state_mismatch(trainer.model.state_dict(), state["model"])
    if problem:
        raise ConfigError(
            f"checkpoint {path}: its weights do not fit its config ({cfg.label()} {cfg.model}): {problem}"
        )
    trainer.model.load_state_dict(state["model"])
    model = trainer.model.cpu().eval()
    if any(isinstance(q, LsqQuantizer) and not q.is_initialized() for q in model.modules()):
        raise ConfigError(
            f"checkpoint {path}: a step size was never initialized (a model saved before its first training step)"
        )
    return model, trainer.data, cfg, state


def deployment_check(path: str, data_dir: str | None = None, out: str | None = None) -> dict:
    """compare_paths' figures for one trainer checkpoint, with int_ok and export_ok (passes), label,
    model, dataset, epoch, agreement, onnx_nodes, onnx_path and export_reason (why export_ok is None
    or False, or that it passed without the batch-norm fold). Writes the ONNX file to `out`, or to a
    temporary file. ConfigError for an unusable checkpoint or data folder."""
    model, data, cfg, state = load_trained(path, data_dir)
    missing, counts, failed = onnx_missing(), None, None
    with tempfile.TemporaryDirectory(prefix="lsq-export-") as tmp:
        onnx_path = out or os.path.join(tmp, "model.onnx")
        if not missing:
            try:
                counts = export_onnx(model, onnx_path, next(iter(data.test))[0])
            except OSError as e:
                raise ConfigError(f"cannot write the ONNX file {onnx_path}: {e.strerror or e}") from None
            except Exception as e:  # the exporter failed: a finding for the report, not a crash
                failed = f"ONNX export failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        r = compare_paths(model, data.test, None if missing or failed else onnx_path)
    r.update({"label": cfg.label(), "model": cfg.model, "dataset": cfg.dataset, "epoch": state.get("epoch")})
    r.update({"agreement": r["int_agreement"], "int_ok": passes(r, "int"), "onnx_nodes": counts})
    r["onnx_path"] = None if missing or failed else out
    if missing or failed:
        onnx_keys = ["onnx_quantizers", "onnx_codes_checked", "onnx_code_mismatch", "onnx_weights_exact"]
        r.update(dict.fromkeys([f"onnx_{k}" for k in Agreement.KEYS] + onnx_keys))
        r.update({"export_ok": None if missing else False, "export_reason": missing or failed})
    elif passes(r, "onnx"):
        folded = r.get("onnx_folded_agreement")
        r["export_ok"], r["export_reason"] = True, None
        if folded is not None:
            r["export_reason"] = (
                f"passed with onnxruntime's ConvBNFusion off; with it classes agree on {folded:.2f}% (it folds the "
                "float layers' batch norms into their weights, a float rounding change)"
            )
    else:
        r["export_ok"] = False
        r["export_reason"] = (
            f"onnxruntime: classes agree on {r['onnx_agreement']:.2f}% of images (target >= {AGREEMENT_TARGET}%, "
            f"or all but one); {r['onnx_code_mismatch']} of {r['onnx_codes_checked']} activation codes differ from "
            f"round(clip(x/s)); weights bit-identical: {r['onnx_weights_exact']}; "
            f"{r['onnx_quantizers']} QuantizeLinear for {r['quantized_activations']} quantized activations"
        )
    return r


# --------------------------------------------------------------------------- command line
def default_onnx_path(checkpoint: str) -> str:
    """Beside a checkpoint file; for a trial's checkpoint folder (which Tune may delete), a file here."""
    if os.path.isdir(checkpoint):
        folder = os.path.normpath(os.path.abspath(checkpoint))
        return f"{os.path.basename(os.path.dirname(folder))}_{os.path.basename(folder)}.onnx"
    return os.path.splitext(checkpoint)[0] + ".onnx"


def check_outputs(checkpoint: str, out: str, json_path: str | None, out_given: bool = True) -> None:
    """ConfigError where --out or --json cannot be written, or is the checkpoint or the other."""
    read = checkpoint_file(checkpoint)
    for flag, path in [("--out", out)] + ([("--json", json_path)] if json_path is not None else []):
        if problem := write_problem(flag, path):
            raise ConfigError(problem)
        if os.path.exists(path) and os.path.samefile(path, read):  # (also through a link)
            if flag == "--out" and not out_given:
                flag = f"--out {path} (the default: the checkpoint's path with .onnx):"
                raise ConfigError(
                    f"{flag} is the checkpoint being read ({read}); allowed: another path, given with --out"
                )
            raise ConfigError(f"{flag} {path}: is the checkpoint being read ({read}); allowed: another path")
    if json_path is not None and os.path.realpath(json_path) == os.path.realpath(out):
        raise ConfigError(f"--json {json_path}: is also the ONNX file (--out {out}); allowed: another path")


def file_identity(path: str):
    """(mtime, inode) of a file, None where there is none: atomic_write changes both."""
    return (os.stat(path).st_mtime_ns, os.stat(path).st_ino) if os.path.exists(path) else None


def print_figures(r: dict, out: str) -> None:
    def fmt(v, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    floats = r["float_layers"]
    floats = ", ".join(floats) if len(floats) <= 3 else f"{len(floats)} layers ({floats[0]}, ...)"
    trial, nodes = f"{r['label']} {r['model']} on {r['dataset']}, epoch {r['epoch']}", r["onnx_nodes"]
    print(
        f"{trial}: {r['n_images']} test images; {r['integer_layers']} integer layers, float: {floats or 'none'}"
    )
    if nodes:
        q, dq, clip = nodes["QuantizeLinear"], nodes["DequantizeLinear"], nodes["Clip"]
        print(f"wrote {out} ({q} QuantizeLinear, {dq} DequantizeLinear, {clip} Clip)")
    print(f"fake-quant top1 {r['fake_top1']:6.2f}   (PyTorch fp32, CPU)")
    for name, k in (("integer", "int"), ("onnxruntime", "onnx")):
        if r[f"{k}_top1"] is None:
            print(f"{name:<11} n/a: {'no integer layers' if k == 'int' else r['export_reason']}")
            continue
        top1, agree, match = (fmt(r[f"{k}_{key}"], ".2f") for key in ("top1", "agreement", "logits_match"))
        diff, rel = fmt(r[f"{k}_max_logit_diff"], ".3g"), fmt(r[f"{k}_rel_logit_diff"], ".3g")
        print(
            f"{name:<11} top1 {top1:>6}   classes agree {agree}%   logits match (<= {LOGIT_TOL:g} rel) "
            f"{match}%   max |logit diff| {diff} (rel {rel})"
        )
    if r["onnx_codes_checked"]:
        print(
            f"onnxruntime quantizers on their own input: {r['onnx_code_mismatch']} of {r['onnx_codes_checked']} "
            f"codes differ from round(clip(x/s)); weights bit-identical to the fake quant: {r['onnx_weights_exact']}"
        )
    if r["int_max_abs_acc"] is not None:
        print(
            f"integer layers on the fake-quant layer's own input: max rel output diff {r['int_layer_rel_diff']:.2g}; "
            f"largest accumulator {r['int_max_abs_acc']} (int32 holds {2**31 - 1})"
        )
    print(f"int_top1 {fmt(r['int_top1'], '.2f')}  int_ok {r['int_ok']}  export_ok {r['export_ok']}")
    if r["export_reason"]:
        print(r["export_reason"])


def main(argv=None) -> int:
    about = "Export a trained LSQ checkpoint to ONNX (QDQ, the learned step sizes) and check it and integer inference."
    p = argparse.ArgumentParser(prog="python -m lsq.export", description=about, epilog=EXIT_HELP)
    p.add_argument(
        "checkpoint", help="a trainer checkpoint (.pt), or a sweep trial's checkpoint_NNNNNN folder"
    )
    p.add_argument(
        "--out", help="ONNX file (default: the checkpoint's with .onnx; for a folder, <trial>_<folder>.onnx)"
    )
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", help="data set folder, if not the trial's")
    p.add_argument("--json", metavar="PATH", help="also write the figures (deployment_check's dict) here")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    written = {}  # path -> its identity before the run, to say on Ctrl-C what was written

    def body() -> int:
        if args.threads is not None and args.threads < 1:  # (torch.set_num_threads raises)
            raise ConfigError(f"--threads {args.threads}: allowed: a whole number >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        read_trained(args.checkpoint)  # a bad checkpoint is the first thing to report
        out = args.out if args.out is not None else default_onnx_path(args.checkpoint)
        check_outputs(args.checkpoint, out, args.json, out_given=args.out is not None)
        written.update({path: file_identity(path) for path in (out, args.json) if path is not None})
        if missing := onnx_missing():
            raise ConfigError(missing.replace("ONNX export skipped: ", "cannot export: "))
        r = deployment_check(args.checkpoint, args.data_dir, out)
        if args.json:
            atomic_write(args.json, (json.dumps(r, indent=1) + "\n").encode())
        print_figures(r, out)
        return OK if r["export_ok"] and r["int_ok"] in (True, None) else FAILED

    def interrupted() -> str:
        done = [path for path, before in written.items() if file_identity(path) != before]
        return f"interrupted; {'wrote ' + ' and '.join(done) if done else 'nothing written'}"

    return run_command(body, args.debug, interrupted=interrupted)


if __name__ == "__main__":
    sys.exit(main())
