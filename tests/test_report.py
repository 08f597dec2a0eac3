"""Reports from a stored experiment alone: no Ray running, partial sweeps, every trial status.

The experiment folder is laid out here by hand exactly as Tune 2.60 and `train_lsq` leave it
(experiment_state-*.json, <trial>/params.json, result.json, error.txt, checkpoint_N/layers.json),
including the awkward cases: an epoch reported twice around a resume, a diverged trial, a crashed
one, one interrupted, one never started, and a trial folder newer than Tune's last snapshot.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest

from lsq import report
from lsq.config import ConfigError, TrialConfig
from lsq.storage import experiment_exists, write_meta

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "resnet20", "dataset": "digits", "epochs": 3, "wd": 1e-4, "batch_size": 128}
LAYERS = [
    {
        "layer": "conv1",
        "kind": "conv",
        "w_bits": 8,
        "a_bits": 8,
        "a_signed": True,
        "w_step": 0.01,
        "a_step": 0.05,
        "w_rel_mse": 0.001,
    },
    {
        "layer": "fc",
        "kind": "linear",
        "w_bits": 8,
        "a_bits": 8,
        "a_signed": False,
        "w_step": 0.02,
        "a_step": 0.1,
        "w_rel_mse": 0.002,
    },
]


def has_row(markdown: str, *cells: str) -> bool:
    """A row of a markdown table in `markdown` holds these cells side by side (spaces around a cell aside)."""
    rows = [
        [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in markdown.splitlines()
        if line.startswith("|")
    ]
    return any(list(cells) == row[i : i + len(cells)] for row in rows for i in range(len(row)))


def config(**kw):
    return TrialConfig.from_dict({**BASE, **kw}).to_dict()


def epoch_row(trial_id, epoch, top1, total):
    return {
        "epoch": epoch,
        "top1": top1,
        "top5": min(100.0, top1 + 1),
        "loss": 0.1,
        "best_top1": top1,
        "training_iteration": epoch,
        "trial_id": trial_id,
        "time_total_s": total,
        "checkpoint_dir_name": f"checkpoint_{epoch - 1:06d}",
    }


def make_trial(exp, trial_id, name, cfg, rows=(), error=None, checkpoint=None):
    d = exp / name
    d.mkdir()
    (d / "params.json").write_text(json.dumps(cfg))
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if error:
        (d / "error.txt").write_text(error)
    if checkpoint is not None:
        c = d / f"checkpoint_{checkpoint:06d}"
        c.mkdir()
        (c / "layers.json").write_text(json.dumps(LAYERS))
        (c / "checkpoint.pt").write_bytes(b"weights")


@pytest.fixture
def experiment(tmp_path):
    """A stored sweep 'fake': seeds 0/1 of FP32, W4A4, W2A2, and a pending W8A8."""
    exp = tmp_path / "runs" / "fake"
    exp.mkdir(parents=True)
    trials = [  # (id, folder, config, Tune's status in its last snapshot)
        ("x_00000", "001_FP32", config(w_bits=None, a_bits=None, seed=0), "TERMINATED"),
        ("x_00001", "002_FP32", config(w_bits=None, a_bits=None, seed=1), "TERMINATED"),
        ("x_00002", "003_W4A4_w8a8", config(seed=0), "TERMINATED"),
        ("x_00003", "004_W4A4_w8a8", config(seed=1), "TERMINATED"),
        ("x_00004", "005_W2A2_w8a8", config(w_bits=2, a_bits=2, seed=0), "ERROR"),
        ("x_00005", "006_W2A2_w8a8", config(w_bits=2, a_bits=2, seed=1), "RUNNING"),
        ("x_00006", "007_W8A8_w8a8", config(w_bits=8, a_bits=8, seed=0), "PENDING"),
    ]
    state = {
        "trial_data": [
            [
                json.dumps(
                    {"trial_id": i, "status": s, "relative_logdir": f, "custom_trial_name": f, "config": c}
                ),
                json.dumps({}),
            ]
            for i, f, c, s in trials
        ],
        "runner_data": {},
        "stats": {},
    }
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    (exp / "experiment_state-2025-12-31_00-00-00.json").write_text("{}")  # an older snapshot: ignored
    write_meta(
        str(exp),
        {
            "name": "fake",
            "description": "A hand-made sweep.",
            "resources": {"cpu": 1, "gpu": 0.5},
            "seeds": [0, 1],
            "merged": ["3 cells identical after normalization: FP32 x first/last run once (trial 1)"],
        },
    )

    make_trial(
        exp,
        "x_00000",
        "001_FP32",
        trials[0][2],
        [epoch_row("x_00000", e, 90.0 + e, 10.0 * e) for e in (1, 2, 3)],
        checkpoint=2,
    )
    make_trial(
        exp,
        "x_00001",
        "002_FP32",
        trials[1][2],
        [epoch_row("x_00001", e, 92.0 + e, 10.0 * e) for e in (1, 2, 3)],
        checkpoint=2,
    )
    # epoch 2 reported, driver killed before the snapshot, resumed from epoch 1: epoch 2 again
    resumed = [
        epoch_row("x_00002", 1, 80.0, 10),
        epoch_row("x_00002", 2, 50.0, 20),
        epoch_row("x_00002", 2, 85.0, 20),
        {**epoch_row("x_00002", 3, 88.0, 30), "int_top1": 87.5, "export_ok": True},
    ]
    make_trial(exp, "x_00002", "003_W4A4_w8a8", trials[2][2], resumed, checkpoint=2)
    diverged = [
        epoch_row("x_00003", 1, 30.0, 10),
        {
            "epoch": 1,
            "best_top1": 30.0,
            "trial_id": "x_00003",
            "failed_reason": "training loss became nan in epoch 2",
        },
    ]
    make_trial(exp, "x_00003", "004_W4A4_w8a8", trials[3][2], diverged, checkpoint=0)
    crash = (
        "Failure # 1 (occurred at 2026-01-01_00-00-01)\nray.exceptions.RayTaskError(RuntimeError): "
        'ray::ImplicitFunc.train()\n  File "x.py", line 1\nRuntimeError: CUDA out of memory\n'
        "Failure # 2 (occurred at 2026-01-01_00-00-02)\nRuntimeError: CUDA out of memory\n"
    )
    make_trial(
        exp,
        "x_00004",
        "005_W2A2_w8a8",
        trials[4][2],
        [epoch_row("x_00004", 1, 20.0, 10)],
        error=crash,
        checkpoint=0,
    )
    make_trial(
        exp, "x_00005", "006_W2A2_w8a8", trials[5][2], [epoch_row("x_00005", 1, 25.0, 10)], checkpoint=0
    )
    # a trial that started after Tune's last snapshot: only its folder knows it
    make_trial(
        exp,
        "x_00007",
        "008_W3A3_w8a8",
        config(w_bits=3, a_bits=3, seed=0),
        [epoch_row("x_00007", 1, 40.0, 10)],
    )
    with open(exp / "003_W4A4_w8a8" / "result.json", "a") as f:
        f.write('{"epoch": 4, "top1": ')  # a line cut short by a crash
    return exp


def test_results_one_row_per_trial_with_status_and_numbers(experiment, tmp_path):
    rep = report.build_report(str(experiment), str(tmp_path / "reports"), live=True)
    df = rep.results.set_index("trial_id")
    assert rep.folder == str(tmp_path / "reports" / "fake")
    assert list(df.index) == [f"x_0000{i}" for i in range(8)]  # each trial exactly once
    assert dict(df["status"]) == {
        "x_00000": "TERMINATED",
        "x_00001": "TERMINATED",
        "x_00002": "TERMINATED",
        "x_00003": "FAILED",
        "x_00004": "ERROR",
        "x_00005": "RUNNING",
        "x_00006": "PENDING",
        "x_00007": "RUNNING",
    }
    # with no driver at work (after an interrupted sweep, --report-only of a stopped one) the
    # unfinished trials are INTERRUPTED, and say so in the summary line of their cell
    stopped = report.build_report(str(experiment), str(tmp_path / "stopped")).results.set_index("trial_id")
    assert dict(stopped["status"]) == {
        **dict(df["status"]),
        "x_00005": "INTERRUPTED",
        "x_00007": "INTERRUPTED",
    }
    assert "interrupted" in (tmp_path / "stopped" / "fake" / "table.md").read_text()
    assert list(df["epochs_done"]) == [3, 3, 3, 1, 1, 1, 0, 1]
    w4 = df.loc["x_00002"]
    assert w4["final_top1"] == 88.0 and w4["best_top1"] == 88.0  # the repeated epoch 2 counts once (85)
    assert df.loc["x_00000", "final_top5"] == 94.0 and df.loc["x_00000", "best_top5"] == 94.0
    assert df.loc["x_00000", "wall_seconds"] == 30.0
    assert df.loc["x_00000", "gpu_hours"] == pytest.approx(30.0 * 0.5 / 3600)
    assert df.loc["x_00003", "error"] == "training loss became nan in epoch 2"
    assert df.loc["x_00004", "error"] == "RuntimeError: CUDA out of memory (2 failures)"
    assert pd.isna(df.loc["x_00000", "error"]) and math.isnan(df.loc["x_00006", "final_top1"])
    assert df.loc["x_00000", "checkpoint"] == str(experiment / "001_FP32" / "checkpoint_000002")
    assert pd.isna(df.loc["x_00006", "checkpoint"])
    for key in TrialConfig.keys():
        assert key in df.columns
    assert pd.isna(df.loc["x_00000", "w_bits"]) and df.loc["x_00002", "w_bits"] == 4

    # parquet and csv hold the same table
    stored = pd.read_parquet(Path(rep.folder) / "results.parquet")
    assert len(stored) == 8 and list(stored["trial_id"]) == list(rep.results["trial_id"])
    assert list(pd.read_csv(Path(rep.folder) / "results.csv")["status"]) == list(stored["status"])


def test_table_md_original_style_with_seeds(experiment, tmp_path):
    rep = report.build_report(str(experiment), str(tmp_path / "reports"))
    table = (Path(rep.folder) / "table.md").read_text()
    assert table == rep.table_md
    assert has_row(table, "Models", "Networks", "Params", "Notes", "Acc@1")
    assert has_row(
        table, "FP32", "ResNet-20", "3 epochs, wd 1e-4, batch 128", "full precision", "94.00 ± 1.41 (n=2)"
    )
    assert has_row(
        table,
        "W4A4",
        "ResNet-20",
        "3 epochs, wd 1e-4, batch 128",
        "first & last layers: W8A8",
        "88.00 (n=1; 1 failed)",
    )
    assert has_row(
        table,
        "W8A8",
        "ResNet-20",
        "3 epochs, wd 1e-4, batch 128",
        "first & last layers: W8A8",
        "– (pending, 0/3 epochs)",
    )
    assert "3 cells identical after normalization" in table and "A hand-made sweep." in table
    # the detailed table: every varied key, one row per trial
    assert has_row(table, "trial", "status", "w_bits", "a_bits", "seed", "epochs")
    assert has_row(
        table,
        "004_W4A4_w8a8",
        "FAILED",
        "4",
        "4",
        "1",
        "1/3",
        "30.00",
        "30.00",
        "31.00",
        "–",
        "–",
        "10",
        "training loss became nan in epoch 2",
    )
    assert has_row(
        table,
        "001_FP32",
        "TERMINATED",
        "FP32",
        "FP32",
        "0",
        "3/3",
        "93.00",
        "93.00",
        "94.00",
        "–",
        "–",
        "30",
        "",
    )
    # the last epoch's deployment check: integer-inference top-1 and the ONNX agreement
    assert has_row(table, "3/3", "88.00", "88.00", "89.00", "87.50", "ok", "30")
    assert "[layers.md](layers.md)" in table


def test_headline_rows_name_every_other_key_the_sweep_varies(tmp_path):
    """A grid over the learning rate (or schedule, dataset, ...) must not give rows that read the
    same: Params adds each varied key that no other column shows."""
    exp = tmp_path / "runs" / "lrs"
    exp.mkdir(parents=True)
    trials = [
        ("y_00000", "001_W4A4_w8a8", config(lr=0.05)),
        ("y_00001", "002_W4A4_w8a8", config(lr=0.001)),
        ("y_00002", "003_W2A2_w8a8", config(w_bits=2, a_bits=2, lr=0.05, schedule="step")),
    ]
    state = {
        "trial_data": [
            [
                json.dumps(
                    {
                        "trial_id": i,
                        "status": "TERMINATED",
                        "relative_logdir": f,
                        "custom_trial_name": f,
                        "config": c,
                    }
                ),
                json.dumps({}),
            ]
            for i, f, c in trials
        ],
        "runner_data": {},
        "stats": {},
    }
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    for n, (i, f, c) in enumerate(trials):
        make_trial(exp, i, f, c, [epoch_row(i, e, 50.0 + n + e, 10.0 * e) for e in (1, 2, 3)])
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    notes = "first & last layers: W8A8"
    assert has_row(
        table, "W4A4", "ResNet-20", "3 epochs, wd 1e-4, batch 128, lr 0.05, schedule cosine", notes, "53.00"
    )
    assert has_row(
        table, "W4A4", "ResNet-20", "3 epochs, wd 1e-4, batch 128, lr 0.001, schedule cosine", notes, "54.00"
    )
    assert has_row(
        table, "W2A2", "ResNet-20", "3 epochs, wd 1e-4, batch 128, lr 0.05, schedule step", notes, "55.00"
    )
    # a path by its last two parts: files of one name (each FP32 trial's checkpoint.pt) stay apart
    cfg = TrialConfig(**{**config(), "init_from": "/ckpt/cifar10_resnet20_fp32.pt"})
    assert (
        report.params_text(cfg, ["init_from"])
        == "3 epochs, wd 1e-4, batch 128, init_from ckpt/cifar10_resnet20_fp32.pt"
    )
    cfg = TrialConfig(**{**config(), "init_from": "/runs/a/002_FP32/checkpoint.pt"})
    assert report.params_text(cfg, ["init_from"]).endswith(", init_from 002_FP32/checkpoint.pt")
    # Notes: the first and last layers' bits as their presets resolve against the body's (W4A4)
    ends = TrialConfig(**{**config(), "first": "body", "last": "w8_a_fp32"})
    assert report.notes(ends) == "first layer: W4A4; last layer: W8A32"
    # a data_dir that moves with the dataset is left to results.csv
    both = pd.DataFrame([config(), config(dataset="cifar10", data_dir="/data/cifar10")])
    assert report.headline_extra(both) == ["dataset"]
    assert report.headline_extra(pd.DataFrame([config(), config(data_dir="/data/digits2")])) == ["data_dir"]


def test_layers_and_plot(experiment, tmp_path):
    rep = report.build_report(str(experiment), str(tmp_path / "reports"))
    layers = pd.read_csv(Path(rep.folder) / "layers.csv")
    assert set(layers["trial_id"]) == {"x_00000", "x_00001", "x_00002", "x_00003", "x_00004", "x_00005"}
    assert list(layers[layers["trial_id"] == "x_00000"]["layer"]) == ["conv1", "fc"]
    md = (Path(rep.folder) / "layers.md").read_text()
    assert "## 003_W4A4_w8a8 (W4A4, after epoch 3)" in md and has_row(
        md, "conv1", "conv", "8", "8", "0.01", "0.05", "0.001"
    )
    assert "## 001_FP32" not in md  # nothing quantized: only in layers.csv
    # the plot, as the headline, shows finished trials only: 94 ± sqrt(2) for FP32's 93 and 95, W4A4's 88
    assert series(rep.results) == {
        "FP32": {None: (94.0, pytest.approx(math.sqrt(2)))},
        "first/last w8a8": {4: (88.0, 0.0)},
    }
    png = (Path(rep.folder) / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_table_says_when_the_deployment_check_was_off(tmp_path):
    exp = tmp_path / "runs" / "nodeploy"
    exp.mkdir(parents=True)
    trials = [
        ("z_00000", "001_W4A4_w8a8", config(deploy_check=False)),
        ("z_00001", "002_W2A2_w8a8", config(w_bits=2, a_bits=2, deploy_check=False)),
    ]
    state = {
        "trial_data": [
            [
                json.dumps(
                    {
                        "trial_id": i,
                        "status": "TERMINATED",
                        "relative_logdir": f,
                        "custom_trial_name": f,
                        "config": c,
                    }
                ),
                json.dumps({}),
            ]
            for i, f, c in trials
        ],
        "runner_data": {},
        "stats": {},
    }
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    for i, f, c in trials:
        make_trial(exp, i, f, c, [epoch_row(i, e, 50.0 + e, 10.0 * e) for e in (1, 2, 3)])
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    assert "Trials with deploy_check=false skip it (–)." in table


def stored_sweep(tmp_path, name, trials, meta=None):
    """An experiment folder as Tune and train_lsq leave it; trials: (id, folder, config, Tune's
    status in its last snapshot, result.json rows)."""
    exp = tmp_path / "runs" / name
    exp.mkdir(parents=True)
    state = {
        "trial_data": [
            [
                json.dumps(
                    {"trial_id": i, "status": s, "relative_logdir": f, "custom_trial_name": f, "config": c}
                ),
                json.dumps({}),
            ]
            for i, f, c, s, _ in trials
        ],
        "runner_data": {},
        "stats": {},
    }
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    if meta:
        write_meta(str(exp), meta)
    for i, f, c, _, rows in trials:
        make_trial(exp, i, f, c, rows)
    return exp


def curve(trial_id, top1s):
    """result.json rows of epochs 1, 2, ... with these top-1s; best_top1 as the trainer keeps it."""
    return [
        {**epoch_row(trial_id, e, t, 10.0 * e), "best_top1": max(top1s[:e])} for e, t in enumerate(top1s, 1)
    ]


NOTES = "first & last layers: W8A8"


def test_headline_shows_the_last_epoch_not_the_best_over_seeds(tmp_path):
    """The headline's Acc@1 is what its footnote says: top-1 after the last epoch. Seeds 0/1 end
    at 88 and 91 after peaking at 91 and 94: 89.50 ± 2.12, not the best epochs' 92.50."""
    exp = stored_sweep(
        tmp_path,
        "seeds",
        [
            ("s_00000", "001_W4A4_w8a8", config(seed=0), "TERMINATED", curve("s_00000", [89.0, 91.0, 88.0])),
            ("s_00001", "002_W4A4_w8a8", config(seed=1), "TERMINATED", curve("s_00001", [90.0, 94.0, 91.0])),
        ],
        meta={"name": "seeds", "seeds": [0, 1]},
    )
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    assert has_row(table, "W4A4", "ResNet-20", "3 epochs, wd 1e-4, batch 128", NOTES, "89.50 ± 2.12 (n=2)")
    assert "after the last epoch, mean ± std over seeds" in table


def test_headline_shows_the_last_epoch_not_the_best_of_one_trial(tmp_path):
    """Without seeds a row is one trial: its top-1 after the last epoch (88.00), not its best (91.00)."""
    exp = stored_sweep(
        tmp_path,
        "single",
        [
            ("u_00000", "001_W4A4_w8a8", config(), "TERMINATED", curve("u_00000", [86.0, 91.0, 88.0])),
            (
                "u_00001",
                "002_W2A2_w8a8",
                config(w_bits=2, a_bits=2),
                "TERMINATED",
                curve("u_00001", [70.0, 75.0, 72.0]),
            ),
        ],
    )
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    assert has_row(table, "W4A4", "ResNet-20", "3 epochs, wd 1e-4, batch 128", NOTES, "88.00")
    assert has_row(table, "W2A2", "ResNet-20", "3 epochs, wd 1e-4, batch 128", NOTES, "72.00")
    # the detailed table keeps both: best 91.00, final 88.00
    assert has_row(table, "001_W4A4_w8a8", "TERMINATED", "4", "4", "3/3", "91.00", "88.00", "89.00")


def test_best_top5_is_the_highest_top5_of_any_epoch_not_the_last(tmp_path):
    """best_top5 is the maximum over the trial's epochs, as best_top1 is. Here top-5 peaks at
    epoch 2 (99) and falls after it (97, 96) while top-1 keeps rising, so neither the last top-5
    nor the top-5 of the best top-1 epoch is the answer."""
    top1s, top5s = [80.0, 82.0, 85.0, 86.0], [95.0, 99.0, 97.0, 96.0]
    rows = [
        {**epoch_row("t_00000", e, t1, 10.0 * e), "top5": t5, "best_top1": max(top1s[:e])}
        for e, (t1, t5) in enumerate(zip(top1s, top5s), 1)
    ]
    exp = stored_sweep(tmp_path, "top5", [("t_00000", "001_W4A4_w8a8", config(epochs=4), "TERMINATED", rows)])
    r = report.build_report(str(exp), str(tmp_path / "reports")).results.set_index("trial_id").loc["t_00000"]
    assert r["best_top5"] == max(top5s) == 99.0
    assert r["final_top5"] == top5s[-1] == 96.0
    assert (r["best_top1"], r["final_top1"]) == (86.0, 86.0)


def test_an_epoch_repeated_after_a_resume_counts_its_last_report(tmp_path):
    """Epochs 2 and 3 reported, the driver killed before Tune's snapshot, the trial resumed from
    epoch 1's checkpoint: epochs 2 and 3 again. The repeated run is the model that was kept, so
    its reports win: final top-1 88 with its deployment check (87.50, ok), best 88 (the discarded
    run's 90 and 87 appear nowhere)."""
    first = [
        {**epoch_row("r_00000", 2, 90.0, 20), "best_top1": 90.0},
        {**epoch_row("r_00000", 3, 87.0, 30), "best_top1": 90.0, "int_top1": 86.0, "export_ok": False},
    ]
    again = [
        epoch_row("r_00000", 2, 84.0, 25),
        {**epoch_row("r_00000", 3, 88.0, 35), "int_top1": 87.5, "export_ok": True},
    ]
    exp = stored_sweep(
        tmp_path,
        "resumed",
        [
            (
                "r_00000",
                "001_W4A4_w8a8",
                config(),
                "TERMINATED",
                [epoch_row("r_00000", 1, 80.0, 10)] + first + again,
            )
        ],
    )
    rep = report.build_report(str(exp), str(tmp_path / "reports"))
    r = rep.results.set_index("trial_id").loc["r_00000"]
    assert (r["status"], r["epochs_done"]) == ("TERMINATED", 3)
    assert (r["final_top1"], r["best_top1"], r["final_top5"], r["int_top1"]) == (88.0, 88.0, 89.0, 87.5)
    assert r["export_ok"] == True  # noqa: E712  (numpy bool)
    assert has_row(rep.table_md, NOTES, "88.00")
    assert has_row(
        rep.table_md, "001_W4A4_w8a8", "TERMINATED", "3/3", "88.00", "88.00", "89.00", "87.50", "ok"
    )


def test_a_trial_stopped_early_is_stopped_not_finished(tmp_path):
    """Early stopping (ASHA) ends a trial before its last epoch and Tune records it as TERMINATED.
    The report calls it STOPPED, and the headline's mean over seeds leaves it out: W2A2 seed 1,
    stopped after 1 of 3 epochs at 60, must not pass for a finished 60 in the mean of 72 and 60."""
    exp = stored_sweep(
        tmp_path,
        "asha",
        [
            ("a_00000", "001_W4A4_w8a8", config(seed=0), "TERMINATED", curve("a_00000", [80.0, 84.0, 86.0])),
            ("a_00001", "002_W4A4_w8a8", config(seed=1), "TERMINATED", curve("a_00001", [81.0, 85.0, 88.0])),
            (
                "a_00002",
                "003_W2A2_w8a8",
                config(w_bits=2, a_bits=2, seed=0),
                "TERMINATED",
                curve("a_00002", [62.0, 68.0, 72.0]),
            ),
            (
                "a_00003",
                "004_W2A2_w8a8",
                config(w_bits=2, a_bits=2, seed=1),
                "TERMINATED",
                curve("a_00003", [60.0]),
            ),
        ],
        meta={"name": "asha", "seeds": [0, 1]},
    )
    rep = report.build_report(str(exp), str(tmp_path / "reports"))
    assert list(rep.results["status"]) == ["TERMINATED", "TERMINATED", "TERMINATED", "STOPPED"]
    table = rep.table_md
    assert "4 trials (3 TERMINATED, 1 STOPPED)" in table
    assert has_row(table, "W4A4", "ResNet-20", "3 epochs, wd 1e-4, batch 128", NOTES, "87.00 ± 1.41 (n=2)")
    assert has_row(
        table, "W2A2", "ResNet-20", "3 epochs, wd 1e-4, batch 128", NOTES, "72.00 (n=1; 1 stopped)"
    )
    assert has_row(table, "004_W2A2_w8a8", "STOPPED", "2", "2", "1", "1/3", "60.00", "60.00")

    # without seeds the row is the stopped trial itself, with how far it got
    alone = stored_sweep(
        tmp_path,
        "asha1",
        [("b_00000", "001_W2A2_w8a8", config(w_bits=2, a_bits=2), "TERMINATED", curve("b_00000", [60.0]))],
    )
    table = report.build_report(str(alone), str(tmp_path / "reports")).table_md
    assert has_row(table, NOTES, "60.00 (stopped, 1/3 epochs)")


def test_table_says_which_trials_skipped_the_deployment_check(tmp_path):
    """Where only some trials have deploy_check=false the table says their – means skipped, and
    does not claim the check never ran."""
    exp = stored_sweep(
        tmp_path,
        "somedeploy",
        [
            (
                "d_00000",
                "001_W4A4_w8a8",
                config(),
                "TERMINATED",
                curve("d_00000", [50.0, 51.0])
                + [{**epoch_row("d_00000", 3, 53.0, 30), "int_top1": 52.5, "export_ok": True}],
            ),
            (
                "d_00001",
                "002_W2A2_w8a8",
                config(w_bits=2, a_bits=2, deploy_check=False),
                "TERMINATED",
                curve("d_00001", [50.0, 51.0, 53.0]),
            ),
        ],
    )
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    assert (
        "agrees with the fake-quantized model in onnxruntime. Trials with deploy_check=false skip it (–)."
        in table
    )
    assert has_row(
        table,
        "001_W4A4_w8a8",
        "TERMINATED",
        "4",
        "4",
        "True",
        "3/3",
        "53.00",
        "53.00",
        "54.00",
        "52.50",
        "ok",
    )
    assert has_row(
        table, "002_W2A2_w8a8", "TERMINATED", "2", "2", "False", "3/3", "53.00", "53.00", "54.00", "–", "–"
    )


def test_a_failed_export_check_says_why(tmp_path):
    """export FAILED in the table comes with the check's reason in the error column."""
    reason = "onnxruntime top1 93.33, classes agree 92.78% (needs 99.9%)"
    exp = stored_sweep(
        tmp_path,
        "exportfail",
        [
            (
                "e_00000",
                "001_W4A4_w8a8",
                config(),
                "TERMINATED",
                curve("e_00000", [50.0, 51.0])
                + [
                    {
                        **epoch_row("e_00000", 3, 53.0, 30),
                        "int_top1": 52.5,
                        "export_ok": False,
                        "export_reason": reason,
                    }
                ],
            )
        ],
    )
    table = report.build_report(str(exp), str(tmp_path / "reports")).table_md
    assert has_row(table, "52.50", "FAILED", "30", f"export check: {reason}"), table


def test_a_multiline_error_stays_in_its_row(tmp_path):
    """An exporter's message over several lines, with a `|`, is one cell in table.md; results.csv keeps it whole."""
    reason = "exporter failed: shape mismatch\n  a | b\n"
    last = {**epoch_row("m_00000", 3, 53.0, 30), "export_ok": False, "export_reason": reason}
    trial = ("m_00000", "001_W4A4_w8a8", config(), "TERMINATED", curve("m_00000", [50.0, 51.0]) + [last])
    rep = report.build_report(str(stored_sweep(tmp_path, "multiline", [trial])), str(tmp_path / "reports"))
    assert has_row(rep.table_md, "FAILED", "30", "export check: exporter failed: shape mismatch a \\| b")
    assert rep.results.loc[0, "error"] == f"export check: {reason}"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_report_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """A report on a shared server is for colleagues too: its files get the mode any new file
    gets under the user's umask (0644 under 022), not mkstemp's private 0600."""
    exp = stored_sweep(
        tmp_path,
        "shared",
        [("p_00000", "001_W4A4_w8a8", config(), "TERMINATED", curve("p_00000", [50.0, 51.0, 53.0]))],
    )
    out = tmp_path / "reports"
    before = os.umask(umask)
    try:
        report.build_report(str(exp), str(out))
    finally:
        os.umask(before)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == mode for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]


def results(*rows) -> pd.DataFrame:
    """A results table as collect() gives it: every config key, a status and a final top-1."""
    return pd.DataFrame([{**config(), **kw, "status": "TERMINATED", "final_top1": top1} for top1, kw in rows])


def series(df: pd.DataFrame) -> dict:
    """The plot's lines as {label: {bits: (mean, std)}}; FP32's level at bits None."""
    return {
        label: {(None if pd.isna(b) else b): (r["mean"], r["std"]) for b, r in s.iterrows()}
        for label, s in report.plot_series(df).items()
    }


def test_a_sweep_of_activation_bits_alone_is_plotted_against_them():
    """W32A8, W32A4, W32A2 (FP32 weights) have no weight bits: they are drawn at their activation
    bits, beside FP32's level."""
    acts = results(
        (90.0, {"w_bits": None, "a_bits": None}),
        *[(80.0 + a, {"w_bits": None, "a_bits": a}) for a in (8, 2, 4)],
    )
    assert series(acts) == {
        "FP32": {None: (90.0, 0.0)},
        "first/last w8a8, weights FP32": {2: (82.0, 0.0), 4: (84.0, 0.0), 8: (88.0, 0.0)},
    }
    assert report.plot_accuracy_vs_bits(acts).startswith(b"\x89PNG")


def test_plot_lines_follow_the_ablation():
    """One line per first/last policy and per key that varies at the same bits; a key that only
    moves with the bits (weight decay by bits) stays on one line; seeds become a mean and a std;
    W4A8 is never averaged with W4A4, nor W32A8 with either."""
    paper = results(
        (90.0, {"w_bits": None, "a_bits": None, "init_from": None}),
        *[
            (80.0 + b, {"w_bits": b, "a_bits": b, "wd": wd, "init_from": "/runs/x/fp32.pt"})
            for b, wd in [(2, 2.5e-5), (3, 5e-5), (4, 1e-4)]
        ],
    )
    assert series(paper) == {
        "FP32": {None: (90.0, 0.0)},
        "first/last w8a8": {2: (82.0, 0.0), 3: (83.0, 0.0), 4: (84.0, 0.0)},
    }

    grid = results(
        *[
            (
                70.0 + b + seed + (1 if first == "fp32" else 0) + 100 * wd,
                {"w_bits": b, "a_bits": b, "first": first, "last": first, "wd": wd, "seed": seed},
            )
            for b in (2, 4)
            for first in ("w8a8", "fp32")
            for wd in (1e-4, 5e-5)
            for seed in (0, 1)
        ]
    )
    lines = series(grid)
    assert list(lines) == [
        "first/last w8a8, wd 1e-4",
        "first/last w8a8, wd 5e-5",
        "first/last fp32, wd 1e-4",
        "first/last fp32, wd 5e-5",
    ]
    # seeds 0 and 1, one apart: mean 70 + b + 0.5 (seeds) + 1 (fp32) + 0.01 (wd), sample std sqrt(0.5)
    assert lines["first/last fp32, wd 1e-4"] == {
        b: (pytest.approx(71.5 + b + 0.01), pytest.approx(math.sqrt(0.5))) for b in (2, 4)
    }

    mixed = results(
        (84.0, {"w_bits": 4, "a_bits": 4}),
        (85.0, {"w_bits": 4, "a_bits": 8}),
        (82.0, {"w_bits": 3, "a_bits": 3}),
        (80.0, {"w_bits": 2, "a_bits": 2}),
        (83.0, {"w_bits": 2, "a_bits": 8}),
        (89.0, {"w_bits": None, "a_bits": 8}),
        (87.0, {"w_bits": None, "a_bits": 8, "seed": 1}),
    )
    assert series(mixed) == {
        "first/last w8a8": {2: (80.0, 0.0), 3: (82.0, 0.0), 4: (84.0, 0.0)},
        "first/last w8a8, activations 8": {2: (83.0, 0.0), 4: (85.0, 0.0)},
        "first/last w8a8, weights FP32": {8: (88.0, pytest.approx(math.sqrt(2)))},
    }

    same_name = results(
        *[
            (80.0 + b + i, {"w_bits": b, "a_bits": b, "init_from": f"/runs/s/00{i}_FP32/checkpoint.pt"})
            for b in (2, 4)
            for i in (1, 2)
        ]
    )
    assert list(series(same_name)) == [
        "first/last w8a8, init_from 001_FP32/checkpoint.pt",
        "first/last w8a8, init_from 002_FP32/checkpoint.pt",
    ]


def test_plot_legend_stays_in_the_picture():
    """Many long labels go below the axes, and the figure grows to hold them."""
    import io

    from matplotlib.image import imread

    many = results(
        *[
            (
                70.0 + b + i,
                {
                    "w_bits": b,
                    "a_bits": b,
                    "lr": lr,
                    "nesterov": i % 2 == 0,
                    "warmup_epochs": i,
                    "init_from": f"/a/long/path/to/checkpoints/fp32_resnet20_{i}.pt",
                },
            )
            for b in (2, 4)
            for i, lr in enumerate([0.1, 0.05, 0.01, 0.005, 0.001])
        ]
    )
    short = imread(io.BytesIO(report.plot_accuracy_vs_bits(results((80.0, {"w_bits": 4, "a_bits": 4})))))
    tall = imread(io.BytesIO(report.plot_accuracy_vs_bits(many)))
    assert tall.shape[0] > short.shape[0] and tall.shape[1] == short.shape[1]
    assert len(report.plot_series(many)) == 5


def test_files_are_replaced_atomically(experiment, tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    report.build_report(str(experiment), str(reports))
    before = (reports / "fake" / "table.md").read_text()

    real_replace = os.replace

    def crash_on_table(src, dst):
        if dst.endswith("table.md"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_table)
    with pytest.raises(OSError):
        report.build_report(str(experiment), str(reports))
    assert (reports / "fake" / "table.md").read_text() == before  # the old table, whole
    assert not [f for f in os.listdir(reports / "fake") if f.endswith(".tmp")]


class _Denied(pafs.LocalFileSystem):
    """A local file system on which 001_FP32/result.json has no read permission (root reads any file)."""

    def open_input_stream(self, path):
        if path.endswith(os.path.join("001_FP32", "result.json")):
            raise PermissionError(13, "Permission denied", path)
        return super().open_input_stream(path)


class _Unlistable(pafs.LocalFileSystem):
    """A local file system on which the trial folder 001_FP32 cannot be listed."""

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector) and what.base_dir.endswith("001_FP32"):
            raise PermissionError(13, "Permission denied", what.base_dir)
        return super().get_file_info(what)


def test_an_unlistable_trial_folder_is_one_error_naming_it(experiment, tmp_path, monkeypatch):
    """A folder that cannot be listed was taken for an empty one (its checkpoints for none)."""
    monkeypatch.setattr(pafs, "LocalFileSystem", _Unlistable)
    with pytest.raises(ConfigError) as err:
        report.build_report(str(experiment), str(tmp_path / "reports"))
    assert str(err.value).startswith(f"{experiment / '001_FP32'}: cannot list it (")
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("unreadable", ["permission", "folder"])
def test_an_unreadable_trial_file_is_one_error_naming_it_and_the_report_stays(
    unreadable, experiment, tmp_path, monkeypatch
):
    """Only a file that is not there counts as not written yet: one that cannot be read is an
    error naming it, and the report built before stays as it was (it was taken for missing,
    and the report rebuilt with that trial PENDING)."""
    reports = tmp_path / "reports"
    report.build_report(str(experiment), str(reports))
    before = {f: (reports / "fake" / f).read_bytes() for f in os.listdir(reports / "fake")}
    result = experiment / "001_FP32" / "result.json"
    if unreadable == "permission":
        monkeypatch.setattr(pafs, "LocalFileSystem", _Denied)
    else:
        result.unlink()
        result.mkdir()
    with pytest.raises(ConfigError) as err:
        report.build_report(str(experiment), str(reports))
    assert str(err.value).startswith(f"{result}: cannot read it (")
    assert ("Permission denied" if unreadable == "permission" else "is a directory") in str(err.value)
    assert {f: (reports / "fake" / f).read_bytes() for f in os.listdir(reports / "fake")} == before


def test_report_needs_no_ray(experiment, tmp_path):
    """Built in a fresh process that never imports Ray (e.g. a laptop reading the storage)."""
    code = (
        "import sys; from lsq.report import build_report; "
        f"r = build_report({str(experiment)!r}, {str(tmp_path / 'out')!r}); "
        "assert 'ray' not in sys.modules, 'ray was imported'; print(len(r.results))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "8"


def test_empty_experiment_gives_an_empty_report(tmp_path):
    exp = tmp_path / "runs" / "empty"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    assert experiment_exists(str(exp)) and not experiment_exists(str(tmp_path / "runs" / "nope"))
    rep = report.build_report(str(exp), str(tmp_path / "reports"))
    assert len(rep.results) == 0 and (Path(rep.folder) / "accuracy_vs_bits.png").exists()
