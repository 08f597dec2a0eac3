"""TrialConfig validation: every mistake is one ConfigError naming the key and the value."""

from __future__ import annotations

import pytest

from lsq.config import ConfigError, TrialConfig


def error(values: dict) -> str:
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(values)
    return str(err.value)


def test_defaults_are_valid():
    assert TrialConfig.from_dict({}) == TrialConfig()
    cfg = TrialConfig()
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------- bits
@pytest.mark.parametrize("key", ["w_bits", "a_bits"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bits_in_range_accepted(key, bits):
    assert getattr(TrialConfig.from_dict({key: bits}), key) == bits


@pytest.mark.parametrize("key", ["w_bits", "a_bits"])
@pytest.mark.parametrize("bits", [-4, 0, 1, 9, 16, 31, 33, 64])
def test_bits_out_of_range_rejected(key, bits):
    msg = error({key: bits})
    assert key in msg and str(bits) in msg
    assert "2..8" in msg


@pytest.mark.parametrize("key", ["w_bits", "a_bits"])
@pytest.mark.parametrize("value", [32, "32", None, "none", "fp32"])
def test_32_and_none_mean_fp32(key, value):
    assert getattr(TrialConfig.from_dict({key: value}), key) is None


def test_fp32_body_is_fp32_baseline():
    cfg = TrialConfig.from_dict({"w_bits": 32, "a_bits": None, "first": "w8a8"})
    assert cfg.is_fp32 and cfg.label() == "FP32"
    assert cfg.end_bits("first") == (None, None) and cfg.end_bits("last") == (None, None)


@pytest.mark.parametrize(
    "w_bits, a_bits, label",
    [(4, 8, "W4A8"), (8, 4, "W8A4"), (2, 3, "W2A3"), (3, None, "W3A32"), (None, 2, "W32A2")],
)
def test_label_names_weight_bits_then_activation_bits(w_bits, a_bits, label):
    """The tables' label is 'W<weight bits>A<activation bits>', 32 standing for FP32 on one side:
    with unequal bits, 4-bit weights and 8-bit activations are W4A8, never A8W4 or W8A4."""
    assert TrialConfig.from_dict({"w_bits": w_bits, "a_bits": a_bits}).label() == label


@pytest.mark.parametrize("key", ["w_bits", "a_bits"])
@pytest.mark.parametrize("value", ["four", 4.5, True, [4], float("inf"), float("-inf"), float("nan")])
def test_bits_wrong_type_rejected(key, value):
    msg = error({key: value})
    assert key in msg and repr(value) in msg


# ------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("wd", [-1e-4, -1])
def test_negative_wd_rejected(wd):
    msg = error({"wd": wd})
    assert "'wd'" in msg and repr(float(wd)) in msg


def test_zero_wd_accepted():
    assert TrialConfig.from_dict({"wd": 0}).wd == 0.0


@pytest.mark.parametrize("lr", [0, 0.0, -0.1])
def test_non_positive_lr_rejected(lr):
    msg = error({"lr": lr})
    assert "'lr'" in msg and repr(float(lr)) in msg


@pytest.mark.parametrize(
    "key,value",
    [
        ("epochs", "ten"),
        ("epochs", 2.5),
        ("epochs", True),
        ("lr", "fast"),
        ("lr", float("nan")),
        ("wd", [1e-4]),
        ("nesterov", "maybe"),
        ("model", 20),
        ("batch_size", None),
        ("first", 8),
        ("last", None),
    ],
)
def test_wrong_type_rejected(key, value):
    msg = error({key: value})
    assert f"'{key}'" in msg and repr(value) in msg


def test_nesterov_without_momentum_rejected():
    """torch's SGD refuses it only when the trial starts: every trial of a sweep would fail."""
    msg = error({"nesterov": True, "momentum": 0})
    assert "'nesterov'" in msg and "momentum > 0" in msg
    assert TrialConfig.from_dict({"nesterov": True, "momentum": 0.9}).nesterov
    assert TrialConfig.from_dict({"nesterov": False, "momentum": 0}).momentum == 0


def test_strings_from_a_command_line_are_converted():
    cfg = TrialConfig.from_dict({"epochs": "3", "lr": "0.5", "nesterov": "true", "w_bits": 4.0})
    assert (cfg.epochs, cfg.lr, cfg.nesterov, cfg.w_bits) == (3, 0.5, True, 4)


# ------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "key,value,suggestion",
    [
        ("model", "resnt20", "resnet20"),
        ("model", "resnet_18", "resnet18"),
        ("dataset", "cifar1", "cifar10"),
        ("dataset", "digit", "digits"),
        ("first", "w8_a_fp3", "w8_a_fp32"),
        ("last", "w8a8x", "w8a8"),
        ("first", "fp3", "fp32"),
    ],
)
def test_unknown_choice_did_you_mean(key, value, suggestion):
    msg = error({key: value})
    assert f"'{key}'" in msg and value in msg
    assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize(
    "key,suggestion",
    [("w_bit", "w_bits"), ("epoch", "epochs"), ("learning_rat", None), ("datset", "dataset")],
)
def test_unknown_key_did_you_mean(key, suggestion):
    msg = error({key: 1})
    assert f"'{key}'" in msg
    if suggestion:
        assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize("spec", ["w8a9", "w1a8", "w16a16"])
def test_explicit_end_bits_out_of_range(spec):
    msg = error({"first": spec})
    assert "'first'" in msg and spec in msg


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("body", (4, 3)),
        ("fp32", (None, None)),
        ("w_body_a_fp32", (4, None)),
        ("w8_a_fp32", (8, None)),
        ("w8a8", (8, 8)),
        ("w4a8", (4, 8)),
        ("W2A32", (2, None)),
        (" w8a8 ", (8, 8)),
    ],
)
def test_end_presets_resolve(spec, expected):
    cfg = TrialConfig.from_dict({"w_bits": 4, "a_bits": 3, "first": spec, "last": spec})
    assert cfg.end_bits("first") == expected and cfg.end_bits("last") == expected


# ------------------------------------------------------------------------------- cross checks
def test_dataset_needs_data_dir():
    msg = error({"dataset": "cifar10"})
    assert "data_dir" in msg and "cifar10" in msg


def test_init_from_missing_file(tmp_path):
    missing = str(tmp_path / "nope.pt")
    msg = error({"init_from": missing})
    assert "init_from" in msg and missing in msg


def test_torchvision_init_needs_torchvision_model():
    msg = error({"init_from": "torchvision", "model": "resnet20"})
    assert "init_from" in msg and "resnet20" in msg
