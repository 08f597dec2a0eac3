"""build_model, load_fp32 and read_state_dict."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from lsq.config import ConfigError
from lsq.models import build_model, load_fp32, read_state_dict


def count_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


# ------------------------------------------------------------------------------- CIFAR ResNets
@pytest.mark.parametrize(
    "name,n", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9)]
)
def test_cifar_resnet_depth_and_forward(name, n):
    torch.manual_seed(0)
    model = build_model(name, 10)
    assert count_layers(model) == 6 * n + 2 == int(name[len("resnet") :])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (3, 3) for m in convs)  # option A: no 1x1 projection shortcuts
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 64 and linears[0].out_features == 10
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_resnet20_parameter_count():
    params = sum(p.numel() for p in build_model("resnet20", 10).parameters())
    assert 260_000 <= params <= 280_000


def test_option_a_shortcut_subsamples_and_zero_pads():
    model = build_model("resnet20", 10)
    block = model.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    sc = block.shortcut(x)
    assert sc.shape == (2, 32, 4, 4)
    sub = x[:, :, ::2, ::2]
    assert torch.equal(sc[:, 8:24], sub)
    assert torch.count_nonzero(sc[:, :8]) == 0 and torch.count_nonzero(sc[:, 24:]) == 0
    # identity where the shape does not change
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(model.layer1[0].shortcut(x), x)


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_in_channels_and_num_classes(name):
    model = build_model(name, 7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


# ------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("name,layers", [("resnet18", 21), ("resnet34", 37), ("resnet50", 54)])
def test_torchvision_resnets(name, layers):
    model = build_model(name, 10)
    assert count_layers(model) == layers
    assert model.fc.out_features == 10
    if name == "resnet18":
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="resnet21") as err:
        build_model("resnet21", 10)
    assert "model" in str(err.value)


# ------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def small_state():
    torch.manual_seed(0)
    return build_model("resnet20", 10).state_dict()


def assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "torchvision_ckpt", "module_prefix"])
def test_read_state_dict_layouts_and_load_fp32(tmp_path, small_state, layout):
    if layout == "plain":
        obj = small_state
    elif layout == "torchvision_ckpt":
        model = build_model("resnet20", 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        obj = {"model": small_state, "optimizer": opt.state_dict(), "epoch": 3, "args": {"lr": 0.1}}
    elif layout == "module_prefix":
        obj = {"module." + k: v for k, v in small_state.items()}
    else:
        obj = {layout: small_state}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)

    assert_same_state(read_state_dict(str(path)), small_state)

    torch.manual_seed(1)
    fresh = build_model("resnet20", 10)
    assert not torch.equal(fresh.conv1.weight, small_state["conv1.weight"])
    out = load_fp32(fresh, str(path), "resnet20")
    assert out is fresh
    assert_same_state(fresh.state_dict(), small_state)


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path, small_state):
    state = dict(small_state)
    del state["layer2.1.conv1.weight"]
    state["extra.head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_fp32(build_model("resnet20", 10), str(path), "resnet20")
    msg = str(err.value)
    assert "missing" in msg and "layer2.1.conv1.weight" in msg
    assert "unexpected" in msg and "extra.head.weight" in msg


def test_shape_mismatch_is_a_config_error(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(build_model("resnet20", 100).state_dict(), path)
    with pytest.raises(ConfigError, match="fc.weight"):
        load_fp32(build_model("resnet20", 10), str(path), "resnet20")


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, small_state):
    # positive control: the payload really does run code when unpickled without protection
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned_marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": small_state, "x": _Payload(marker)}, path)
    with pytest.raises(ConfigError) as err:
        read_state_dict(str(path))
    assert "evil.pt" in str(err.value)
    assert not marker.exists()
    with pytest.raises(ConfigError):
        load_fp32(build_model("resnet20", 10), str(path), "resnet20")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [os.urandom(4096), b"", b"hello, not a checkpoint\n"], ids=["random", "empty", "text"]
)
def test_non_checkpoint_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="junk.bin"):
        read_state_dict(str(path))


def test_non_state_dict_contents_and_missing_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConfigError, match="list.pt"):
        read_state_dict(str(path))
    with pytest.raises(ConfigError, match="nope.pt"):
        read_state_dict(str(tmp_path / "nope.pt"))
