"""Bad input and untrusted files: every mistake is one clear `error:` line naming the
file, the key (its dotted path), the value and what is allowed; exit status 2; no traceback; nothing
written (the storage and reports folders, which already hold another sweep, stay unchanged).

One table, run through the command line (`sweep.main`, what `python sweep.py` calls; a few
cases again in a fresh process). No Ray here: every mistake is caught before Ray starts (a test
that starts it fails). What the cluster cannot give (GPUs, CPUs) is known only once Ray has
started: those cases run with a stand-in for Ray that reports the cluster's resources.
"""

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lsq import cluster, ray_fixes, tuner
from lsq.config import ConfigError
from lsq.models import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sweep  # noqa: E402


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# files a case may refer to (made in the test's folder)
FILES = {
    "text.pt": lambda p: p.write_text("hello, not a checkpoint\n"),
    "resnet32.pt": lambda p: torch.save(build_model("resnet32", 10, 1).state_dict(), p),
    "cifar100.pt": lambda p: torch.save(build_model("resnet20", 100, 3).state_dict(), p),
    "evil.pt": lambda p: torch.save(
        {"model": build_model("resnet20", 10, 1).state_dict(), "x": _Payload(p.parent / "pwned")}, p
    ),
    "shadow/clash": lambda p: (
        p.parent.mkdir() or p.write_text("a file where sweep 'clash' puts its report folder\n")
    ),
    "shadow2/clash/table.md": lambda p: p.mkdir(parents=True),  # a folder where the report writes a file
}
TAG = "!!python/object/apply:os.system ['touch pwned']"

# case: (space file text, or None for no file; --set items and other flags; words the message must have)
BAD = {
    # YAML itself
    "yaml_syntax": (
        "name: x\nfixed:\n  epochs: 3\n  w_bits: [4\n",
        [],
        [":5:1", "YAML syntax error", "while parsing a flow sequence"],
    ),
    "yaml_python_tag": (
        f"fixed:\n  epochs: {TAG}\n",
        [],
        [":2:11", "YAML tag", "python/object/apply:os.system", "not allowed", "safe_load"],
    ),
    "not_a_mapping": ("- epochs: 3\n", [], ["expected a mapping", "got a list"]),
    "not_a_mapping_text": ("just some text\n", [], ["expected a mapping", "got a str"]),
    "empty_file": ("", [], ["expected a mapping", "got an empty file"]),
    "no_such_file": (None, [], ["no such search space file"]),
    # keys
    "unknown_top_key": (
        "fixd:\n  epochs: 3\n",
        [],
        ["(fixd)", "'fixd'", "did you mean 'fixed'", "allowed: name"],
    ),
    "unknown_key": (
        "fixed:\n  epoch: 3\n",
        [],
        ["(fixed.epoch)", "'epoch'", "did you mean 'epochs'", "allowed keys"],
    ),
    "unknown_grid_key": (
        "grid:\n  w_bit: [2, 4]\n",
        [],
        ["(grid.w_bit)", "'w_bit'", "did you mean 'w_bits'"],
    ),
    "grid_axes_set_one_key": (
        "grid:\n  w_bits: [2, 4]\n  bits: [{w_bits: 8}]\n",
        [],
        [
            "(grid.bits[0].w_bits)",
            "grid.bits[0]",
            "'w_bits'",
            "grid axes 'w_bits' and 'bits'",
            "allowed: each key in one axis",
        ],
    ),
    "grid_axis_item_not_a_mapping": (
        "grid:\n  bits:\n    - {w_bits: 2}\n    - 3\n",
        [],
        [
            "(grid.bits[1])",
            "grid.bits[1]",
            "'grid.bits[1]' = 3",
            "allowed: a mapping of config keys",
        ],
    ),
    "unknown_key_in_axis": (
        "grid:\n  bits:\n    - {w_bits: 4, a_bit: 4}\n",
        [],
        ["(grid.bits[0].a_bit)", "'a_bit'", "did you mean 'a_bits'"],
    ),
    "bad_resource": (
        "resources: {cpu: 1, gpus: 1}\n",
        [],
        ["(resources.gpus)", "'gpus'", "did you mean 'gpu'", "allowed: cpu, gpu"],
    ),
    # types and ranges
    "wrong_type": ("fixed:\n  epochs: three\n", [], ["(fixed.epochs)", "'epochs'", "expected an integer"]),
    "wrong_type_bool": (
        "fixed:\n  nesterov: maybe\n",
        [],
        ["(fixed.nesterov)", "'nesterov'", "true or false"],
    ),
    "wrong_type_section": (
        "fixed: [epochs, 3]\n",
        [],
        ["(fixed)", "'fixed' = ['epochs', 3]", "allowed: a mapping"],
    ),
    "grid_not_a_list": (
        "grid:\n  wd: 1.0e-4\n",
        [],
        ["(grid.wd)", "'grid.wd' = 0.0001", "a non-empty list", "'fixed'"],
    ),
    "bits_out_of_range": ("grid:\n  w_bits: [4, 9]\n", [], ["(grid.w_bits)", "'w_bits' = 9", "2..8", "32"]),
    "bits_out_of_range_set": (
        "fixed: {epochs: 1}\n",
        ["--set", "a_bits=1"],
        ["--set a_bits=1", "'a_bits' = 1", "2..8"],
    ),
    "bad_gpu_share": ("resources: {gpu: 1.5}\n", [], ["(resources.gpu)", "'gpu' = 1.5", "fraction"]),
    "bad_name": ("name: my sweep\n", [], ["(name)", "'my sweep'", "letters, digits"]),
    "seed_and_seeds": ("fixed: {seed: 3}\nseeds: 2\n", [], ["(fixed.seed)", "'seed'", "one of them"]),
    "max_concurrent_zero": (
        "fixed: {epochs: 1}\n",
        ["--max-concurrent", "0"],
        ["--max-concurrent 0", "allowed", ">= 1"],
    ),
    "seeds_zero": (
        "fixed: {epochs: 1}\nseeds: 0\n",
        [],
        ["(seeds)", "'seeds' = 0", "allowed: a count N >= 1"],
    ),
    "seeds_negative": ("seeds: -2\n", [], ["(seeds)", "'seeds' = -2", "allowed: a count N >= 1"]),
    "cpu_zero": (
        "resources: {cpu: 0}\n",
        [],
        ["(resources.cpu)", "'cpu' = 0", "allowed: a number >= 0.0001"],
    ),
    "cpus_per_trial_zero": (
        "fixed: {epochs: 1}\n",
        ["--cpus-per-trial", "0", "--dry-run"],
        ["--cpus-per-trial", "'cpu' = 0", "allowed: a number >= 0.0001"],
    ),
    "cpus_per_trial_below_rays_step": (
        "fixed: {epochs: 1}\n",
        ["--cpus-per-trial", "0.00001"],
        ["--cpus-per-trial", "'cpu' = 1e-05", "allowed: a number >= 0.0001"],
    ),
    "gpu_below_rays_step": (
        "resources: {gpu: 0.00001}\n",
        [],
        ["(resources.gpu)", "'gpu' = 1e-05", "a fraction in 0.0001..1"],
    ),
    "max_failures_negative": (
        "fixed: {epochs: 1}\n",
        ["--max-failures", "-1", "--dry-run"],
        ["--max-failures -1", "allowed: a whole number >= 0"],
    ),
    "max_failures_negative_in_file": (
        "max_failures: -1\n",
        [],
        ["(max_failures)", "'max_failures' = -1", "allowed: a whole number >= 0"],
    ),
    "momentum_over_one": (
        "fixed:\n  momentum: 1.5\n",
        [],
        ["(fixed.momentum)", "'momentum' = 1.5", "must be <= 1"],
    ),
    "momentum_over_one_set": (
        "fixed: {epochs: 1}\n",
        ["--set", "momentum=1.01", "--dry-run"],
        ["--set momentum=1.01", "'momentum' = 1.01", "must be <= 1"],
    ),
    # early stopping (ASHA)
    "es_unknown_metric": (
        "early_stopping:\n  metric: accuracy\n",
        [],
        [
            "(early_stopping.metric)",
            "early_stopping.metric",
            "'early_stopping.metric' = 'accuracy'",
            "allowed: top1, top5, loss, best_top1",
        ],
    ),
    "es_metric_a_list": (
        "early_stopping: {metric: [top1]}\n",
        ["--dry-run"],
        ["'early_stopping.metric' = ['top1']", "allowed: top1"],
    ),
    "es_unknown_mode": (
        "early_stopping:\n  metric: top1\n  mode: maximize\n",
        [],
        [
            "(early_stopping.mode)",
            "early_stopping.mode",
            "'early_stopping.mode' = 'maximize'",
            "allowed: max (a higher top1 is better)",
        ],
    ),
    "es_mode_against_metric": (
        "early_stopping: {metric: loss, mode: max}\n",
        [],
        ["(early_stopping.mode)", "'early_stopping.mode' = 'max'", "allowed: min", "lower loss is better"],
    ),
    "es_grace_period_zero": (
        "early_stopping:\n  grace_period: 0\n",
        [],
        [
            "(early_stopping.grace_period)",
            "early_stopping.grace_period",
            "'early_stopping.grace_period' = 0",
            "allowed: a whole number of epochs >= 1",
        ],
    ),
    "es_grace_period_text": (
        "early_stopping:\n  grace_period: two\n",
        [],
        [
            "(early_stopping.grace_period)",
            "'early_stopping.grace_period' = 'two'",
            "allowed: a whole number of epochs >= 1",
        ],
    ),
    "es_grace_period_past_epochs": (
        "fixed: {epochs: 2}\nearly_stopping:\n  grace_period: 3\n",
        [],
        [
            "(early_stopping.grace_period)",
            "early_stopping.grace_period",
            "'early_stopping.grace_period' = 3",
            "allowed: a whole number of epochs from 1 to 2 (the longest trial's)",
        ],
    ),
    "es_grace_period_past_epochs_set": (
        "grid: {epochs: [1, 3]}\nearly_stopping: {grace_period: 3}\n",
        ["--set", "epochs=2"],
        ["(early_stopping.grace_period)", "= 3", "from 1 to 2 (the longest trial's)"],
    ),
    "es_reduction_factor_one": (
        "early_stopping:\n  reduction_factor: 1\n",
        [],
        [
            "(early_stopping.reduction_factor)",
            "early_stopping.reduction_factor",
            "'early_stopping.reduction_factor' = 1",
            "allowed: a number > 1",
        ],
    ),
    "es_reduction_factor_nan": (
        "early_stopping:\n  reduction_factor: .nan\n",
        [],
        [
            "(early_stopping.reduction_factor)",
            "'early_stopping.reduction_factor' = nan",
            "allowed: a number > 1",
        ],
    ),
    "es_reduction_factor_text": (
        "early_stopping:\n  reduction_factor: half\n",
        [],
        [
            "(early_stopping.reduction_factor)",
            "'early_stopping.reduction_factor' = 'half'",
            "allowed: a number > 1",
        ],
    ),
    "es_unknown_key": (
        "early_stopping:\n  metrc: top5\n",
        [],
        [
            "(early_stopping.metrc)",
            "'metrc'",
            "did you mean 'metric'",
            "allowed: metric, mode, grace_period, reduction_factor",
        ],
    ),
    "es_not_a_mapping": (
        "early_stopping: top1\n",
        [],
        [
            "(early_stopping)",
            "'early_stopping' = 'top1'",
            "allowed: a mapping with keys metric, mode",
            "true",
        ],
    ),
    # unknown names
    "unknown_model": (
        "fixed:\n  model: resnet21\n",
        [],
        ["(fixed.model)", "'model' = 'resnet21'", "resnet20"],
    ),
    "unknown_dataset": (
        "fixed:\n  dataset: mnist\n",
        [],
        ["(fixed.dataset)", "'dataset' = 'mnist'", "digits, cifar10"],
    ),
    "unknown_preset": (
        "variants:\n  - {first: w8a8}\n  - {first: bdy}\n",
        [],
        ["(variants[1].first)", "'first' = 'bdy'", "did you mean 'body'", "w_body_a_fp32"],
    ),
    # nothing to run
    "empty_grid": ("grid: {}\n", [], ["(grid)", "'grid' = {}", "allowed: a non-empty mapping"]),
    "empty_grid_list": (
        "grid:\n  wd: []\n",
        [],
        ["(grid.wd)", "'grid.wd' = []", "allowed: a non-empty list"],
    ),
    "empty_variants": ("variants: []\n", [], ["(variants)", "'variants' = []", "allowed: a non-empty list"]),
    "empty_seeds": ("seeds: []\n", [], ["(seeds)", "'seeds' = []", "allowed: a count N >= 1"]),
    # data
    "missing_data_dir": ("fixed:\n  dataset: cifar10\n", [], ["'data_dir'", "required", "--set data_dir"]),
    "data_dir_not_a_folder": (
        "fixed:\n  dataset: cifar10\n  data_dir: no/such/folder\n",
        [],
        ["'data_dir'", "no/such/folder", "no such folder", "allowed"],
    ),
    "imagenet_data_dir_without_imagenet": (
        "fixed:\n  dataset: imagenet\n  model: resnet18\n  data_dir: .\n",
        ["--dry-run"],
        ["'data_dir'", "holds no ImageNet", "train/ and val/", "allowed"],
    ),
    "data_dir_not_a_folder_dry_run": (
        "fixed:\n  dataset: cifar10\n  data_dir: no/such/folder\n",
        ["--dry-run"],
        ["'data_dir'", "no/such/folder", "no such folder", "allowed"],
    ),
    # init_from
    "init_from_missing": (
        "fixed:\n  init_from: nope/fp32.pt\n",
        [],
        ["(fixed.init_from)", "'init_from'", "no such file", "torchvision", "--set init_from"],
    ),
    "init_from_not_a_checkpoint": (
        "fixed:\n  init_from: text.pt\n",
        [],
        ["(trial 1, W4A4)", "'init_from'", "text.pt", "not a loadable checkpoint", "weights_only=True"],
    ),
    "init_from_other_model": (
        "fixed:\n  init_from: resnet32.pt\n",
        [],
        ["'init_from'", "does not fit model resnet20", "unexpected keys: layer1.3.bn1.bias"],
    ),
    "init_from_other_data": (
        "fixed:\n  init_from: cifar100.pt\n",
        [],
        [
            "'init_from'",
            "does not fit model resnet20",
            "shape mismatch",
            "conv1.weight (16, 3, 3, 3) vs (16, 1, 3, 3)",
            "fc.weight (100, 64) vs (10, 64)",
        ],
    ),
    "init_from_runs_code": (
        "fixed:\n  init_from: evil.pt\n",
        [],
        ["'init_from'", "evil.pt", "refused by weights_only", "posix.system"],
    ),
    # --set
    "set_unknown_key": (
        "fixed: {epochs: 1}\n",
        ["--set", "epohs=2"],
        ["--set epohs=2", "did you mean 'epochs'"],
    ),
    "set_unparseable": ("fixed: {epochs: 1}\n", ["--set", "lr=[0.1"], ["--set 'lr=[0.1'", "YAML"]),
    "set_seeds": (
        "fixed: {epochs: 1}\n",
        ["--set", "seeds=2"],
        ["--set 'seeds=2'", "'seeds' is not a trial key", "a section of the space file"],
    ),
    "set_max_failures": (
        "fixed: {epochs: 1}\n",
        ["--set", "max_failures=1"],
        ["--set 'max_failures=1'", "'max_failures' is not a trial key", "a flag (see --help)"],
    ),
    "name_empty": ("fixed: {epochs: 1}\n", ["--name", ""], ["--name", "sweep name '' is not allowed"]),
    "set_no_equals": ("fixed: {epochs: 1}\n", ["--set", "epochs"], ["--set 'epochs'", "key=value"]),
    # --storage
    "storage_under_a_file": (
        "fixed: {epochs: 1}\n",
        ["--storage", "text.pt/runs"],
        ["--storage text.pt/runs", "text.pt is a file", "allowed: a folder"],
    ),
    "storage_unknown_scheme": (
        "fixed: {epochs: 1}\n",
        ["--storage", "foo://bucket/runs"],
        ["--storage foo://bucket/runs", "cannot use it", "Unrecognized"],
    ),
    "reports_under_a_file": (
        "fixed: {epochs: 1}\n",
        ["--reports", "text.pt/r"],
        ["--reports text.pt/r", "text.pt is a file"],
    ),
    "reports_name_is_a_file": (
        "name: clash\nfixed: {epochs: 1}\n",
        ["--reports", "shadow"],
        ["--reports shadow", "shadow/clash is a file", "allowed: a folder"],
    ),
    "reports_a_uri": (
        "fixed: {epochs: 1}\n",
        ["--reports", "s3://bucket/reports"],
        ["--reports s3://bucket/reports", "a URI", "allowed: a local folder"],
    ),
    "storage_file_uri_to_a_file": (
        "fixed: {epochs: 1}\n",
        ["--storage", "file://text.pt"],
        ["--storage file://text.pt", "text.pt is a file", "allowed: a folder"],
    ),
    "address_port_out_of_range": (
        "fixed: {epochs: 1}\n",
        ["--address", "127.0.0.1:99999"],
        ["--address 127.0.0.1:99999", "a port in 1..65535"],
    ),
    "address_empty": (
        "fixed: {epochs: 1}\n",
        ["--address", "", "--dry-run"],
        ["--address ''", "expected auto, HOST:PORT", "a port in 1..65535"],
    ),
    "address_port_not_ascii": (
        "fixed: {epochs: 1}\n",
        ["--address", "localhost:\u00b2"],
        ["--address 'localhost:\u00b2'", "a port in 1..65535"],
    ),
    # a sweep that is not there
    "resume_nothing": (
        "name: gone\nfixed: {epochs: 1}\n",
        ["--resume"],
        ["--resume", "no sweep 'gone'", "runs", "start it without --resume"],
    ),
    "resume_nothing_dry_run": (
        "name: gone\nfixed: {epochs: 1}\n",
        ["--resume", "--dry-run"],
        ["--resume", "no sweep 'gone'", "start it without --resume"],
    ),
    "report_only_nothing": (
        "name: gone\nfixed: {epochs: 1}\n",
        ["--report-only"],
        ["--report-only", "no sweep 'gone'", "nothing to report"],
    ),
    "set_python_tag": (
        "fixed: {epochs: 1}\n",
        ["--set", f"epochs={TAG}"],
        ["--set", "cannot read the value as YAML", "constructor"],
    ),
}


def tree(folder: Path) -> dict:
    """Every path under `folder` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The test's folder as the working directory, with the files the cases name, and storage and
    reports folders that already hold another sweep (bad input must leave them as they are)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        cluster, "start_ray", lambda *a: pytest.fail("Ray started: the mistake went unnoticed")
    )
    for name, make in FILES.items():
        make(tmp_path / name)
    for f in ("runs/other/experiment_state-2026-01-01_00-00-00.json", "reports/other/table.md"):
        (tmp_path / f).parent.mkdir(parents=True)
        (tmp_path / f).write_text("{}")
    return tmp_path


def argv(case: str, folder: Path) -> tuple[list[str], str]:
    text, flags, _ = BAD[case]
    path = folder / f"{case}.yaml"
    if text is not None:
        path.write_text(text)
    return [str(path), "--storage", str(folder / "runs"), "--reports", str(folder / "reports"), *flags], str(
        path
    )


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error_exit_2_nothing_written(case, workdir, capsys):
    args, path = argv(case, workdir)
    before = tree(workdir)
    assert sweep.main(args) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err and not out, (out, err)
    for word in BAD[case][2]:
        assert word in err, (word, err)
    if not BAD[case][1] or BAD[case][1] == ["--dry-run"]:
        assert path in err, err  # a mistake in the file names the file
    assert tree(workdir) == before  # nothing written, nothing changed
    assert not (workdir / "pwned").exists()  # no code from the input ran


@pytest.mark.parametrize(
    "case", ["yaml_syntax", "yaml_python_tag", "init_from_runs_code", "data_dir_not_a_folder"]
)
def test_bad_input_in_a_fresh_process(case, workdir):
    """The real command: exit status 2, one `error:` line, no traceback, nothing written."""
    args, _ = argv(case, workdir)
    before = tree(workdir)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sweep.py"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and not proc.stdout, proc.stderr
    for word in BAD[case][2]:
        assert word in proc.stderr, (word, proc.stderr)
    assert tree(workdir) == before and not (workdir / "pwned").exists()


@pytest.mark.parametrize("flags", [["--dry-run"], ["--report-only"]])
def test_a_space_that_is_a_folder_is_refused(flags, workdir, capsys):
    path = workdir / "folder.yaml"
    path.mkdir()
    before = tree(workdir)
    assert sweep.main([str(path), "--storage", str(workdir / "runs"), *flags]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1 and not out, (out, err)
    assert "cannot read it" in err and "Is a directory" in err and "allowed: a search space file" in err, err
    assert tree(workdir) == before


def test_storage_that_cannot_be_created_stops_before_ray(workdir, monkeypatch, capsys):
    """/proc passes os.access for root (as NFS with root squashing does): the folder is created
    before Ray starts, and a failure is one error naming --storage, not Tune's traceback later."""
    monkeypatch.setattr(cluster, "start_ray", lambda *a: pytest.fail("Ray started"))
    (workdir / "s.yaml").write_text("name: other2\nfixed: {epochs: 1}\n")
    assert sweep.main(["s.yaml", "--storage", "/proc/lsq-runs"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --storage /proc/lsq-runs: ") and err.count("\n") == 1, err
    assert "cannot create it" in err or "read-only for this user" in err, err
    assert not os.path.exists("/proc/lsq-runs")


# ----------------------------------------------------------------------------- what the cluster can give
# Checked once Ray has started (`fit_resources`: the cluster's CPUs and GPUs are Ray's to say).
# Here Ray is a stand-in that reports the cluster's resources; the sweep itself is not run.
def fit(workdir, monkeypatch, capsys, space_text, resources, *flags):
    """sweep.main on a cluster with these `resources`: (exit status, stdout, stderr, the
    resources the sweep would have run with, or None where it did not get that far)."""
    ran = []
    fake_ray = types.SimpleNamespace(cluster_resources=lambda: dict(resources), shutdown=lambda: None)
    monkeypatch.setattr(cluster, "start_ray", lambda *a: fake_ray)
    monkeypatch.setattr(tuner, "run_sweep", lambda plan: ran.append(plan.resources) or 0)
    (workdir / "fit.yaml").write_text(space_text)
    status = sweep.main(
        ["fit.yaml", "--storage", str(workdir / "runs"), "--reports", str(workdir / "reports"), *flags]
    )
    return status, *capsys.readouterr(), (ran[0] if ran else None)


@pytest.mark.parametrize("gpu", [0, 1])
def test_device_cuda_on_a_cluster_without_gpu_is_an_error(gpu, workdir, monkeypatch, capsys):
    """device=cuda fails in every trial where there is no GPU, whatever GPU share the trials ask
    for: one error naming the key, the value and what is allowed, exit 2, nothing run or written."""
    space = f"fixed: {{epochs: 1, device: cuda}}\nresources: {{gpu: {gpu}}}\n"
    status, out, err, ran = fit(workdir, monkeypatch, capsys, space, {"CPU": 8.0})
    assert status == 2 and ran is None, (status, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in ("'device' = 'cuda'", "no GPU", "allowed here: auto, cpu"):
        assert word in err, (word, err)
    assert not (workdir / "runs" / "fit").exists() and not (workdir / "reports" / "fit").exists()


def test_a_gpu_share_on_a_cluster_without_gpu_runs_cpu_only_and_says_so(workdir, monkeypatch, capsys):
    space = "fixed: {epochs: 1}\nresources: {cpu: 2, gpu: 0.5}\n"
    status, out, err, ran = fit(workdir, monkeypatch, capsys, space, {"CPU": 8.0})
    assert status == 0 and ran == {"cpu": 2, "gpu": 0}, (status, out, err)
    assert "note: the cluster has no GPU: running CPU-only (asked for gpu=0.5 per trial)" in out, out


@pytest.mark.parametrize("gpu, status", [(1, 0), (2, 2)])
def test_more_gpus_per_trial_than_the_cluster_has_is_an_error(gpu, status, workdir, monkeypatch, capsys):
    """A trial that asks for more GPUs than the whole cluster has would wait for ever: one error
    naming the GPUs asked for, the cluster's and what is allowed. As many as the cluster has is fine."""
    got, out, err, ran = fit(
        workdir,
        monkeypatch,
        capsys,
        "fixed: {epochs: 1}\n",
        {"CPU": 8.0, "GPU": 1.0},
        "--gpus-per-trial",
        str(gpu),
    )
    assert got == status, (got, out, err)
    if status == 0:
        assert ran == {"cpu": 1, "gpu": 1} and not err and "note:" not in out, (out, err)
        return
    assert ran is None and err.startswith("error: ") and err.count("\n") == 1, err
    for word in ("gpu=2", "the cluster has 1 GPU;", "allowed: at most 1"):
        assert word in err, (word, err)


@pytest.mark.parametrize("cpu, address, got", [(8, [], 2.0), (2, [], 2), (8, ["--address", "auto"], 8)])
def test_more_cpus_per_trial_than_this_machine_has_are_capped_locally(
    cpu, address, got, workdir, monkeypatch, capsys
):
    """On a local Ray a trial that asks for more CPUs than the machine has gets them all, with a
    note; a cluster (--address) may grow, so its request stands."""
    space = f"fixed: {{epochs: 1}}\nresources: {{cpu: {cpu}}}\n"
    status, out, err, ran = fit(workdir, monkeypatch, capsys, space, {"CPU": 2.0}, *address)
    assert status == 0 and ran == {"cpu": got, "gpu": 0}, (status, out, err)
    capped = cpu == 8 and not address
    assert out.count("note: this machine has") == capped, out  # no note where nothing changed
    assert ("note: this machine has 2 CPUs: each trial gets 2 (asked for 8)" in out) == capped, out


@pytest.mark.parametrize(
    "pkl, words",
    [
        (pickle.dumps([1, 2]), ["TypeError"]),
        (b"cno_such_module_here\nthing\n.", ["ModuleNotFoundError", "no_such_module_here"]),
    ],
)
def test_resume_from_a_tuner_pkl_that_is_not_tunes_is_one_error(pkl, words, workdir, monkeypatch, capsys):
    """A tuner.pkl that is whole (a pickle to its end) but not the state Tune wrote: one error
    naming the file, exit 2, not the exception from inside Tuner.restore; --debug shows that one."""
    monkeypatch.setattr(
        cluster,
        "start_ray",
        lambda *a: types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}, shutdown=lambda: None),
    )
    monkeypatch.setattr(ray_fixes, "patch_tune", lambda: None)  # patched Tune would stay so for later tests
    exp = workdir / "runs" / "broken"
    exp.mkdir(parents=True)
    (exp / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [], "runner_data": {}}')
    (exp / "tuner.pkl").write_bytes(pkl)
    (workdir / "broken.yaml").write_text("fixed: {epochs: 1}\n")
    args = [
        "broken.yaml",
        "--storage",
        str(workdir / "runs"),
        "--reports",
        str(workdir / "reports"),
        "--resume",
    ]
    assert sweep.main(args) == 2
    out, err = capsys.readouterr()
    assert (
        err.startswith(f"error: --resume: cannot restore sweep 'broken' from {exp / 'tuner.pkl'} (")
        and err.count("\n") == 1
        and "Traceback" not in err
    ), err
    for word in words + ["allowed: the tuner.pkl Tune wrote for this sweep", "--name broken-2"]:
        assert word in err, (word, err)
    assert (exp / "tuner.pkl").read_bytes() == pkl and not (workdir / "reports" / "broken").exists()
    with pytest.raises(Exception) as raised:
        sweep.main(args + ["--debug"])
    assert not isinstance(raised.value, ConfigError) and words[0] in type(raised.value).__name__


def test_the_malicious_inputs_would_run_code_if_loaded_unsafely(workdir):
    """Positive controls: the YAML tag and the pickle above do run code without safe loading."""
    yaml.unsafe_load(f"epochs: {TAG}\n")
    assert (workdir / "pwned").exists()
    (workdir / "pwned").unlink()
    torch.load(workdir / "evil.pt", weights_only=False)
    assert (workdir / "pwned").exists()
    (workdir / "pwned").unlink()
    pickle.loads(pickle.dumps(_Payload(workdir / "pwned")))
    assert (workdir / "pwned").exists()


@pytest.mark.parametrize("flags, dashboard", [([], False), (["--dashboard"], True)])
def test_local_ray_on_loopback_with_its_own_token_and_dashboard_only_on_request(
    flags, dashboard, monkeypatch
):
    """What sweep.py asks of a local Ray (the sockets themselves are checked in test_faults.py)."""
    import ray

    for k in (
        "TUNE_GLOBAL_CHECKPOINT_S",
        "TUNE_DISABLE_STRICT_METRIC_CHECKING",
        "RAY_AIR_NEW_OUTPUT",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_ADDRESS",
    ):
        monkeypatch.delenv(k, raising=False)  # restored after the test
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    cluster.start_ray(None, dashboard)
    [kw] = calls
    assert kw["address"] == "local" and kw["include_dashboard"] is dashboard
    # Tune snapshots the sweep after every step, not every ~10 s: a killed driver's resume must
    # know every checkpoint already on disk (tests/test_faults.py kills drivers right after one)
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "0"
    # a diverged trial's report has no top1: under early stopping Tune would end the sweep for it
    assert os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] == "1"
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # node address 127.0.0.1
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64  # a fresh token for this sweep's Ray
