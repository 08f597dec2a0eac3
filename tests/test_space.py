"""Search spaces: expansion rules, merging of identical cells, and one clear error per mistake.

No Ray here: every case is checked by `load_space` and through `sweep.main` (exit code 2, the
message on stderr, nothing written), as a user would meet it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    path = write(tmp_path, """
name: rules
fixed: {epochs: 3, lr: 0.1, wd: 1.0e-4}
grid:
  bits: [{w_bits: 4, a_bits: 4}, {w_bits: 2, a_bits: 2}]
  wd: [1.0e-4, 5.0e-5]
variants:
  - {}
  - {lr: 0.05, wd: 2.5e-5}
seeds: 2
""")
    space = load_space(path, ["epochs=1"])
    # variants (outer) x grid (last key fastest) x seeds (innermost); variant rows beat the grid
    assert space.cells == 2 * 2 * 2 * 2
    first = space.trials[:8]
    assert [(t.w_bits, t.wd, t.seed) for t in first] == [
        (4, 1e-4, 0), (4, 1e-4, 1), (4, 5e-5, 0), (4, 5e-5, 1),
        (2, 1e-4, 0), (2, 1e-4, 1), (2, 5e-5, 0), (2, 5e-5, 1)]
    # the second variant sets wd itself, so its grid over wd collapses into one cell per bits x seed
    second = space.trials[8:]
    assert {(t.w_bits, t.lr, t.wd) for t in second} == {(4, 0.05, 2.5e-5), (2, 0.05, 2.5e-5)}
    assert len(space.trials) == 8 + 4
    assert all(t.epochs == 1 for t in space.trials)  # --set beats everything
    assert all(t.a_bits == t.w_bits for t in space.trials)  # an axis of partial configs moves together
    assert space.seeds == [0, 1]


def test_seed_list_and_defaults(tmp_path):
    space = load_space(write(tmp_path, "fixed: {epochs: 1}\nseeds: [7, 11]\n"))
    assert space.name == "space"  # the file's stem
    assert [t.seed for t in space.trials] == [7, 11]
    assert space.resources == {"cpu": 1, "gpu": 0} and space.early_stopping is None


def test_fp32_cells_merge_and_the_table_says_so(tmp_path):
    path = write(tmp_path, """
fixed: {epochs: 1}
grid:
  bits: [{w_bits: null, a_bits: null}, {w_bits: 4, a_bits: 4}]
  ends: [{first: fp32, last: fp32}, {first: w8a8, last: w8a8}, {first: body, last: body}]
""")
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


@pytest.mark.parametrize("name, sets, trials, cells", [
    ("smoke", [], 4, 4),
    ("cifar10_resnet20_bits", ["data_dir=/data/cifar10", "init_from=INIT"], 24, 30),
    ("imagenet_resnet18_seed", ["data_dir=/data/imagenet"], 7, 7),
    ("imagenet_resnet18_paper", ["data_dir=/data/imagenet"], 4, 4),
])
def test_shipped_spaces(name, sets, trials, cells, tmp_path):
    init = tmp_path / "fp32.pt"
    init.write_bytes(b"x")
    sets = [s.replace("INIT", str(init)) for s in sets]
    space = load_space(str(ROOT / "search_spaces" / f"{name}.yaml"), sets)
    assert space.name == name and len(space.trials) == trials and space.cells == cells
    if name == "smoke":
        assert [t.label() for t in space.trials] == ["FP32", "W8A8", "W4A4", "W2A2"]
        assert {(t.first, t.last, t.dataset, t.model) for t in space.trials} == {("w8a8", "w8a8", "digits", "resnet20")}
    if name == "imagenet_resnet18_paper":
        assert {t.w_bits: t.wd for t in space.trials} == {2: 2.5e-5, 3: 5e-5, 4: 1e-4, 8: 1e-4}
        assert {(t.epochs, t.schedule, t.lr, t.first, t.last) for t in space.trials} == {(90, "cosine", 0.01, "w8a8", "w8a8")}
    if name == "imagenet_resnet18_seed":
        rows = {(t.label(), t.end_bits("first"), t.end_bits("last"), t.epochs) for t in space.trials}
        assert rows == {("FP32", (None, None), (None, None), 90)} | {
            ("W4A4", first, last, epochs) for epochs in (120, 90)
            for first, last in [((4, None), (4, 4)), ((8, None), (8, 8)), ((8, 8), (8, 8))]}
        assert {(t.wd, t.batch_size, t.lr, t.init_from) for t in space.trials} == {(1e-4, 512, 0.01, "torchvision")}


# ----------------------------------------------------------------------------- mistakes
# (file text, --set items, words the message must contain: the file, the key, what is allowed)
BAD = {
    "yaml_syntax": ("name: x\nfixed:\n  epochs: 3\n  w_bits: [4\n", [], ["line 5", "YAML syntax error", "started at line 4"]),
    "not_a_mapping": ("- epochs: 3\n", [], ["expected a mapping", "got a list"]),
    "unknown_top_key": ("fixd:\n  epochs: 3\n", [], [":1", "'fixd'", "did you mean 'fixed'", "allowed: name"]),
    "unknown_key": ("fixed:\n  epoch: 3\n", [], [":2", "'epoch'", "did you mean 'epochs'", "allowed keys"]),
    "unknown_grid_key": ("grid:\n  w_bit: [2, 4]\n", [], [":2", "'w_bit'", "did you mean 'w_bits'"]),
    "unknown_key_in_axis": ("grid:\n  bits:\n    - {w_bits: 4, a_bit: 4}\n", [], [":3", "'a_bit'", "did you mean 'a_bits'"]),
    "wrong_type": ("fixed:\n  epochs: three\n", [], [":2", "'epochs'", "expected an integer"]),
    "wrong_type_bool": ("fixed:\n  nesterov: maybe\n", [], [":2", "'nesterov'", "true or false"]),
    "bits_out_of_range": ("grid:\n  w_bits: [4, 9]\n", [], [":2", "'w_bits' = 9", "2..8", "32"]),
    "bits_out_of_range_set": ("fixed: {epochs: 1}\n", ["a_bits=1"], ["--set a_bits=1", "'a_bits' = 1", "2..8"]),
    "unknown_preset": ("variants:\n  - {first: w8a8}\n  - {first: bdy}\n", [], [":3", "'first' = 'bdy'", "did you mean 'body'", "w_body_a_fp32"]),
    "unknown_model": ("fixed:\n  model: resnet21\n", [], [":2", "'model' = 'resnet21'", "resnet20"]),
    "unknown_dataset": ("fixed:\n  dataset: mnist\n", [], [":2", "'dataset' = 'mnist'", "digits, cifar10"]),
    "empty_grid_list": ("grid:\n  wd: []\n", [], [":2", "'wd'", "empty list", "at least one value"]),
    "empty_variants": ("variants: []\n", [], [":1", "'variants'", "empty list"]),
    "empty_seeds": ("seeds: []\n", [], [":1", "'seeds'", "empty list"]),
    "missing_init_from": ("fixed:\n  init_from: nope/fp32.pt\n", [], [":2", "'init_from'", "no such file", "torchvision", "--set init_from"]),
    "missing_data_dir": ("fixed:\n  dataset: cifar10\n", [], ["'data_dir'", "required", "--set data_dir"]),
    "grid_not_a_list": ("grid:\n  wd: 1.0e-4\n", [], [":2", "'wd'", "expected a list", "'fixed'"]),
    "bad_resource": ("resources: {cpu: 1, gpus: 1}\n", [], [":1", "'gpus'", "did you mean 'gpu'", "allowed: cpu, gpu"]),
    "bad_gpu_share": ("resources: {gpu: 1.5}\n", [], [":1", "'gpu' = 1.5", "fraction"]),
    "seed_and_seeds": ("fixed: {seed: 3}\nseeds: 2\n", [], [":1", "'seed'", "one of them"]),
    "set_unknown_key": ("fixed: {epochs: 1}\n", ["epohs=2"], ["--set epohs=2", "did you mean 'epochs'"]),
    "set_unparseable": ("fixed: {epochs: 1}\n", ["lr=[0.1"], ["--set 'lr=[0.1'", "YAML"]),
    "set_no_equals": ("fixed: {epochs: 1}\n", ["epochs"], ["--set 'epochs'", "key=value"]),
    "bad_name": ("name: my sweep\n", [], [":1", "'my sweep'", "letters, digits"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_mistake_is_one_clear_error(case, tmp_path):
    text, sets, words = BAD[case]
    path = write(tmp_path, text, f"{case}.yaml")
    with pytest.raises(ConfigError) as err:
        load_space(path, sets)
    message = str(err.value)
    if not case.startswith("set_") and case != "bits_out_of_range_set":
        assert path in message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_mistake_exits_2_and_writes_nothing(case, tmp_path, capsys):
    text, sets, words = BAD[case]
    path = write(tmp_path, text, f"{case}.yaml")
    storage, reports = tmp_path / "runs", tmp_path / "reports"
    argv = [path, "--storage", str(storage), "--reports", str(reports)]
    for s in sets:
        argv += ["--set", s]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words[-1] in err and "Traceback" not in err
    assert not storage.exists() and not reports.exists()


@pytest.mark.parametrize("case", ["yaml_syntax", "unknown_key", "missing_init_from"])
def test_cli_mistake_in_a_fresh_process(case, tmp_path):
    """The real command: exit status 2, one `error:` line, no traceback, nothing written."""
    text, sets, words = BAD[case]
    path = write(tmp_path, text, f"{case}.yaml")
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), path, "--storage", "runs", "--reports", "reports"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr
    assert sorted(os.listdir(tmp_path)) == [f"{case}.yaml"]


def test_missing_space_file_names_the_known_ones(tmp_path, capsys):
    assert sweep.main([str(ROOT / "search_spaces" / "smok.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no such search space file" in err and "smoke.yaml" in err


def test_dry_run_prints_trials_and_resources_and_writes_nothing(tmp_path, capsys):
    space = write(tmp_path, """
name: dry
fixed: {epochs: 1}
grid:
  bits: [{w_bits: null, a_bits: null}, {w_bits: 4, a_bits: 4}]
  first: [fp32, w8a8, body]
resources: {cpu: 1, gpu: 0.5}
""")
    storage, reports = tmp_path / "runs", tmp_path / "reports"
    assert sweep.main([space, "--dry-run", "--storage", str(storage), "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert "4 trials (6 cells, 2 merged)" in out
    assert "3 cells identical after normalization: FP32 x first run once (trial 1)" in out
    assert "1 CPU, 0.5 GPU" in out and "FIFO" in out and "nothing was started or written" in out
    assert not storage.exists() and not reports.exists()
