"""Search spaces: expansion rules, merging of identical cells, the dry run.

The mistakes (one clear error each, exit 2, nothing written) are one table in test_bad_input.py.
No Ray here.
"""

import os
import sys
from pathlib import Path

import pytest

from lsq import cluster
from lsq.config import ConfigError
from lsq.space import format_table, load_space

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- expansion
def test_fixed_grid_variants_seeds_and_set_precedence(tmp_path):
    path = write(
        tmp_path,
        """
name: rules
fixed: {epochs: 3, lr: 0.1, wd: 1.0e-4}
grid:
  bits: [{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]
  wd: [1.0e-4, 5.0e-5]
variants:
  - {}
  - {lr: 0.05, wd: 2.5e-5}
seeds: 2
""",
    )
    space = load_space(path, ["epochs=1"])
    # variants (outer) x grid (last key fastest) x seeds (innermost); variant rows beat the grid
    assert space.cells == 2 * 2 * 2 * 2
    first = space.trials[:8]
    assert [(t.w_bits, t.wd, t.seed) for t in first] == [
        (4, 1e-4, 0),
        (4, 1e-4, 1),
        (4, 5e-5, 0),
        (4, 5e-5, 1),
        (2, 1e-4, 0),
        (2, 1e-4, 1),
        (2, 5e-5, 0),
        (2, 5e-5, 1),
    ]
    # the second variant sets wd itself, so its grid over wd collapses into one cell per bits x seed
    second = space.trials[8:]
    assert {(t.w_bits, t.lr, t.wd) for t in second} == {(4, 0.05, 2.5e-5), (2, 0.05, 2.5e-5)}
    assert len(space.trials) == 8 + 4
    assert all(t.epochs == 1 for t in space.trials)  # --set beats everything
    assert all(t.a_bits == t.w_bits for t in space.trials)  # an axis of partial configs moves together
    assert space.seeds == [0, 1]


def test_set_beats_a_key_that_a_variant_row_sets(tmp_path):
    """--set overrides a key for every trial, also where a variant row sets that key itself
    (lr in both rows, epochs in one); the variants' other keys stay theirs."""
    path = write(
        tmp_path,
        """
fixed: {epochs: 3, lr: 0.1}
variants:
  - {w_bits: 4, a_bits: 4, lr: 0.05, epochs: 5}
  - {w_bits: 2, a_bits: 2, lr: 0.2}
""",
    )
    space = load_space(path, ["lr=0.01", "epochs=1"])
    assert [(t.w_bits, t.a_bits, t.lr, t.epochs) for t in space.trials] == [(4, 4, 0.01, 1), (2, 2, 0.01, 1)]
    # without --set each variant row beats fixed:
    plain = load_space(path)
    assert [(t.w_bits, t.lr, t.epochs) for t in plain.trials] == [(4, 0.05, 5), (2, 0.2, 3)]


def test_seed_list_and_defaults(tmp_path):
    space = load_space(write(tmp_path, "fixed: {epochs: 1}\nseeds: [7, 11]\n"))
    assert space.name == "space"  # the file's stem
    assert [t.seed for t in space.trials] == [7, 11]
    assert space.resources == {"cpu": 1, "gpu": 0} and space.early_stopping is None


def test_fp32_cells_merge_and_the_table_says_so(tmp_path):
    path = write(
        tmp_path,
        """
fixed: {epochs: 1}
grid:
  bits: [{w_bits: null, a_bits: null}, {w_bits: 4, a_bits: 4}]
  ends: [{first: fp32, last: fp32}, {first: w8a8, last: w8a8}, {first: body, last: body}]
""",
    )
    space = load_space(path)
    assert space.cells == 6 and len(space.trials) == 4
    assert [t.label() for t in space.trials] == ["FP32", "W4A4", "W4A4", "W4A4"]
    [merged] = space.merged
    assert merged.kept == 0 and len(merged.dropped) == 2
    text = merged.describe(space.trials[0])
    assert text == "3 cells identical after normalization: FP32 x first/last run once (trial 1)"
    assert text in format_table(space)
    # equal identity <=> the same trial: the kept ones are pairwise distinct
    assert len({t.identity() for t in space.trials}) == len(space.trials)


def test_bits_32_is_fp32_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fp32.pt").write_bytes(b"x")
    space = load_space(write(tmp_path, "fixed: {w_bits: 32, a_bits: 32, init_from: fp32.pt}\n"))
    [t] = space.trials
    assert t.is_fp32 and t.init_from == str(tmp_path / "fp32.pt")


@pytest.mark.parametrize(
    "name, sets, trials, cells",
    [
        ("smoke", [], 4, 4),
        ("cifar10_resnet20_bits", ["data_dir=/data/cifar10", "init_from=INIT"], 24, 30),
        ("imagenet_resnet18_seed", ["data_dir=/data/imagenet"], 7, 7),
        ("imagenet_resnet18_paper", ["data_dir=/data/imagenet"], 4, 4),
    ],
)
def test_shipped_spaces(name, sets, trials, cells, tmp_path):
    init = tmp_path / "fp32.pt"
    init.write_bytes(b"x")
    sets = [s.replace("INIT", str(init)) for s in sets]
    space = load_space(str(ROOT / "search_spaces" / f"{name}.yaml"), sets)
    assert space.name == name and len(space.trials) == trials and space.cells == cells
    if name == "smoke":
        assert [t.label() for t in space.trials] == ["FP32", "W8A8", "W4A4", "W2A2"]
        assert {(t.first, t.last, t.dataset, t.model) for t in space.trials} == {
            ("w8a8", "w8a8", "digits", "resnet20")
        }
    if name == "imagenet_resnet18_paper":
        assert {t.w_bits: t.wd for t in space.trials} == {2: 2.5e-5, 3: 5e-5, 4: 1e-4, 8: 1e-4}
        assert {(t.epochs, t.schedule, t.lr, t.first, t.last) for t in space.trials} == {
            (90, "cosine", 0.01, "w8a8", "w8a8")
        }
    if name == "imagenet_resnet18_seed":
        rows = {(t.label(), t.end_bits("first"), t.end_bits("last"), t.epochs) for t in space.trials}
        assert rows == {("FP32", (None, None), (None, None), 90)} | {
            ("W4A4", first, last, epochs)
            for epochs in (120, 90)
            for first, last in [((4, None), (4, 4)), ((8, None), (8, 8)), ((8, 8), (8, 8))]
        }
        assert {(t.wd, t.batch_size, t.lr, t.init_from) for t in space.trials} == {
            (1e-4, 512, 0.01, "torchvision")
        }


@pytest.mark.parametrize(
    "text, asha",
    [
        ("early_stopping: false\n", None),
        (
            "early_stopping: true\n",
            {"metric": "top1", "mode": "max", "grace_period": 1, "reduction_factor": 3},
        ),
        (
            "early_stopping: {metric: top5, grace_period: 2, reduction_factor: 1.5}\n",
            {"metric": "top5", "mode": "max", "grace_period": 2, "reduction_factor": 1.5},
        ),
        # a lower loss is better: ASHA on loss stops the trials of highest loss, not the best ones
        (
            "early_stopping: {metric: loss}\n",
            {"metric": "loss", "mode": "min", "grace_period": 1, "reduction_factor": 3},
        ),
        (
            "early_stopping: {metric: best_top1, mode: max, reduction_factor: 2}\n",
            {"metric": "best_top1", "mode": "max", "grace_period": 1, "reduction_factor": 2},
        ),
    ],
)
def test_early_stopping_settings_and_the_dry_run_says_which_scheduler(text, asha, tmp_path, capsys):
    path = write(tmp_path, "fixed: {epochs: 4}\n" + text)
    assert load_space(path).early_stopping == asha
    assert (
        sweep.main([path, "--dry-run", "--storage", str(tmp_path / "runs"), "--reports", str(tmp_path / "r")])
        == 0
    )
    out = capsys.readouterr().out
    if asha is None:
        assert "scheduler: FIFO: every trial runs to its last epoch" in out, out
    else:
        gp = asha["grace_period"]
        assert (
            f"scheduler: ASHA on {asha['metric']} ({asha['mode']}), grace period {gp} epoch{'s' if gp > 1 else ''}, "
            f"reduction factor {asha['reduction_factor']}"
        ) in out, out


# ----------------------------------------------------------------------------- mistakes
# Every mistake, one clear message, exit 2, nothing written: the table in tests/test_bad_input.py.


def test_missing_space_file_names_the_known_ones(tmp_path, capsys):
    assert sweep.main([str(ROOT / "search_spaces" / "smok.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no such search space file" in err and "smoke.yaml" in err


def test_aliases_are_copies(tmp_path):
    """A space may share values through YAML anchors and aliases (merge keys too); a mistake in a
    shared value is named by the key that uses it."""
    path = write(
        tmp_path,
        "fixed: &f {epochs: 1, lr: 0.05}\nvariants:\n  - {<<: *f, w_bits: 4}\n  - {<<: *f, w_bits: 2}\n",
    )
    assert [(t.w_bits, t.epochs, t.lr) for t in load_space(path).trials] == [(4, 1, 0.05), (2, 1, 0.05)]
    with open(path, "a") as f:
        f.write("grid:\n  lr: &lrs [0.1, 0.2]\n  bits: [{w_bits: 3, wd: *lrs}]\n")
    with pytest.raises(
        ConfigError, match=r"space.yaml \(grid.bits\[0\].wd\), cell 1: key 'wd' = \[0.1, 0.2\]"
    ):
        load_space(path)


def test_a_shipped_space_is_found_from_any_folder(tmp_path, monkeypatch, capsys):
    """`python /path/to/sweep.py search_spaces/smoke.yaml` from elsewhere reads the project's file;
    a name found nowhere lists the shipped spaces."""
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["search_spaces/smoke.yaml", "--dry-run", "--storage", str(tmp_path / "runs")]) == 0
    assert f"Sweep 'smoke' from {ROOT / 'search_spaces' / 'smoke.yaml'}: 4 trials" in capsys.readouterr().out
    assert sweep.main(["smoke", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        f"smoke: no such search space file; spaces in {ROOT / 'search_spaces'}: " in err
        and "smoke.yaml" in err
    )
    assert not os.listdir(tmp_path)


def test_dry_run_prints_trials_and_resources_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        cluster, "local_gpus", lambda: 1
    )  # the resources as asked: on a GPU-less machine, fitted
    space = write(
        tmp_path,
        """
name: dry
fixed: {epochs: 1}
grid:
  bits: [{w_bits: null, a_bits: null}, {w_bits: 4, a_bits: 4}]
  first: [fp32, w8a8, body]
resources: {cpu: 1, gpu: 0.5}
""",
    )
    storage, reports = tmp_path / "runs", tmp_path / "reports"
    assert sweep.main([space, "--dry-run", "--storage", str(storage), "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert "4 trials (6 cells, 2 merged)" in out
    assert "3 cells identical after normalization: FP32 x first run once (trial 1)" in out
    assert "1 CPU, 0.5 GPU" in out and "FIFO" in out and "nothing was started or written" in out
    assert not storage.exists() and not reports.exists()


def test_dry_run_notes_a_cifar_folder_that_holds_no_cifar_yet(tmp_path, capsys):
    """A data_dir without CIFAR-10 in either layout is not an error (each trial downloads it),
    but the dry run says so before a sweep's worth of trials waits on a download; a folder with
    train/ and test/ gets no note."""
    data = tmp_path / "data"
    data.mkdir()
    space = write(tmp_path, f"fixed: {{dataset: cifar10, data_dir: {data}, epochs: 1}}\n")
    args = [space, "--dry-run", "--storage", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert f"note: data_dir {data} holds no cifar10 yet" in out
    assert "cifar-10-batches-py/" in out and "download" in out
    (data / "train").mkdir()
    (data / "test").mkdir()
    assert sweep.main(args) == 0
    assert "holds no" not in capsys.readouterr().out
