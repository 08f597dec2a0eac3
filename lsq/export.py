"""Deployment check: integer inference, where conv(v_hat_a, v_hat_w) + b = s_a * s_w * conv(q_a, q_w) + b
(eq. 1-2) runs exactly, and ONNX export (an optional extra) with the learned step sizes."""

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
from .quantizer import STEP_EPS, codes, eager_forward
from .train import CheckpointError, Trainer, read_checkpoint

AGREEMENT_TARGET = 99.9  # percent of test images whose predicted class must agree with the fake quant's


class DeployLayer(nn.Module):
    """A trained QConv2d / QLinear frozen for deployment: int8 weight codes, step sizes, bias.
    path "int": the integer reference; "qdq": the fake quant as ONNX Q/DQ nodes (for export)."""

    def __init__(self, layer: QConv2d | QLinear, path: str):
        super().__init__()
        self.path, self.fan_in = path, layer.weight[0].numel()  # fan_in: products per output
        self.op = F.linear
        if isinstance(layer, QConv2d):
            geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
            self.op = partial(F.conv2d, **geometry, groups=layer.groups)
        wq, aq = layer.w_quant, layer.a_quant
        self.w_bits, self.a_bits = wq.bits, aq.bits
        self.why_float = ["", "input FP32", "weights FP32", "FP32"][2 * (wq.bits is None) + (aq.bits is None)]
        self.is_integer = not self.why_float
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        if wq.bits is None:
            self.register_buffer("weight", layer.weight.detach().float().clone())
        else:  # signed weights: |q_w| <= 128, int8
            self.register_buffer("w_scale", wq.step.detach().float().clamp_min(STEP_EPS))  # the forward's s
            k = codes(layer.weight.detach(), self.w_scale, wq.qn, wq.qp)
            self.register_buffer("w_codes", k.to(torch.int8))
        if aq.bits is not None:
            self.a_qn, self.a_qp, self.a_signed = aq.qn, aq.qp, aq.signed
            self.register_buffer("a_scale", aq.step.detach().float().clamp_min(STEP_EPS))
        if self.is_integer:  # every partial sum of the products, in any order, is an integer <= bound
            self.bound = self.fan_in * max(aq.qn, aq.qp) * max(wq.qn, wq.qp)
        self.max_abs_acc = 0  # the largest integer accumulator seen: it must fit int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.integer_forward(x) if self.path == "int" else self.qdq_forward(x)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = (self.weight, 1.0) if self.w_bits is None else (self.w_codes, float(self.w_scale))
        if self.a_bits is not None:
            x, scale = codes(x, self.a_scale, self.a_qn, self.a_qp), scale * float(self.a_scale)
        # integer sums are exact in float32 below 2^24 (float64: 2^53), unless matmuls may run in TF32 or bf16
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        fp32_exact = self.is_integer and not tf32 and self.bound < 2**24
        acc = self.gemm(x, w, torch.float32 if fp32_exact else torch.float64)
        if self.is_integer:
            self.max_abs_acc = max(self.max_abs_acc, int(acc.abs().max()))
        y = acc * scale  # one rescale (s_a * s_w is exact in float64), the bias, one rounding
        if self.bias is not None:
            y = y + self.bias.double().view(-1, *([1] * (y.dim() - 2)))
        return y.float()

    def gemm(self, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """conv(x, w) or linear(x, w) in `dtype` as matrix products, float64 out: oneDNN, NNPACK and
        cuDNN may pick Winograd or FFT convolutions, whose sums are not exact."""
        mkldnn, nnpack, cudnn = torch.backends.mkldnn, torch.backends.nnpack, torch.backends.cudnn
        with mkldnn.flags(False, None, None, None), nnpack.flags(False), cudnn.flags(False):
            return self.op(x.to(dtype), w.to(dtype)).double()

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
    try:  # None if onnx and onnxruntime import, else the reason
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"ONNX export skipped: {e.name or e} is not installed (pip install -r requirements-export.txt)"


def export_onnx(model: nn.Module, path: str, example: torch.Tensor) -> dict:
    """Write a quantized model to `path` as ONNX with Q/DQ nodes, atomically: input `image` (N dynamic),
    output `logits`, initializers <layer>.a_scale, .w_scale, .w_codes (int8). Returns the counts of nodes."""
    import onnx

    qdq, x, buf = deploy_model(model, "qdq").cpu(), (example[:1].float().cpu(),), io.BytesIO()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    names = {"input_names": ["image"], "output_names": ["logits"], "dynamic_axes": axes}
    # dynamo=False: the TorchScript exporter honours `symbolic` on autograd Functions;
    # do_constant_folding=False keeps the weights as int8 codes + DequantizeLinear
    with warnings.catch_warnings(action="ignore"):  # the TorchScript exporter announces its deprecation
        torch.onnx.export(qdq, x, buf, dynamo=False, do_constant_folding=False, opset_version=17, **names)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    ops = [n.op_type for n in proto.graph.node]
    return {k: ops.count(k) for k in ("QuantizeLinear", "DequantizeLinear", "Clip")}


@torch.no_grad()
def compare_paths(model: nn.Module, loader, onnx_path: str | None = None) -> dict:
    """Top-1 of the fake quant, the integer reference and (given an exported file) onnxruntime on `loader`;
    how often the last two's class is the fake quant's: {int,onnx}_agreement (%), _disagreements."""
    int_model = deploy_model(model.eval(), "int")
    layers = [(name, m) for name, m in int_model.named_modules() if isinstance(m, DeployLayer)]
    n_int = sum(m.is_integer for _, m in layers)
    paths = {"int": int_model} if n_int else {}
    if onnx_path:  # ConvBNFusion off: it folds float layers' batch norms into their weights, a float
        import onnxruntime as ort  # rounding change that flips classes near ties

        opts, cpu = ort.SessionOptions(), ["CPUExecutionProvider"]
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(onnx_path, opts, providers=cpu, disabled_optimizers=["ConvBNFusion"])
        paths["onnx"] = lambda x: torch.from_numpy(session.run(None, {"image": x.float().cpu().numpy()})[0])
    hits, agree, n = dict.fromkeys(["fake", *paths], 0), dict.fromkeys(paths, 0), 0
    for images, labels in loader:
        ref = model(images).argmax(1)
        hits["fake"] += int((ref == labels).sum())
        for k, run in paths.items():
            pred = run(images).argmax(1).to(ref.device)
            hits[k] += int((pred == labels).sum())
            agree[k] += int((pred == ref).sum())
        n += len(labels)
    floats = [f"{name} ({m.why_float})" for name, m in layers if m.why_float]
    r = {"n_images": n, "integer_layers": n_int, "float_layers": floats}
    for k in ("fake", "int", "onnx"):
        r[f"{k}_top1"] = 100.0 * hits[k] / n if k in hits else None
    for k in ("int", "onnx"):
        r[f"{k}_agreement"] = 100.0 * agree[k] / n if k in agree else None
        r[f"{k}_disagreements"] = n - agree[k] if k in agree else None
    r["int_max_abs_acc"] = max(m.max_abs_acc for _, m in layers) if n_int else None
    return r


def agreement_ok(r: dict, prefix: str) -> bool:
    """Path `prefix`'s classes agree with the fake quant's on AGREEMENT_TARGET %, or all but one."""
    allowed = max(1, int(r["n_images"] * (100 - AGREEMENT_TARGET) / 100 + 1e-6))
    return r[f"{prefix}_disagreements"] <= allowed


def checkpoint_file(path: str) -> str:
    """A sweep trial's checkpoint folder stands for the checkpoint.pt inside it."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def read_trained(path: str) -> dict:
    """A trainer checkpoint that holds its trial config; ConfigError where it is not one."""
    file = checkpoint_file(path)
    if file != path and not os.path.isfile(file):
        allowed = "a trainer checkpoint file, or a sweep trial's checkpoint_NNNNNN folder"
        raise ConfigError(f"checkpoint {path}: a folder without checkpoint.pt (allowed: {allowed})")
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
    """(model on the CPU in eval mode, data, config, checkpoint), built from the checkpoint's own config."""
    state = read_trained(path)
    values = {**state["config"], "init_from": None, "device": "cpu"}  # the checkpoint holds every weight
    if data_dir is not None:
        values["data_dir"] = data_dir
    cfg = TrialConfig.from_dict(values, where=f"config of checkpoint {path}")
    trainer = Trainer(cfg, data_dir_flag="--data_dir")
    if problem := state_mismatch(trainer.model.state_dict(), state["model"]):
        fit = f"its weights do not fit its config ({cfg.label()} {cfg.model})"
        raise ConfigError(f"checkpoint {path}: {fit}: {problem}")
    trainer.model.load_state_dict(state["model"])
    return trainer.model.cpu().eval(), trainer.data, cfg, state


def deployment_check(path: str, data_dir: str | None = None, out: str | None = None) -> dict:
    """compare_paths' figures, int_ok, export_ok and export_reason (why export_ok is not True)."""
    model, data, cfg, state = load_trained(path, data_dir)
    missing, failed, counts = onnx_missing(), None, None
    with tempfile.TemporaryDirectory(prefix="lsq-export-") as tmp:
        onnx_path = out or os.path.join(tmp, "model.onnx")
        try:
            counts = None if missing else export_onnx(model, onnx_path, next(iter(data.test))[0])
        except OSError as e:
            raise ConfigError(f"cannot write the ONNX file {onnx_path}: {e.strerror or e}") from None
        except Exception as e:  # the exporter failed: a finding for the report, not a crash
            failed = f"ONNX export failed: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        r = compare_paths(model, data.test, counts and onnx_path)
    r.update(label=cfg.label(), model=cfg.model, dataset=cfg.dataset, epoch=state.get("epoch"))
    r.update(agreement=r["int_agreement"], onnx_nodes=counts, onnx_path=counts and out)
    r["int_ok"] = None if r["int_agreement"] is None else agreement_ok(r, "int")
    r["export_ok"] = agreement_ok(r, "onnx") if counts else None if missing else False
    if r["export_ok"] is False and not failed:
        target = f"target >= {AGREEMENT_TARGET}%, or all but one"
        failed = f"onnxruntime: classes agree on {r['onnx_agreement']:.2f}% of images ({target})"
    r["export_reason"] = missing or failed
    return r


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
            default = flag == "--out" and not out_given
            hint = " (the default: the checkpoint's path with .onnx)" if default else ""
            allowed = "another path" + (", given with --out" if default else "")
            what = f"{flag} {path}{hint}: is the checkpoint being read ({read})"
            raise ConfigError(f"{what}; allowed: {allowed}")
    if json_path is not None and os.path.realpath(json_path) == os.path.realpath(out):
        raise ConfigError(f"--json {json_path}: is also the ONNX file (--out {out}); allowed: another path")


def file_identity(path: str):
    """(mtime, inode) of a file, None where there is none: atomic_write changes both."""
    return (os.stat(path).st_mtime_ns, os.stat(path).st_ino) if os.path.exists(path) else None


def print_figures(r: dict, out: str) -> None:
    trial = f"{r['label']} {r['model']} on {r['dataset']}, epoch {r['epoch']}"
    print(f"{trial}: {r['n_images']} test images; float layers: {', '.join(r['float_layers']) or 'none'}")
    if nodes := r["onnx_nodes"]:
        print(f"wrote {out} ({', '.join(f'{count} {op}' for op, count in nodes.items())})")
    for k in ("fake", "int", "onnx"):  # fake: the fake quant; int: integer inference; onnx: onnxruntime
        top1, agree = r[f"{k}_top1"], r.get(f"{k}_agreement")
        agreed = "" if agree is None else f"  classes agree {agree:.2f}%"
        print(f"{k}_top1 {'n/a' if top1 is None else f'{top1:.2f}'}{agreed}")
    print(f"int_ok {r['int_ok']}  export_ok {r['export_ok']}")
    if r["export_reason"]:
        print(r["export_reason"])


def main(argv=None) -> int:
    about = "Export a trained LSQ checkpoint to ONNX (QDQ, learned steps); check it and integer inference."
    p = argparse.ArgumentParser(prog="python -m lsq.export", description=about, epilog=EXIT_HELP)
    p.add_argument("checkpoint", help="a trainer checkpoint (.pt), or a trial's checkpoint_NNNNNN folder")
    p.add_argument("--out", help="ONNX file (default: the checkpoint's with .onnx, or <trial>_<folder>.onnx)")
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
