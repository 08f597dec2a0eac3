"""`python sweep.py` end to end on a real local Ray: a tiny sweep and its report, and joining an
existing cluster with --address. (The driver killed and resumed: tests/test_faults.py.)

Each sweep runs as its own process, the way users run it, and starts its own private local Ray.
The module's one local Ray (the fixture) plays "another Ray on the same machine": the sweeps must
start beside it, ignore a RAY_ADDRESS pointing at it, and can join it with --address.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lsq import cluster, ray_fixes, resume, storage, tuner

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SPACE = """
name: {name}
fixed: {{model: resnet20, dataset: digits, epochs: {epochs}, lr: 0.05, batch_size: {batch}, first: w8a8, last: w8a8}}
variants:
{rows}
resources: {{cpu: 1}}
max_failures: 1
"""
FP32, W4, W2 = "{w_bits: null, a_bits: null}", "{w_bits: 4, a_bits: 4}", "{w_bits: 2, a_bits: 2}"
BROKEN = "{w_bits: 4, a_bits: 4, dataset: cifar10, data_dir: empty}"  # a folder without CIFAR-10: every attempt fails


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, with Ray 2.59+'s default token authentication."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def space(tmp_path, name, epochs, batch, bits):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        SPACE.format(name=name, epochs=epochs, batch=batch, rows="\n".join(f"  - {b}" for b in bits))
    )
    return str(path)


def sweep_cmd(tmp_path, *args):
    return [
        sys.executable,
        str(ROOT / "sweep.py"),
        *args,
        "--storage",
        str(tmp_path / "runs"),
        "--reports",
        str(tmp_path / "reports"),
    ]


def run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    return proc


def table_rows(markdown: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines() if line.startswith("|")
    ]


def rows(trial_dir):
    with open(Path(trial_dir) / "result.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sweep_end_to_end_report_matches_trials(local_ray, tmp_path):
    (tmp_path / "empty").mkdir()
    path = space(tmp_path, "tiny", epochs=2, batch=256, bits=[FP32, W4, BROKEN])
    started = time.time()
    # a RAY_ADDRESS left in the shell (here: the module's Ray) must not hijack the sweep
    proc = run(sweep_cmd(tmp_path, path), cwd=tmp_path, env={"RAY_ADDRESS": local_ray})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a trial errored
    assert "RAY_ADDRESS is set but ignored" in proc.stderr
    print(f"tiny sweep: {time.time() - started:.1f}s")

    experiment = tmp_path / "runs" / "tiny"
    folder = tmp_path / "reports" / "tiny"
    for f in (
        "results.parquet",
        "results.csv",
        "table.md",
        "layers.md",
        "layers.csv",
        "accuracy_vs_bits.png",
    ):
        assert (folder / f).stat().st_size > 0, f
    header = re.search(r"^\|(.*)\|$", proc.stdout.split(f"Report: {folder}")[1], re.M)[1]
    assert [cell.strip() for cell in header.split("|")] == ["Models", "Networks", "Params", "Notes", "Acc@1"]

    everything = pd.read_parquet(folder / "results.parquet")
    assert len(everything) == 3 and everything["trial_id"].is_unique
    # exactly one row per trial folder in the run directory: each folder Tune made for a trial
    # (the one holding its params.json) is named by exactly one row's trial_name
    trial_folders = sorted(p.name for p in experiment.iterdir() if (p / "params.json").is_file())
    assert len(trial_folders) == 3 and sorted(everything["trial_name"]) == trial_folders, (
        trial_folders,
        list(everything["trial_name"]),
    )
    # the broken trial was retried (max_failures 1), then marked ERROR with its reason; the others ran on
    broken = everything[everything["dataset"] == "cifar10"].iloc[0]
    assert broken["status"] == "ERROR" and broken["epochs_done"] == 0
    assert "data_dir" in broken["error"] and "(2 failures)" in broken["error"]
    table = (folder / "table.md").read_text()
    assert "| lsq.config.ConfigError: key 'data_dir'" in table
    results = everything[everything["dataset"] == "digits"]
    for _, r in results.iterrows():
        trial_dir = experiment / Path(r["checkpoint"]).parent.name
        own = rows(trial_dir)  # the trial's own record
        assert [x["epoch"] for x in own] == [1, 2]
        assert r["status"] == "TERMINATED" and r["epochs_done"] == 2
        assert r["final_top1"] == own[-1]["top1"] and r["best_top1"] == max(x["top1"] for x in own)
        assert r["final_top5"] == own[-1]["top5"]
        assert r["wall_seconds"] == pytest.approx(own[-1]["time_total_s"])
        assert json.loads((trial_dir / "params.json").read_text())["w_bits"] == (
            None if pd.isna(r["w_bits"]) else 4
        )
        assert (Path(r["checkpoint"]) / "checkpoint.pt").exists() and (
            Path(r["checkpoint"]) / "layers.json"
        ).exists()
        assert not list(trial_dir.glob("events.out.tfevents*"))  # TensorBoard files only with --tensorboard
        label = "FP32" if pd.isna(r["w_bits"]) else "W4A4"
        row = [label, "ResNet-20", "2 epochs, wd 1e-4, batch 256, dataset digits"]  # the data set varies
        assert any(cells[: len(row)] == row for cells in table_rows(table)), table
        assert any(f"{r['final_top1']:.2f}" in cells for cells in table_rows(table)), table

    # the report again, from storage alone, in a process that starts no Ray
    (folder / "table.md").unlink()
    again = run(sweep_cmd(tmp_path, path, "--report-only"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert pd.read_parquet(folder / "results.parquet").equals(everything)
    assert (folder / "table.md").exists() and "Started a local Ray" not in again.stderr

    # the same name again without --resume: refused, with both ways out, nothing written
    before = sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    refused = run(sweep_cmd(tmp_path, path), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: sweep 'tiny' already exists")
    assert (
        "--resume" in refused.stderr
        and "--name tiny-2" in refused.stderr
        and "Traceback" not in refused.stderr
    )
    assert sorted(str(p) for p in (tmp_path / "runs").rglob("*")) == before

    # a resume from an experiment state Tune cannot rebuild the trials from: one error, and nothing
    # run again (Tune's controller would log the failure and start the whole sweep from epoch 0)
    state = max(experiment.glob("experiment_state-*.json"))
    snapshot = json.loads(state.read_text())
    snapshot["trial_data"] = [["not a trial's state", "{}"]]
    state.write_text(json.dumps(snapshot))
    trials = {str(p): p.read_bytes() for p in experiment.glob("*/**/*") if p.is_file()}
    broken = run(sweep_cmd(tmp_path, path, "--resume"), cwd=tmp_path)
    assert broken.returncode == 2, broken.stdout[-3000:] + broken.stderr[-3000:]
    err = broken.stderr.strip().splitlines()[-1]
    assert (
        err.startswith(f"error: --resume: Tune cannot restore sweep 'tiny' from {state} (")
        and "nothing was run again" in err
        and "--name tiny-2" in err
        and "Traceback" not in broken.stderr
    ), broken.stderr
    assert {str(p): p.read_bytes() for p in experiment.glob("*/**/*") if p.is_file()} == trials


def test_one_driver_per_sweep(tmp_path, capsys):
    """The same sweep started again, or resumed, while its driver still runs would have two Tunes
    write the same trial folders: refused, naming the driver. The lock goes with the driver."""
    import sweep

    path = space(tmp_path, "busy", epochs=1, batch=256, bits=[W4])
    experiment = tmp_path / "runs" / "busy"
    flags = ["--storage", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    with resume.one_driver(str(experiment), "busy"):  # a driver of this sweep (here: this process)
        assert (experiment / resume.LOCK_FILE).read_text().startswith(f"driver pid {os.getpid()} on ")
        for again in ([], ["--resume"]):
            assert sweep.main([path, *flags, *again]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: sweep 'busy' is running now (driver pid {os.getpid()} on "), err
            assert "--name busy-2" in err and err.count("\n") == 1
        assert sweep.main([path, *flags, "--dry-run"]) == 0
        assert "note: sweep 'busy' is running now" in capsys.readouterr().out
    assert not experiment.exists()  # it held nothing but the lock: gone with it
    assert resume.running_driver(str(experiment)) is None


def test_join_a_cluster_with_address(local_ray, tmp_path):
    path = space(tmp_path, "joined", epochs=1, batch=256, bits=[W4, W2])
    # (no deployment check after the last epoch: one trial after the other, it would add up; it
    # runs in the end-to-end test above)
    proc = run(
        sweep_cmd(
            tmp_path,
            path,
            "--address",
            local_ray,
            "--tensorboard",
            "--max-concurrent",
            "1",
            "--set",
            "deploy_check=false",
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "multi-node Ray cluster" in proc.stderr and "shared storage" in proc.stderr  # local --storage
    results = pd.read_csv(tmp_path / "reports" / "joined" / "results.csv")
    assert list(results["status"]) == ["TERMINATED", "TERMINATED"]
    trial_dirs = sorted(p for p in (tmp_path / "runs" / "joined").iterdir() if p.is_dir())
    assert len(trial_dirs) == 2
    for trial_dir in trial_dirs:
        assert list(trial_dir.glob("events.out.tfevents*")), sorted(p.name for p in trial_dir.iterdir())
    # one trial after the other in the same worker process: the second trial paid no worker start
    # (a new Python, Tune's and torch's imports) but got a fresh Trainer from its own config
    first, second = (rows(d)[-1] for d in trial_dirs)
    assert first["pid"] == second["pid"]
    for trial_dir, bits in zip(trial_dirs, (4, 2)):
        [checkpoint] = trial_dir.glob("checkpoint_*")
        body = json.loads((checkpoint / "layers.json").read_text())[1]  # layer1.0.conv1
        assert (body["w_bits"], body["a_bits"]) == (bits, bits), body


def test_resume_names_only_the_flags_it_ignores():
    """A resumed sweep keeps its resources, retries, concurrency limit and loggers. The
    printed resume command repeats the first run's flags: those say nothing; changed ones are named
    with the value the sweep keeps."""
    import sweep

    stored = {"resources": {"cpu": 2, "gpu": 0}, "max_failures": 1, "max_concurrent": 1, "tensorboard": False}
    same = sweep.parse_args(
        ["s.yaml", "--resume", "--cpus-per-trial", "2", "--max-failures", "1", "--max-concurrent", "1"]
    )
    assert resume.ignored_on_resume(same, stored) == []
    changed = sweep.parse_args(
        ["s.yaml", "--resume", "--cpus-per-trial", "4", "--max-concurrent", "3", "--tensorboard"]
    )
    assert resume.ignored_on_resume(changed, stored) == [
        "--cpus-per-trial 4 (keeps 2)",
        "--max-concurrent 3 (keeps 1)",
        "--tensorboard True (keeps False)",
    ]
    # a sweep.json from before the limit was recorded: Tune had applied none
    older = {"resources": {"cpu": 1, "gpu": 0}, "max_failures": 2}
    assert resume.ignored_on_resume(
        sweep.parse_args(["s.yaml", "--resume", "--max-concurrent", "1"]), older
    ) == ["--max-concurrent 1 (keeps no limit)"]
    # no sweep.json at all: the resume runs with the flags' resources, so they are not 'ignored'
    assert (
        resume.ignored_on_resume(sweep.parse_args(["s.yaml", "--resume", "--cpus-per-trial", "2"]), {}) == []
    )


def test_without_file_locks_the_sweep_warns_and_runs(tmp_path, monkeypatch, capsys):
    """NFSv3 without its lock service answers flock with ENOLCK: a warning, not a failed sweep."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    experiment = tmp_path / "runs" / "nolock"
    with resume.one_driver(str(experiment), "nolock"):
        assert resume.running_driver(str(experiment)) is None
    assert "warning: cannot lock" in capsys.readouterr().err and not experiment.exists()


def test_report_only_reads_a_read_only_sweep(tmp_path, monkeypatch, capsys):
    import sweep

    experiment = tmp_path / "archive" / "old"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: not str(p).startswith(str(tmp_path / "archive")) and real_access(p, m)
    )
    assert (
        sweep.main(
            [
                "--report-only",
                "--name",
                "old",
                "--storage",
                str(tmp_path / "archive"),
                "--reports",
                str(tmp_path / "reports"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (tmp_path / "reports" / "old" / "table.md").exists()


def test_progress_table_shows_epoch_top1_and_the_varied_keys():
    """Tune's progress table, every REPORT_S, with the columns a sweep reads: epoch, top-1, best,
    and the keys the space varies beyond the bits and first/last already in the trial's name."""
    progress = tuner.progress_reporter(["w_bits", "lr", "first"])
    assert progress._metric_columns == {"epoch": "epoch", "top1": "top-1", "best_top1": "best"}
    assert progress._parameter_columns == ["lr"] and progress._max_report_freqency == tuner.REPORT_S


def test_resume_dry_run_shows_the_resources_the_resume_keeps(tmp_path, capsys):
    import sweep

    experiment = tmp_path / "runs" / "kept"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(
        '{"trial_data": [], "runner_data": {}}'
    )
    es = {"metric": "top1", "mode": "max", "grace_period": 2, "reduction_factor": 4}
    (experiment / "sweep.json").write_text(
        json.dumps(
            {
                "name": "kept",
                "resources": {"cpu": 1, "gpu": 0},
                "trials": 2,
                "max_failures": 5,
                "early_stopping": es,
                "max_concurrent": 1,
            }
        )
    )
    path = space(tmp_path, "kept", epochs=1, batch=256, bits=[W4])  # FIFO, the default retries
    assert (
        sweep.main(
            [path, "--storage", str(tmp_path / "runs"), "--resume", "--dry-run", "--cpus-per-trial", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "resources per trial: 1 CPU" in out
    assert (
        "scheduler: ASHA on top1 (max)" in out and "retried up to 5 times" in out
    )  # the stored ones, which the resume keeps
    assert "up to 1 at once" in out, out
    # what the real resume would say, the dry run says too: the previewed space is not what resumes
    assert "resume: the stored sweep's trials continue as they started" in out
    assert "note: the space now has 1 trial, the stored sweep 2" in out
    assert "ignored: --cpus-per-trial 2 (keeps 1)" in out


@pytest.mark.parametrize(
    "cpus, gpus, flags, expect",
    [
        (
            2,
            0,
            ["--gpus-per-trial", "1"],
            [
                "note: the cluster has no GPU: running CPU-only (asked for gpu=1 per trial)",
                "resources per trial: 1 CPU; on this machine (2 CPUs) up to 2 at once",
            ],
        ),
        (
            16,
            1,
            ["--gpus-per-trial", "1"],
            ["resources per trial: 1 CPU, 1 GPU; on this machine (16 CPUs, 1 GPU) up to 1 at once"],
        ),
        (
            16,
            4,
            ["--gpus-per-trial", "0.5", "--cpus-per-trial", "2"],
            ["resources per trial: 2 CPUs, 0.5 GPU; on this machine (16 CPUs, 4 GPUs) up to 8 at once"],
        ),
        (
            2,
            0,
            ["--cpus-per-trial", "4"],
            [
                "note: this machine has 2 CPUs: each trial gets 2 (asked for 4)",
                "resources per trial: 2 CPUs; on this machine (2 CPUs) up to 1 at once",
            ],
        ),
    ],
)
def test_dry_run_fits_the_resources_to_this_machine_as_the_run_would(
    cpus, gpus, flags, expect, tmp_path, monkeypatch, capsys
):
    """The dry run previews the run on this machine: trials wait for GPUs as well as CPUs, and
    what the private Ray cannot give is fitted (or refused) with the real run's notes."""
    import sweep

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(cluster, "local_gpus", lambda: gpus)
    path = space(tmp_path, "fit", epochs=1, batch=256, bits=[W4])
    assert sweep.main([path, "--storage", str(tmp_path / "runs"), "--dry-run", *flags]) == 0
    out = capsys.readouterr().out
    for line in expect:
        assert line in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "gpus, flags, error",
    [
        (
            0,
            ["--set", "device=cuda"],
            "error: key 'device' = 'cuda' but the cluster has no GPU; allowed here: auto, cpu",
        ),
        (
            1,
            ["--gpus-per-trial", "2"],
            "error: resources: gpu=2 per trial, but the cluster has 1 GPU; allowed: at most 1",
        ),
    ],
)
def test_dry_run_refuses_what_the_run_on_this_machine_would_refuse(
    gpus, flags, error, tmp_path, monkeypatch, capsys
):
    import sweep

    monkeypatch.setattr(cluster, "local_gpus", lambda: gpus)
    path = space(tmp_path, "refused", epochs=1, batch=256, bits=[W4])
    assert sweep.main([path, "--storage", str(tmp_path / "runs"), "--dry-run", *flags]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(error) and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_piped_into_head_stops_quietly(tmp_path):
    """`python sweep.py SPACE --dry-run | head`: the reader closes the pipe after a few lines; the
    dry run stops without an error line (it printed `error: BrokenPipeError`, exit 1)."""
    path = tmp_path / "big.yaml"
    path.write_text("name: big\nfixed: {epochs: 1}\nseeds: 3000\n")  # a table larger than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sweep.py"), str(path), "--dry-run", "--storage", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("Sweep 'big'")
    proc.stdout.close()  # what head does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err
    assert not (tmp_path / "runs").exists()


def test_local_gpus_counts_what_ray_would(monkeypatch):
    """As ray.init counts them: the devices, capped by CUDA_VISIBLE_DEVICES where it is set."""
    from ray._private import accelerators

    manager = accelerators.get_accelerator_manager_for_resource("GPU")
    monkeypatch.setattr(manager, "get_current_node_num_accelerators", staticmethod(lambda: 4))
    monkeypatch.setattr(
        manager, "get_current_process_visible_accelerator_ids", staticmethod(lambda: ["0", "2"])
    )
    assert cluster.local_gpus() == 2
    monkeypatch.setattr(manager, "get_current_process_visible_accelerator_ids", staticmethod(lambda: None))
    assert cluster.local_gpus() == 4
    monkeypatch.setattr(manager, "get_current_node_num_accelerators", staticmethod(lambda: 1 / 0))
    assert cluster.local_gpus() is None  # Ray cannot say: the dry run shows the resources as asked


def test_resume_says_when_the_space_no_longer_matches_the_stored_trials(tmp_path, capsys):
    """Tune resumes the stored trials with the configs they started with: a space (or --set) that
    now asks for more epochs or other trials is named, with the way to run it."""
    from lsq.space import load_space

    path = space(tmp_path, "grown", epochs=1, batch=256, bits=[W4, W2, FP32])
    exp = tmp_path / "runs" / "grown"
    exp.mkdir(parents=True)
    storage.write_meta(str(exp), {"trials": 3})

    def stored(*numbers):  # Tune's snapshot, which lists its trials in no particular order
        points = load_space(path, []).points()
        trials = [
            [
                json.dumps(
                    {
                        "trial_id": f"ab12_{i:05d}",
                        "status": "RUNNING",
                        "relative_logdir": f"t{i}",
                        "config": points[i],
                    }
                ),
                "{}",
            ]
            for i in numbers
        ]
        (exp / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trials}))

    stored(2, 0, 1)
    resume.warn_if_space_changed(load_space(path, []), str(exp))
    assert capsys.readouterr().out == ""  # the space it started with: nothing to say
    resume.warn_if_space_changed(load_space(path, ["epochs=3", "lr=0.1"]), str(exp))
    out = capsys.readouterr().out
    assert "(epochs 1 -> 3; lr 0.05 -> 0.1)" in out and "as they started" in out and "--name grown-2" in out
    # --max-concurrent 1, interrupted in trial 2: Tune has created two trials so far
    stored(1, 0)
    resume.warn_if_space_changed(load_space(path, []), str(exp))
    assert capsys.readouterr().out == ""
    resume.warn_if_space_changed(
        load_space(path, ["w_bits=3"]), str(exp)
    )  # trial 3, not created yet, not compared
    assert "(w_bits {4, 2} -> 3)" in capsys.readouterr().out
    resume.warn_if_space_changed(load_space(space(tmp_path, "grown", 1, 256, [W4, W2]), []), str(exp))
    assert "the space now has 2 trials, the stored sweep 3" in capsys.readouterr().out


def test_ctrl_c_while_ray_starts_waits_for_the_start_then_interrupts():
    """A KeyboardInterrupt inside ray.init left a half-built core worker that crashed the exit
    (status 139) and Ray's agents running: the first Ctrl-C now waits for the start to end."""
    import signal

    class Ray:
        stopped = False

        def shutdown(self):
            self.stopped = True

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes

    outer = signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # as in a terminal, even where CI ignores it
    try:
        started, ray = [], Ray()
        with pytest.raises(KeyboardInterrupt):
            with ray_fixes.ctrl_c_once_started(ray):
                ctrl_c()
                started.append("the rest of ray.init")
        assert started == ["the rest of ray.init"] and ray.stopped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
            with ray_fixes.ctrl_c_once_started(Ray()):
                ctrl_c()
                ctrl_c()
                started.append("not reached")
        assert (
            started == ["the rest of ray.init"]
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT stays ignored
        with ray_fixes.ctrl_c_once_started(Ray()):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_tunes_stop_lines_give_way_to_the_sweeps_own(capsys):
    """At Ctrl-C Tune logs that it saves its state and how to resume from Python (`Tuner.restore`);
    the sweep prints its own resume command, so Tune's two lines become one short one."""
    import logging

    def record(msg):
        return logging.LogRecord("ray.tune.tune", logging.WARNING, "tune.py", 1, msg, None, None)

    assert not tuner.tune_stop_lines(
        record("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
    )
    assert capsys.readouterr().err == "\nstopping: Tune saves the sweep's state (Ctrl-C again to skip that)\n"
    assert not tuner.tune_stop_lines(
        record("Experiment has been interrupted, but the most recent state was saved.")
    )
    assert tuner.tune_stop_lines(record("Trial failed for another reason"))  # every other warning stays
    assert capsys.readouterr().err == ""


def test_ctrl_c_before_anything_is_stored_does_not_advise_resume(tmp_path):
    import sweep

    argv = ["s.yaml", "--storage", str(tmp_path)]
    args = sweep.parse_args(argv)
    again, resumed = (
        resume.resume_command(argv, resume=False),
        resume.resume_command(argv),
    )  # test_faults runs a printed one
    assert again.endswith(f"s.yaml --storage {tmp_path}") and resumed == again + " --resume"
    assert resume.interrupted_text(args, argv).endswith(f"Start it again with:\n  {again}")
    args.experiment = str(tmp_path / "s")  # named, but Tune had stored nothing yet
    assert "nothing to resume" in resume.interrupted_text(args, argv)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "tuner.pkl").write_bytes(b"")
    assert resume.interrupted_text(args, argv).endswith(f"Resume with:\n  {resumed}")
    report_only = sweep.parse_args(argv + ["--report-only"])
    assert resume.interrupted_text(report_only, argv) == "\ninterrupted."


def test_the_driver_imports_no_torch_and_tune_still_logs_every_result():
    """The driver only hands train_lsq to Tune: importing torch there (directly, or through Tune's
    TensorBoard logger and tensorboardX) cost 3-4 s of every sweep's start. result.json and
    progress.csv, which the reports read, are still written."""
    code = """
import sys
sys.argv = ["sweep.py"]
import sweep
from lsq.ray_fixes import no_tensorboard
from lsq.trainable import train_lsq
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.utils.callback import _create_default_callbacks
tune.with_resources(train_lsq, {"cpu": 1})
callbacks = _create_default_callbacks([no_tensorboard()])
kinds = [type(c).__name__ for c in callbacks]
assert any(isinstance(c, JsonLoggerCallback) for c in callbacks), kinds
assert any(isinstance(c, CSVLoggerCallback) for c in callbacks), kinds
assert [type(c).__name__ for c in callbacks if isinstance(c, TBXLoggerCallback)] == ['NoTensorBoard'], kinds
print(sorted(m for m in ("torch", "tensorboardX") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_tune_snapshot_copies_are_whole_or_absent(tmp_path, monkeypatch):
    """Tune copies its experiment snapshot to storage after every step by writing each file in
    place, so a driver killed mid-copy left it cut short (0 bytes) and the next --resume failed.
    With ray_fixes.whole_file_snapshots() the copy Tune launches writes each file beside its target
    and renames it over: a copy stopped before the rename leaves the previous whole file, and a
    state Tune is rewriting at that moment is not copied."""
    import pickle

    import pyarrow.fs as pafs
    from ray.train._internal import storage as ray_storage
    from ray.train._internal.storage import _FilesystemSyncer

    monkeypatch.syspath_prepend(str(ROOT))

    monkeypatch.setattr(
        ray_storage, "_upload_to_fs_path", ray_storage._upload_to_fs_path
    )  # restored afterwards
    assert (
        ray_fixes.whole_file_snapshots() and ray_fixes.whole_file_snapshots()
    )  # once, then already in place
    src, dst = tmp_path / "staging", tmp_path / "runs" / "exp"
    (src / "sub").mkdir(parents=True)
    state = {"trial_data": [["{}", "{}"]], "runner_data": {}}
    (src / "experiment_state-s1.json").write_text(json.dumps(state))
    (src / "basic-variant-state-s1.json").write_bytes(pickle.dumps({"n": 1}))
    (src / "sub" / "other.txt").write_text("x")
    (src / ".tmp-basic-variant-state-s2.json").write_bytes(b"\x80")  # Tune's atomic save, half done
    upload, kwargs = _FilesystemSyncer(storage_filesystem=pafs.LocalFileSystem())._sync_up_command(
        local_path=str(src), uri=str(dst)
    )  # what Tune's background sync runs
    assert getattr(upload, "whole_files", False)
    upload(**kwargs)
    assert json.loads((dst / "experiment_state-s1.json").read_text()) == state
    assert pickle.loads((dst / "basic-variant-state-s1.json").read_bytes()) == {"n": 1}
    assert (dst / "sub" / "other.txt").read_text() == "x"
    assert not (dst / ".tmp-basic-variant-state-s2.json").exists()

    # Tune rewriting the state in place while this copy runs: the old whole copy stays
    (src / "experiment_state-s1.json").write_text(json.dumps(state)[:20])
    upload(**kwargs)
    assert json.loads((dst / "experiment_state-s1.json").read_text()) == state

    # the driver killed in the middle of a copy (here: just before a rename)
    state["trial_data"].append(["{}", "{}"])
    (src / "experiment_state-s1.json").write_text(json.dumps(state))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        upload(**kwargs)
    monkeypatch.undo()
    assert (
        len(json.loads((dst / "experiment_state-s1.json").read_text())["trial_data"]) == 1
    )  # whole, previous
    assert [p.name for p in dst.iterdir() if p.name.endswith(".tmp")]  # the unfinished copy, hidden


def test_a_restarted_trial_keeps_the_results_it_reported(tmp_path, monkeypatch):
    """When a trial restarts, Tune's loggers copy its result.json back from storage over the
    driver's staging copy. If the background copy to storage had not caught up, that dropped the
    newest lines: a trial that crashed right after reporting epoch 1 came back with the history
    [2, 3] (seen under load, in tests/test_trainable.py). With ray_fixes.results_survive_a_restart()
    this driver's staging file stays; a new driver (empty staging) still gets storage's copy."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.logger import logger as tune_logger

    monkeypatch.syspath_prepend(str(ROOT))

    cls = tune_logger.LoggerCallback
    ray_own = getattr(
        cls._restore_from_remote, "unpatched", cls._restore_from_remote
    )  # (a sweep run in this process patches it)
    monkeypatch.setattr(cls, "_restore_from_remote", ray_own)  # restored afterwards
    staging, stored = tmp_path / "staging", tmp_path / "runs" / "trial"
    staging.mkdir()
    stored.mkdir(parents=True)
    trial = SimpleNamespace(
        local_path=str(staging),
        checkpoint="checkpoint_000000",
        storage=SimpleNamespace(trial_fs_path=str(stored), storage_filesystem=pafs.LocalFileSystem()),
    )
    reported = '{"epoch": 1}\n'

    def restart():  # what Tune runs as the restarted trial starts (log_trial_start)
        (staging / "result.json").write_text(reported)  # this driver's latest
        (stored / "result.json").write_text("")  # storage's copy: the last upload had not finished
        JsonLoggerCallback()._restore_from_remote("result.json", trial)
        return (staging / "result.json").read_text()

    assert restart() == ""  # Ray's own behaviour: epoch 1 is gone
    assert (
        ray_fixes.results_survive_a_restart() and ray_fixes.results_survive_a_restart()
    )  # once, then already in place
    assert restart() == reported

    # a new driver (a resumed sweep) starts with an empty staging folder: it takes storage's copy
    (staging / "result.json").unlink()
    (stored / "result.json").write_text(reported)
    JsonLoggerCallback()._restore_from_remote("result.json", trial)
    assert (staging / "result.json").read_text() == reported


def test_trials_run_in_the_workers_ray_prestarts(monkeypatch):
    """Ray starts an idle worker per CPU with the node, and a worker serves only tasks whose
    runtime env matches its own empty one. Tune's default runtime env for every trainable
    ({"env_vars": {"PL_DISABLE_FORK": "1"}}) made each trial wait for a fresh process instead.
    After ray_fixes.trials_in_prestarted_workers() the trainable's runtime env is empty; variables
    Tune forwards on purpose (here an AWS key) are still forwarded."""
    from ray.tune.execution import class_cache

    monkeypatch.syspath_prepend(str(ROOT))

    monkeypatch.setattr(
        class_cache, "DEFAULT_ENV_VARS", dict(class_cache.DEFAULT_ENV_VARS)
    )  # restored afterwards
    for name in class_cache.ENV_VARS_TO_PROPAGATE:
        monkeypatch.delenv(name, raising=False)

    class Before:
        pass

    class After:
        pass

    class WithKey:
        pass

    assert class_cache._ActorClassCache().get(Before)._default_options["runtime_env"]  # Tune's own default
    assert ray_fixes.trials_in_prestarted_workers()
    assert class_cache._ActorClassCache().get(After)._default_options["runtime_env"] in ({}, {"env_vars": {}})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    assert class_cache._ActorClassCache().get(WithKey)._default_options["runtime_env"] == {
        "env_vars": {"AWS_ACCESS_KEY_ID": "key"}
    }


def test_the_private_ray_starts_lean_and_trials_get_its_prestarted_workers():
    """`python sweep.py` starts its own Ray without the HTTP API server (no port open, about 1 s
    of the start) and without the autoscaler's monitor (a one-machine cluster never scales), and
    --dashboard keeps Ray's own start. The workers Ray starts with the node serve the trials even
    when Tune has reserved the trials' CPUs (placement groups) a while before it asks for them:
    with Ray's default, idle workers were killed 1 s into such a gap and the trials waited for
    new processes."""
    code = """
import os, sys, time
from lsq import cluster, ray_fixes
ray = cluster.start_ray(None, dashboard=False)
import psutil  # Ray's own copy, on the path once ray is imported
from ray._private import node, ray_constants, worker
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

started = worker._global_node.all_processes
assert ray_constants.PROCESS_TYPE_DASHBOARD not in started and ray_constants.PROCESS_TYPE_MONITOR not in started, started
assert ray_constants.PROCESS_TYPE_RAYLET in started and ray_constants.PROCESS_TYPE_GCS_SERVER in started, started
raylet = psutil.Process(started[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)

def workers():  # Python workers: "ray::IDLE" until they take a task
    return {p.pid for p in raylet.children() if " ".join(p.cmdline()).startswith("ray::IDLE")}

n = min(2, int(ray.cluster_resources()["CPU"]))
deadline = time.time() + 60
while len(workers()) < n and time.time() < deadline:
    time.sleep(0.1)
prestarted = workers()
assert len(prestarted) >= n, prestarted
groups = [placement_group([{"CPU": 1}]) for _ in range(n)]  # what Tune does first for each trial
ray.get([g.ready() for g in groups])
time.sleep(2.5)  # the gap before the trial's actor comes, longer than Ray's default 1 s

@ray.remote(num_cpus=1)
class Trial:
    def pid(self):
        return os.getpid()

trials = [Trial.options(scheduling_strategy=PlacementGroupSchedulingStrategy(g)).remote() for g in groups]
pids = ray.get([t.pid.remote() for t in trials])
assert set(pids) <= prestarted and len(set(pids)) == n, (pids, prestarted)
ray.shutdown()
# Ray's own methods are back, and --dashboard leaves them alone
assert node.Node.start_api_server.__qualname__ == "Node.start_api_server"
assert node.Node.start_monitor.__qualname__ == "Node.start_monitor"
with ray_fixes.lean_local_ray(dashboard=True):
    assert node.Node.start_monitor.__qualname__ == "Node.start_monitor"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
