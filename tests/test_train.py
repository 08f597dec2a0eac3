"""The trainer without Ray: accuracy on digits, init_from, exact resume, the single-run CLI."""

import contextlib
import dataclasses
import itertools
import math
import types

import pytest
import torch

from lsq.config import ConfigError, TrialConfig
from lsq.policy import BitPolicy, describe, init_steps, quantize_model, quantizers
from lsq.train import (
    CheckpointError,
    DivergedError,
    Trainer,
    lr_factor,
    main,
    param_groups,
    parse_args,
    precision,
    same_trial,
    uses_channels_last,
)

FAST = {"dataset": "digits", "model": "resnet20", "epochs": 3, "lr": 0.1, "batch_size": 64, "seed": 1}
W4A4 = {**FAST, "w_bits": 4, "a_bits": 4}


def run(cfg):
    trainer = Trainer(TrialConfig.from_dict(cfg))
    return trainer, list(trainer.epochs())


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """An FP32 resnet20 trained on digits, saved as the trainer's checkpoint dict."""
    trainer, history = run({**FAST, "w_bits": None, "a_bits": None, "epochs": 6})
    path = tmp_path_factory.mktemp("fp32") / "fp32.pt"
    trainer.save(str(path))
    return path, trainer, history


@pytest.fixture(scope="module")
def w4a4_history():
    """The metrics of an uninterrupted eager W4A4 run of FAST: what a resumed run must reproduce to
    the last bit."""
    return run(W4A4)[1]


@pytest.mark.slow  # trains to accuracy
def test_fp32_learns_digits(fp32_checkpoint):
    _, _, history = fp32_checkpoint
    assert history[-1]["top1"] >= 95.0
    assert [m["epoch"] for m in history] == list(range(1, 7))
    for m in history:
        assert 0 <= m["top1"] <= m["top5"] <= 100 and m["images_per_second"] > 0


@pytest.mark.slow  # trains to accuracy
def test_init_from_w8a8_keeps_fp32_accuracy(fp32_checkpoint):
    """An FP32 state_dict loaded and quantized at W8A8 stays within 1 point of FP32 (no training)."""
    path, fp32, _ = fp32_checkpoint
    fp32_top1 = fp32.evaluate()["top1"]
    for key in ("model", "state_dict", None):  # the three accepted checkpoint layouts
        state = fp32.model.state_dict()
        blob = state if key is None else {key: state}
        p = path.parent / f"layout-{key}.pt"
        torch.save(blob, p)
        trainer = Trainer(TrialConfig.from_dict({**FAST, "w_bits": 8, "a_bits": 8, "init_from": str(p)}))
        images, _ = next(iter(trainer.data.train))
        init_steps(trainer.model, images)
        q_top1 = trainer.evaluate()["top1"]
        assert abs(q_top1 - fp32_top1) <= 1.0, (key, q_top1, fp32_top1)
        table = describe(trainer.model)
        assert (table.w_bits == 8).all() and (table.a_bits == 8).all()


def test_init_from_mismatch_names_keys(tmp_path):
    state = Trainer(TrialConfig.from_dict({**FAST, "w_bits": None, "a_bits": None})).model.state_dict()
    state["bogus.weight"] = torch.zeros(1)
    del state["fc.bias"]
    p = tmp_path / "bad.pt"
    torch.save(state, p)
    with pytest.raises(ConfigError, match=r"missing keys: fc\.bias.*unexpected keys: bogus\.weight"):
        Trainer(TrialConfig.from_dict({**FAST, "init_from": str(p)}))


def test_init_from_a_quantized_checkpoint_says_so(tmp_path):
    """A QAT checkpoint passed as init_from: told what it is, not given a list of 40 odd keys."""
    trainer = Trainer(TrialConfig.from_dict({**FAST, "w_bits": 4, "a_bits": 4}))
    p = tmp_path / "w4a4.pt"
    trainer.save(str(p))
    with pytest.raises(
        ConfigError, match=r"w4a4\.pt' is a quantized model \(it holds LSQ step sizes\); allowed: an FP32"
    ):
        Trainer(TrialConfig.from_dict({**FAST, "init_from": str(p)}))


def test_init_from_with_nan_weights_is_a_clear_error(tmp_path):
    state = Trainer(TrialConfig.from_dict({**FAST, "w_bits": None, "a_bits": None})).model.state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(state, p)
    with pytest.raises(
        ConfigError, match=r"nan\.pt' holds NaN or infinite values \(conv1\.weight\); allowed: a checkpoint"
    ):
        Trainer(TrialConfig.from_dict({**FAST, "init_from": str(p)}))


@pytest.mark.slow  # trains to accuracy
def test_w4a4_learns_and_resume_is_exact(tmp_path, w4a4_history):
    """Stop after epoch 1, restore into a fresh trainer: the same metrics to the last bit."""
    full = w4a4_history
    assert full[-1]["top1"] >= 75.0  # 88 % here after 3 epochs from scratch; chance is 10 %

    first = Trainer(TrialConfig.from_dict(W4A4))
    epochs = first.epochs()
    head = [next(epochs)]
    first.save(str(tmp_path / "ep1.pt"))
    del first, epochs

    resumed = Trainer(TrialConfig.from_dict(W4A4))
    resumed.load(str(tmp_path / "ep1.pt"))
    assert (resumed.epoch, resumed.best_top1, resumed.history) == (1, head[0]["best_top1"], head)
    tail = list(resumed.epochs())
    timing = ("epoch_seconds", "images_per_second")
    strip = [[{k: v for k, v in m.items() if k not in timing} for m in ms] for ms in (head + tail, full)]
    assert strip[0] == strip[1]
    assert [m["epoch"] for m in tail] == [2, 3]
    # the restored quantizers did not re-initialize: steps equal the uninterrupted run's path
    assert all(bool(q.initialized) for q in resumed.model.modules() if hasattr(q, "initialized"))


def test_which_checkpoints_a_trial_accepts_as_its_own():
    """Resuming may change where the data is, how long to train and how to run (device, compile,
    the deployment check), never what is trained; a checkpoint written before a key existed is
    read with that key's default."""
    cfg = TrialConfig.from_dict({**FAST, "w_bits": 2, "a_bits": 2})
    stored = cfg.to_dict()
    assert same_trial(stored, cfg.replace(epochs=9, device="cpu", compile="default", deploy_check=False))
    for change in ({"lr": 0.2}, {"w_bits": 4}, {"first": "fp32"}, {"seed": 2}, {"amp": False}):
        assert not same_trial(stored, cfg.replace(**change)), change
    older = {k: v for k, v in stored.items() if k not in ("amp", "deploy_check")}
    assert same_trial(older, cfg) and not same_trial(older, cfg.replace(amp=False))
    assert not same_trial(None, cfg) and not same_trial({**stored, "unknown_key": 1}, cfg)


def test_checkpoint_of_other_trial_is_refused(tmp_path):
    a = Trainer(TrialConfig.from_dict({**FAST, "epochs": 1}))
    a.save(str(tmp_path / "a.pt"))
    b = Trainer(TrialConfig.from_dict({**FAST, "epochs": 1, "w_bits": 2, "a_bits": 2}))
    with pytest.raises(CheckpointError, match="different trial config"):
        b.load(str(tmp_path / "a.pt"))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    a = Trainer(TrialConfig.from_dict({**FAST, "epochs": 1}))
    a.save(str(tmp_path / "a.pt"))
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        a.load(str(tmp_path / "cut.pt"))


def test_divergence_is_detected():
    trainer = Trainer(
        TrialConfig.from_dict({**FAST, "epochs": 1, "lr": 1e12, "w_bits": None, "a_bits": None})
    )
    with pytest.raises(DivergedError, match="training loss became"):
        list(trainer.epochs())


@pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before"
)  # (no optimizer step: training is stubbed)
def test_best_top1_is_the_running_maximum_through_a_dip(monkeypatch):
    """best_top1 after each epoch is the highest top-1 so far: top-1 50, 70, 60, 65 gives best
    50, 70, 70, 70, in every epoch's metrics, the history and the trainer's own best_top1."""
    top1s = [50.0, 70.0, 60.0, 65.0]
    trainer = Trainer(TrialConfig.from_dict({**FAST, "epochs": len(top1s), "w_bits": None, "a_bits": None}))
    scripted = iter([{"top1": t, "top5": 99.0, "loss": 0.5} for t in top1s])
    monkeypatch.setattr(trainer, "train_one_epoch", lambda: 0.25)
    monkeypatch.setattr(trainer, "evaluate", lambda: dict(next(scripted)))
    ticks = itertools.count()  # a clock that moves 1 s a reading: no zero-length epoch to divide by
    monkeypatch.setattr("lsq.train.time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))

    metrics = list(trainer.epochs())
    assert [m["top1"] for m in metrics] == top1s
    assert [m["best_top1"] for m in metrics] == [50.0, 70.0, 70.0, 70.0]
    assert [m["best_top1"] for m in trainer.history] == [50.0, 70.0, 70.0, 70.0]
    assert trainer.best_top1 == 70.0


def test_evaluate_returns_top1_top5_and_mean_cross_entropy_as_defined():
    """evaluate() on a test set of known logits (the model passes its input through): top-1 is the
    percentage of samples whose label has the highest logit, top-5 the percentage whose label is
    among the 5 highest, loss the mean over samples (not over batches) of the cross-entropy
    -log softmax(z)[y] = log(sum_j exp(z_j)) - z_y, computed here with math."""
    trainer = Trainer(TrialConfig.from_dict({**FAST, "epochs": 1, "w_bits": None, "a_bits": None}))
    down = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0]  # 7 classes, class 0 highest ... class 6 lowest
    up = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # class 6 highest ... class 2 fifth
    samples = [  # (logits, label, label is the highest, label among the 5 highest)
        (down, 0, True, True),
        (down, 3, False, True),
        (down, 6, False, False),  # batch of 3
        (up, 2, False, True),
    ]  # batch of 1
    batches = [samples[:3], samples[3:]]
    test = [(torch.tensor([s[0] for s in b]), torch.tensor([s[1] for s in b])) for b in batches]
    trainer.model = torch.nn.Identity()
    trainer.data = dataclasses.replace(trainer.data, test=test, num_classes=7)

    m = trainer.evaluate()
    n = len(samples)
    ce = [math.log(sum(math.exp(z) for z in logits)) - logits[y] for logits, y, _, _ in samples]
    assert m["top1"] == pytest.approx(100.0 * sum(s[2] for s in samples) / n) == 25.0
    assert m["top5"] == pytest.approx(100.0 * sum(s[3] for s in samples) / n) == 75.0
    assert m["loss"] == pytest.approx(sum(ce) / n, rel=1e-6)
    assert m["loss"] != pytest.approx(
        (sum(ce[:3]) / 3 + ce[3]) / 2, rel=1e-3
    )  # (the mean of batch means differs)

    # fewer than 5 classes: every label is among the top 5, so top-5 is 100
    trainer.data = dataclasses.replace(
        trainer.data, test=[(torch.tensor([[2.0, 1.0, 0.0]] * 2), torch.tensor([0, 2]))], num_classes=3
    )
    m = trainer.evaluate()
    assert (m["top1"], m["top5"]) == (50.0, 100.0)
    assert m["loss"] == pytest.approx(math.log(math.exp(2) + math.exp(1) + 1) - (2.0 + 0.0) / 2, rel=1e-6)


def test_step_sizes_excluded_from_weight_decay():
    model = quantize_model(
        torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2)),
        BitPolicy(4, 4),
    )
    steps = {id(p) for n, p in model.named_parameters() if n.endswith("step")}
    groups = param_groups(model, wd=1e-4)
    assert {id(p) for p in groups[1]["params"]} == steps and groups[1]["weight_decay"] == 0.0
    assert not steps & {id(p) for p in groups[0]["params"]} and groups[0]["weight_decay"] == 1e-4
    assert param_groups(model, wd=1e-4, step_wd=True)[1]["weight_decay"] == 1e-4


def test_cifar_resnets_train_in_channels_last_on_the_cpu():
    """bench/layout.py: channels_last makes a CIFAR ResNet's CPU step 1.1-1.25x faster. (That the
    loaders then yield channels_last batches: tests/test_data.py.)"""
    trainer = Trainer(TrialConfig.from_dict({**FAST, "epochs": 1}))
    convs = [
        m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1
    ]
    assert convs and all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
    )
    assert not uses_channels_last(torch.device("cpu"), "resnet18")  # measured no faster there


def test_lr_schedules():
    cos = TrialConfig.from_dict({"epochs": 10, "warmup_epochs": 2})
    assert lr_factor(cos, 0) == pytest.approx(1 / 3) and lr_factor(cos, 1) == pytest.approx(2 / 3)
    assert lr_factor(cos, 2) == 1.0
    assert lr_factor(cos, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    step = TrialConfig.from_dict({"epochs": 90, "schedule": "step", "lr_step_size": 30, "lr_gamma": 0.1})
    assert [lr_factor(step, e) for e in (0, 29, 30, 60)] == pytest.approx([1, 1, 0.1, 0.01])


def test_bf16_rounds_the_8_bit_grid_and_amp_false_trains_cuda_in_exact_float32():
    """Why amp exists: bf16 keeps 7 mantissa bits, so bf16(k*s) lies up to |k|/256 of a step
    from k*s, and at 8 bits some adjacent levels become one. amp=false must turn off bf16
    autocast and TF32 (10 mantissa bits, the same kind of rounding) on CUDA; the CPU never
    autocasts."""
    k = torch.arange(256, dtype=torch.float32)
    s = torch.tensor(0.0123)  # a step size as training leaves it, not a power of two
    grid = k * s
    off = ((grid.bfloat16().float() - grid) / s).abs()
    assert bool((off <= k / 256 + 1e-6).all()) and float(off.max()) > 0.25
    assert len(torch.unique(grid.bfloat16())) < 256  # levels merged

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        assert precision(torch.device("cuda"), amp=False) is contextlib.nullcontext
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        bf16 = precision(torch.device("cuda"), amp=True)
        assert (bf16.func, bf16.args, bf16.keywords) == (torch.autocast, ("cuda",), {"dtype": torch.bfloat16})
        assert torch.backends.cudnn.allow_tf32  # a reused worker's next trial gets PyTorch's default back
        assert precision(torch.device("cpu"), amp=True) is contextlib.nullcontext
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    cfg, _ = parse_args(["--amp", "false"])
    assert cfg.amp is False and TrialConfig().amp is True


def test_cli_accepts_original_flags(tmp_path):
    ckpt = tmp_path / "fp32.pth"
    ckpt.write_bytes(b"")
    cfg, args = parse_args(
        [
            "--epochs",
            "120",
            "--lr",
            "0.01",
            "--bit",
            "4",
            "--dataset",
            "cifar10",
            "--data_dir",
            str(tmp_path),
            "--init_from",
            str(ckpt),
            "--wd",
            "1e-4",
        ]
    )
    assert (cfg.epochs, cfg.lr, cfg.w_bits, cfg.a_bits, cfg.dataset, cfg.wd) == (
        120,
        0.01,
        4,
        4,
        "cifar10",
        1e-4,
    )
    assert cfg.init_from == str(ckpt)
    cfg, _ = parse_args(["--w-bits", "32", "--a_bits", "2", "--first", "w8_a_fp32", "--nesterov", "true"])
    assert (cfg.w_bits, cfg.a_bits, cfg.first, cfg.nesterov) == (None, 2, "w8_a_fp32", True)
    # 'none' is None where a key can be None, and the word where it is one of the allowed values
    cfg, _ = parse_args(["--w_bits", "none", "--data_dir", "None", "--compile", "none"])
    assert (cfg.w_bits, cfg.data_dir, cfg.compile) == (None, None, "none")


def test_cli_runs_and_saves(tmp_path, capsys):
    out = tmp_path / "ck" / "last.pt"
    assert main(["--epochs", "1", "--bit", "8", "--batch_size", "256", "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1/1" in printed and "top1" in printed and out.is_file()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bit", "9"], "key 'w_bits' = 9"),
        (["--wd", "-1"], "key 'wd' = -1.0: must be >= 0"),
        (["--lr", "0"], "key 'lr' = 0"),
        (["--model", "resnt20"], "did you mean 'resnet20'"),
        (["--dataset", "cifar10"], "key 'data_dir' is required"),
        (["--first", "w8a9"], "key 'first'"),
        (["--init_from", "/nonexistent/x.pth"], "no such file"),
        # this command's flag, not the sweep's --set data_dir
        (
            ["--dataset", "cifar10", "--data_dir", "/nonexistent/cifar"],
            "pass --data_dir=<folder holding cifar10>",
        ),
        # (--epochs 1: without the check, 0 trained with the default threads and -1 was a RuntimeError)
        (
            ["--threads", "0", "--epochs", "1", "--batch_size", "256"],
            "--threads 0: allowed: a whole number >= 1",
        ),
        (
            ["--threads", "-1", "--epochs", "1", "--batch_size", "256"],
            "--threads -1: allowed: a whole number >= 1",
        ),
    ],
)
def test_cli_bad_input(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_cli_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    """Ctrl-C was a KeyboardInterrupt traceback: now one line saying how far it got and what was
    saved, exit status 130; a checkpoint being written when it comes leaves no .tmp file behind."""
    out = tmp_path / "last.pt"
    argv = ["--epochs", "3", "--bit", "8", "--batch_size", "256", "--save", str(out)]
    one_epoch = Trainer.train_one_epoch
    calls = []

    def ctrl_c_in_epoch_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return one_epoch(self)

    monkeypatch.setattr(Trainer, "train_one_epoch", ctrl_c_in_epoch_2)
    assert main(argv) == 130
    out_text, err = capsys.readouterr()
    assert "epoch   1/3" in out_text and "Traceback" not in err
    assert err == f"interrupted (1 of 3 epochs trained); nothing saved to {out}\n"
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(Trainer, "train_one_epoch", one_epoch)

    def ctrl_c_while_saving(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", ctrl_c_while_saving)
    assert main(argv[:1] + ["1"] + argv[2:]) == 130
    assert capsys.readouterr().err == f"interrupted (1 of 1 epochs trained); nothing saved to {out}\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_lsq_fast_path_is_an_input_error(monkeypatch, capsys):
    """An LSQ_FAST_PATH it cannot read: one error naming it, exit 2 (was: 'maybe' on, 'false' on)."""
    from lsq import quantizer

    monkeypatch.setenv("LSQ_FAST_PATH", "maybe")
    monkeypatch.setattr(quantizer, "FAST_PATH", None)  # (None: read from the environment)
    assert main(["--epochs", "1", "--bit", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: environment variable LSQ_FAST_PATH='maybe': allowed: 1, true")


def test_cli_init_from_a_folder_says_so(tmp_path, capsys):
    """--init_from a folder was 'no such file'; a sweep trial's checkpoint folder names the file in it."""
    folder = tmp_path / "checkpoint_000003"
    folder.mkdir()
    assert main(["--init_from", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"'init_from' = '{folder}': is a folder, not a file (allowed: a path to an FP32 checkpoint" in err
    (folder / "checkpoint.pt").write_bytes(b"")
    assert main(["--init_from", str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        f"is a folder, not a file; it holds the checkpoint file {folder / 'checkpoint.pt'} (allowed:" in err
    )
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize(
    "save, needle",
    [
        ("file.txt/x.pt", "file.txt is a file; allowed: a file path in a folder"),
        ("a_folder", "a_folder: is a folder; allowed: a file path"),
        ("", "--save '': an empty path; allowed: a file path"),
    ],
)
def test_cli_checks_save_before_training(tmp_path, save, needle, capsys):
    """A --save that cannot be written is an error at once, not after the training it would lose
    (or, for '', a run that saves nothing and says nothing)."""
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    (tmp_path / "a_folder").mkdir()
    before = sorted(tmp_path.rglob("*"))
    target = str(tmp_path / save) if save else ""
    assert main(["--epochs", "1", "--bit", "8", "--batch_size", "256", "--save", target]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not one epoch trained
    assert err.startswith("error: --save ") and needle in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def test_compiled_block_matches_eager_forward_and_gradients():
    """torch.compile of a quantized residual block computes what eager does, up to float
    reassociation (BatchNorm's batch statistics are reduced in another order)."""
    from lsq.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    quantize_model(model, BitPolicy(4, 4))
    init_steps(model, torch.randn(16, 3, 32, 32))
    block = model.layer2[0].train()  # stride 2, option-A shortcut
    x = torch.relu(torch.randn(16, 16, 32, 32))
    up = torch.randn(16, 32, 16, 16)
    state = {k: v.clone() for k, v in block.state_dict().items()}

    def run_once(fn):
        block.load_state_dict(state)
        for q in quantizers(block):
            q.is_initialized()
        block.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = fn(xx)
        out.backward(up)
        return [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]

    eager, compiled = run_once(block), run_once(torch.compile(block))
    names = ["output", "input grad"] + [n for n, _ in block.named_parameters()]
    for name, e, c in zip(names, eager, compiled):
        assert torch.allclose(e, c, rtol=1e-4, atol=1e-5 * float(e.abs().max())), name


@pytest.mark.slow
def test_compiled_trainer_learns_and_its_checkpoint_is_the_eager_layout(tmp_path):
    """compile='default': the first step runs eager (it initializes the step sizes from the data),
    then compiled graphs for training and evaluation with no graph breaks. A whole quantized
    network is not bit-identical to eager (a last-bit difference before a quantizer can move a
    value to the next level), so the run is held to what eager reaches (95-98 % after 4 epochs
    over 8 seeds), and its checkpoint resumes in an eager trainer. On resnet8: the same blocks
    as resnet20, compiled in half the time (70 s against 130-140 s with a cold cache, as in CI)."""
    from torch._dynamo.utils import counters

    cfg = {**FAST, "model": "resnet8", "epochs": 4, "w_bits": 4, "a_bits": 4}
    counters.clear()
    compiled, history = run({**cfg, "compile": "default"})
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert history[-1]["top1"] >= 90.0, history[-1]

    path = str(tmp_path / "compiled.pt")
    compiled.save(path)
    state = torch.load(path, weights_only=True)["model"]
    assert set(state) == set(compiled.model.state_dict()) and not any("_orig_mod" in k for k in state)
    resumed = Trainer(TrialConfig.from_dict({**cfg, "epochs": 5}))  # eager now
    resumed.load(path)
    assert resumed.evaluate()["top1"] == pytest.approx(history[-1]["top1"], abs=1.0)
    assert [m["epoch"] for m in resumed.epochs()] == [5]
