"""BitPolicy / quantize_model / describe: exactly the expected bits on every layer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from paper_formulas import paper_range
from torch import nn

from lsq.config import ConfigError
from lsq.layers import QConv2d, QLinear
from lsq.models import build_model
from lsq.policy import BitPolicy, describe, init_steps, quantize_model

W, A = 4, 3  # body bits, chosen different from each other and from 8

# preset / explicit spec -> (weight bits, activation bits) of that end, for a W4A3 body
EXPECTED_END = {
    "body": (W, A),
    "fp32": (None, None),
    "w_body_a_fp32": (W, None),
    "w8_a_fp32": (8, None),
    "w8a8": (8, 8),
    "w6a5": (6, 5),
    "w2a32": (2, None),
    (5, 7): (5, 7),
}
SPECS = list(EXPECTED_END)
SPEC_IDS = [s if isinstance(s, str) else f"tuple{s}" for s in SPECS]


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def first_and_last(model: nn.Module) -> tuple[str, str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return convs[0], linears[-1]


@pytest.fixture(scope="module")
def fp32_models():
    torch.manual_seed(0)
    return {name: build_model(name, 10) for name in ("resnet20", "resnet18")}


def quantized(fp32_models, name, policy, **kw):
    original = fp32_models[name]
    model = quantize_model(copy.deepcopy(original), policy, **kw)
    return original, model


def check_rows(df, names, first, last, expect_first, expect_body, expect_last):
    assert list(df.columns) == [
        "layer",
        "kind",
        "w_bits",
        "a_bits",
        "a_signed",
        "w_step",
        "a_step",
        "w_rel_mse",
    ]
    assert len(df) == len(names)
    assert list(df["layer"]) == names  # model order
    for row in df.itertuples():
        expected = expect_first if row.layer == first else expect_last if row.layer == last else expect_body
        assert (row.w_bits, row.a_bits) == expected, row.layer
        assert row.kind == ("linear" if row.layer == last else "conv")
        # signedness: only the first layer's input is signed; None where the input is FP32
        if row.a_bits is None:
            assert row.a_signed is None and row.a_step is None
        else:
            assert row.a_signed is (row.layer == first)
            assert isinstance(row.a_step, float)
        if row.w_bits is None:
            assert row.w_step is None and row.w_rel_mse == 0.0
        else:
            assert isinstance(row.w_step, float) and row.w_rel_mse > 0


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_first_layer_preset(fp32_models, model_name, spec):
    original, model = quantized(fp32_models, model_name, BitPolicy(W, A, first=spec))
    names = layer_names(original)
    first, last = first_and_last(original)
    assert first == "conv1" and last == "fc"
    check_rows(describe(model), names, first, last, EXPECTED_END[spec], (W, A), (8, 8))


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_last_layer_preset(fp32_models, model_name, spec):
    original, model = quantized(fp32_models, model_name, BitPolicy(W, A, last=spec))
    names = layer_names(original)
    first, last = first_and_last(original)
    check_rows(describe(model), names, first, last, (8, 8), (W, A), EXPECTED_END[spec])


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
def test_both_ends_at_once_and_defaults(fp32_models, model_name):
    assert BitPolicy(W, A).first == "w8a8" and BitPolicy(W, A).last == "w8a8"
    original, model = quantized(fp32_models, model_name, BitPolicy(W, A, first="fp32", last="w_body_a_fp32"))
    first, last = first_and_last(original)
    check_rows(describe(model), layer_names(original), first, last, (None, None), (W, A), (W, None))


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("first,last", [("w8a8", "w8a8"), ("body", "w4a8"), ((8, 8), (2, 2))])
def test_fp32_body_keeps_whole_model_fp32(fp32_models, model_name, first, last):
    original, model = quantized(fp32_models, model_name, BitPolicy(None, None, first=first, last=last))
    df = describe(model)
    assert len(df) == len(layer_names(original))
    assert df["w_bits"].isna().all() and df["a_bits"].isna().all()
    assert all(v is None for v in df["w_bits"]) and all(v is None for v in df["a_bits"])
    assert all(
        q.step is None for m in model.modules() for q in [getattr(m, "w_quant", None)] if q is not None
    )
    # and it computes exactly what the FP32 model computes
    x = torch.randn(2, 3, 32, 32)
    original.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_fp32_model_describe_has_one_row_per_layer(fp32_models):
    df = describe(fp32_models["resnet20"])
    assert list(df["layer"]) == layer_names(fp32_models["resnet20"])
    assert all(v is None for v in df["w_bits"])


@pytest.mark.parametrize("model_name", ["resnet20", "resnet18"])
def test_fp32_weights_kept_and_layers_swapped(fp32_models, model_name):
    original, model = quantized(fp32_models, model_name, BitPolicy(2, 2))
    orig_modules = dict(original.named_modules())
    for name in layer_names(original):
        o, q = orig_modules[name], model.get_submodule(name)
        assert type(q) is (QConv2d if isinstance(o, nn.Conv2d) else QLinear)
        assert torch.equal(q.weight, o.weight), name
        assert (q.bias is None) == (o.bias is None)
        if o.bias is not None:
            assert torch.equal(q.bias, o.bias)
        if isinstance(o, nn.Conv2d):
            assert (q.stride, q.padding, q.kernel_size, q.groups) == (
                o.stride,
                o.padding,
                o.kernel_size,
                o.groups,
            )
    # everything else (BatchNorm etc.) is untouched: the FP32 state dict is a subset
    qstate = model.state_dict()
    for k, v in original.state_dict().items():
        assert torch.equal(qstate[k], v), k
    extra = set(qstate) - set(original.state_dict())
    assert extra and all(k.rsplit(".", 2)[-2] in ("w_quant", "a_quant") for k in extra)


def test_grad_scale_options_reach_every_quantizer(fp32_models):
    _, model = quantized(fp32_models, "resnet20", BitPolicy(4, 4), grad_scale_n="numel", grad_scale=False)
    qs = [m for m in model.modules() if hasattr(m, "grad_scale_n") and m.bits is not None]
    assert len(qs) == 2 * len(layer_names(fp32_models["resnet20"]))
    assert all(q.grad_scale_n == "numel" and q.grad_scale is False for q in qs)


@pytest.mark.parametrize(
    "model_name,policy",
    [
        ("resnet18", BitPolicy(4, 4)),
        ("resnet20", BitPolicy(2, 2, first="body", last="w8_a_fp32")),
    ],
)
def test_quantized_model_runs_forward_backward(fp32_models, model_name, policy, seed):
    _, model = quantized(fp32_models, model_name, policy)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=seed)
    y = torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    steps = [(n, p) for n, p in model.named_parameters() if n.endswith(".step")]
    assert steps
    for n, p in steps:
        assert p.grad is not None and torch.isfinite(p.grad), n
    assert sum(float(p.grad) != 0 for _, p in steps) > len(steps) // 2
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    # after that first training forward every step is initialized; check describe's numbers
    df = describe(model).set_index("layer")
    for name in layer_names(model):
        m = model.get_submodule(name)
        if m.w_quant.bits is None:
            continue
        qn, qp = 2 ** (m.w_quant.bits - 1), 2 ** (m.w_quant.bits - 1) - 1
        w = m.weight.detach().double().numpy()
        s0 = 2 * np.abs(w).mean() / math.sqrt(qp)  # the paper's init
        assert df.loc[name, "w_step"] == pytest.approx(s0, rel=1e-5)
        s = df.loc[name, "w_step"]
        w_hat = np.round(np.clip(w / s, -qn, qp)) * s
        rel = ((w_hat - w) ** 2).sum() / (w**2).sum()
        assert df.loc[name, "w_rel_mse"] == pytest.approx(rel, rel=1e-4)
        assert 0 < df.loc[name, "w_rel_mse"] < 1


@pytest.mark.parametrize("training", [True, False], ids=["from-train-mode", "from-eval-mode"])
def test_init_steps_sets_every_step_and_leaves_batchnorm_and_the_mode_alone(fp32_models, training, seed):
    """init_steps is one pass that sets every step size to the paper's 2 * mean(|v|) / sqrt(Qp)
    (section 2.1; v: the layer's weight, or its input in that pass), and nothing else: the
    BatchNorm running statistics (and their batch count) stay as they were, and the model and
    every submodule are left in the train/eval mode they were in."""
    _, model = quantized(fp32_models, "resnet20", BitPolicy(W, A))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    with torch.no_grad():  # statistics as after some training: batch statistics would differ from them
        for bn in bns:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=seed) * 0.1)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=seed) + 0.5)
            bn.num_batches_tracked.fill_(7)
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    model.train(training)
    inputs = {}
    names = layer_names(model)
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, args[0].clone())
        )
    images = torch.randn(8, 3, 32, 32, generator=seed)

    init_steps(model, images)

    for bn, saved in zip(bns, before):
        for k, v in bn.state_dict().items():
            assert torch.equal(v, saved[k]), k
    assert model.training is training and all(m.training is training for m in model.modules())
    first, last = first_and_last(model)
    assert torch.equal(inputs[first], images)
    for name in names:
        m = model.get_submodule(name)
        w_bits, a_bits = EXPECTED_END["w8a8"] if name in (first, last) else (W, A)
        assert (m.w_quant.bits, m.a_quant.bits) == (w_bits, a_bits), name
        w_step = (
            2
            * m.weight.detach().double().abs().mean().item()
            / math.sqrt(paper_range(w_bits, signed=True)[1])
        )
        a_step = (
            2
            * inputs[name].double().abs().mean().item()
            / math.sqrt(paper_range(a_bits, signed=name == first)[1])
        )
        assert m.w_quant.step.item() == pytest.approx(w_step, rel=1e-5), name
        assert m.a_quant.step.item() == pytest.approx(a_step, rel=1e-5), name
        assert bool(m.w_quant.initialized) and bool(m.a_quant.initialized), name


def test_unknown_end_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="w9z9"):
        BitPolicy(4, 4, first="w9z9").end("first")
