"""Faults a sweep survives (issue 5), each one really inflicted on a real `python sweep.py`.

- The driver SIGKILLed three times in one sweep (after the first checkpoint, mid-way, near the
  end), with a truncated and a code-running checkpoint planted between the kills; the resumed
  sweep equals an uninterrupted run exactly (CPU, one thread per trial, the same seeds).
- A trial's worker SIGKILLed mid-epoch, a diverging trial, a full disk under one trial's
  checkpoint, and SIGTERM to the driver, in one sweep; then the printed resume command.
- A node of a two-node `ray.cluster_utils.Cluster` removed mid-trial.

Every sweep is its own process with its own private local Ray, as users run it; the moments to
strike are found by watching the storage (Tune's snapshot, checkpoint_N folders, result.json),
never by sleeping. Trials are the smallest that still train: ResNet-20 on digits, batch 256,
one CPU each, without the deployment check after the last epoch (none of these faults touches
it; tests/test_trainable.py runs it in a real Ray).
"""

import functools
import glob
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray  # (also puts Ray's bundled psutil on sys.path)

# isort: split
import psutil
import torch
from ray.tune.utils.serialization import TuneFunctionDecoder

from lsq import report, storage
from lsq.config import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FIXED = "{model: resnet20, dataset: digits, epochs: %d, lr: 0.05, batch_size: 256, first: w8a8, last: w8a8, deploy_check: false}"
FP32, W4, W2, W8 = (
    "{w_bits: null, a_bits: null}",
    "{w_bits: 4, a_bits: 4}",
    "{w_bits: 2, a_bits: 2}",
    "{w_bits: 8, a_bits: 8}",
)


def write_space(tmp_path, name, rows, epochs, max_failures=1):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nfixed: {FIXED % epochs}\nvariants:\n"
        + "".join(f"  - {r}\n" for r in rows)
        + f"resources: {{cpu: 1}}\nmax_failures: {max_failures}\n"
    )
    return str(path)


# ----------------------------------------------------------------------------- watching a sweep
class Sweep:
    """`python sweep.py ...` in the background; stdout and stderr go to a log file."""

    def __init__(self, tmp_path, args, log, cmd=None, env=None):
        self.log = tmp_path / log
        self.cmd = cmd or [
            sys.executable,
            str(ROOT / "sweep.py"),
            *args,
            "--storage",
            str(tmp_path / "runs"),
            "--reports",
            str(tmp_path / "reports"),
        ]
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=tmp_path,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )  # a killed driver's log is whole
        self.started = time.time()
        self.pids: set[int] = set()  # every process this driver's Ray ran (trial workers included)
        self.logs_dir = None  # its Ray session's logs folder
        self.noted = 0.0  # when _note_ray last looked

    def output(self) -> str:
        return self.log.read_text()

    def until(self, condition, what: str, timeout: float = 240):
        """Poll `condition` every 50 ms until it returns something true; the sweep must still run."""
        deadline = time.time() + timeout
        while True:
            self._note_ray()
            value = condition()
            if value:
                return value
            assert self.proc.poll() is None, (
                f"the sweep ended (exit {self.proc.returncode}) before {what}:\n{self.output()[-5000:]}"
            )
            assert time.time() < deadline, f"no {what} after {timeout:.0f} s:\n{self.output()[-5000:]}"
            time.sleep(0.05)

    def _note_ray(self):
        """Note this driver's Ray processes, twice a second: a trial worker lives for seconds at
        least (its imports and an epoch), and listing the processes takes a few ms of the CPU the
        trials share."""
        if time.time() < self.noted + 0.5:
            return
        self.noted = time.time()
        procs = self.ray_processes()
        self.pids |= {p.pid for p in procs}
        for p in procs if self.logs_dir is None else []:
            try:
                args = p.cmdline()
            except psutil.Error:
                continue
            self.logs_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--log_dir=")), None)
            if self.logs_dir:
                break

    def worker_logs(self) -> str:
        """What this driver's trial workers wrote to stderr: complete even when the driver was
        killed before Ray forwarded it to the driver's own output."""
        assert self.logs_dir, "this driver's Ray session was never seen"
        return "".join(
            Path(f).read_text(errors="replace") for f in sorted(glob.glob(f"{self.logs_dir}/worker-*.err"))
        )

    def ray_processes(self) -> list:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self):
        """SIGKILL, as a crash or the OOM killer would: no handler runs, nothing is flushed. Then
        wait until the Ray it started (GCS, raylet, trial workers) is gone too, so no orphan of
        this driver writes into the storage while the next one resumes. (Ray's dashboard and
        runtime-env agents linger for about a minute; they write nothing there.)"""
        ray_procs = [p for p in self.ray_processes() if "Agent" not in _name(p)]
        self.pids |= {p.pid for p in ray_procs}
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._out.close()
        deadline = time.time() + 60
        while alive := [p for p in ray_procs if _alive(p)]:
            assert time.time() < deadline, f"Ray processes outlived their killed driver by 60 s: {alive}"
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> int:
        """Its exit status, once it ends by itself."""
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            assert time.time() < deadline, (
                f"the sweep still runs after {timeout:.0f} s:\n{self.output()[-5000:]}"
            )
            self._note_ray()
            time.sleep(0.1)
        self._out.close()
        return self.proc.returncode


# Ray stops a trial's worker with SIGTERM (a finished trial's, or every one when the driver is
# stopped); when the signal lands inside a weakref callback, Python prints Ray's SystemExit as
# "Exception ignored in: ..." (rare; the worker's, not the sweep's)
RAY_SIGTERM_NOISE = re.compile(
    r"Exception ignored in: [^\n]*\nTraceback \(most recent call last\):\n"
    r"(?:[^\n]*\n)*?[^\n]*ray/_private/worker\.py[^\n]*sigterm_handler\n"
    r"(?:[^\n]*\n)*?SystemExit: 1\n"
)


def _name(p) -> str:
    try:
        return p.name()
    except psutil.NoSuchProcess:
        return ""


def _alive(p) -> bool:
    """Running: not gone, and not a zombie (an orphan's exit status waits for a reaper that a
    container's init may never be)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def snapshot(experiment: Path) -> dict:
    """Tune's latest experiment snapshot: trial folder -> status, last reported epoch ("epoch"),
    the checkpoint a resume restores with its epoch ("checkpoint", "at"), and the resources Tune
    gives the trial ("resources": its placement group's bundles). Tune registers a
    checkpoint one controller step after its result, so "at" may trail "epoch" by one.
    {} while there is no snapshot, or while it is being rewritten. Callers only read it."""
    files = sorted(glob.glob(str(experiment / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        stat = os.stat(files[-1])
    except OSError:
        return {}
    return _parse_snapshot(files[-1], (stat.st_ino, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _parse_snapshot(file: str, version: tuple) -> dict:
    """snapshot() of one version of the file (inode, mtime, size): parsed once, not at every poll
    (each parse unpickles Tune's objects, a few ms of the CPU the trials share)."""
    try:
        state = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for trial_json, runtime_json in state["trial_data"]:
        trial = json.loads(trial_json)
        runtime = json.loads(runtime_json, cls=TuneFunctionDecoder, allow_cloudpickle=True)  # our own file
        last = runtime.get("last_result") or {}
        saved = runtime["checkpoint_manager"].latest_checkpoint_result
        bundles = ray.cloudpickle.loads(bytes.fromhex(trial["placement_group_factory"])).bundles
        out[trial["relative_logdir"]] = {
            "status": trial["status"],
            "epoch": last.get("epoch", 0),
            "file": file,
            "resources": bundles,
            "checkpoint": os.path.basename(saved.checkpoint.path) if saved else None,
            "at": saved.metrics["epoch"] if saved else 0,
        }
    return out


def raw_rows(trial_dir: Path) -> list[dict]:
    """result.json as stored: every line Tune wrote, repeats included."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return rows


def segments(rows: list[dict]) -> list[list[dict]]:
    """The raw rows cut where a (re)started trial reported for the first time."""
    out = []
    for r in rows:
        if r.get("iterations_since_restore") == 1 or not out:
            out.append([])
        out[-1].append(r)
    return out


def checkpoints_on_disk(trial_dir: Path) -> list[str]:
    return sorted(p.name for p in trial_dir.glob("checkpoint_*") if p.is_dir())


def label(trial_dir: Path) -> str:
    return TrialConfig.from_dict(json.loads((trial_dir / "params.json").read_text())).label()


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "params.json").exists())


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# the reference: the same trials, uninterrupted, by the plain Trainer with one thread (as a trial has)
REFERENCE = r"""
import json, sys, torch
from lsq.space import load_space
from lsq.train import Trainer
torch.set_num_threads(1)
out = {t.label(): [{k: m[k] for k in ("epoch", "top1", "top5", "loss", "train_loss")} for m in Trainer(t).epochs()]
       for t in load_space(sys.argv[1]).trials}
json.dump(out, open(sys.argv[2], "w"))
"""


# ----------------------------------------------------------------------------- 1. the driver killed three times
def test_driver_killed_three_times_resumes_exactly(tmp_path):
    epochs = 4
    space = write_space(tmp_path, "killed", [FP32, W4, W2], epochs=epochs)
    experiment = tmp_path / "runs" / "killed"
    reference = subprocess.Popen(
        [sys.executable, "-c", REFERENCE, space, str(tmp_path / "reference.json")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs, kills = [], []  # the drivers; Tune's snapshot right after each kill

    def start(*args):
        runs.append(Sweep(tmp_path, [space, *args], f"run{len(runs) + 1}.log"))
        return runs[-1]

    def kill(sweep):
        sweep.kill()
        kills.append(snapshot(experiment))
        return kills[-1]

    def fresh(sweep, state, folder):
        """Written by this driver, and it knows the trial's newest stored checkpoint."""
        s = state.get(folder)
        return (
            s
            and os.path.getmtime(s["file"]) > sweep.started
            and s["status"] == "RUNNING"
            and s["checkpoint"]
            and checkpoints_on_disk(experiment / folder)[-1:] == [s["checkpoint"]]
        )

    def find(sweep, test):
        state = snapshot(experiment)
        return next((f for f, s in state.items() if fresh(sweep, state, f) and test(f, s)), None)

    # kill 1: as soon as Tune's snapshot knows a checkpoint (two trials run, the third waits)
    run = start()
    run.until(lambda: glob.glob(str(experiment / "*" / "checkpoint_*")), "a first checkpoint")
    # (that Tune snapshots after every step, TUNE_GLOBAL_CHECKPOINT_S=0, is checked in test_bad_input.py)
    run.until(
        lambda: any(s["checkpoint"] for s in snapshot(experiment).values()), "the checkpoint in the snapshot"
    )
    kill(run)

    # kill 2, mid-way: a trial has just checkpointed epoch 2 and trains epoch 3. Then that
    # checkpoint is cut in half: the resume must detect it and fall back to epoch 1's.
    run = start("--resume")
    cut = run.until(lambda: find(run, lambda f, s: s["at"] == 2), "a fresh checkpoint of epoch 2")
    known = kill(run)
    assert known[cut]["at"] < epochs and len(checkpoints_on_disk(experiment / cut)) >= 2, known
    truncated = experiment / cut / known[cut]["checkpoint"] / "checkpoint.pt"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])

    # kill 3, near the end: 3/4 of all epochs done, and a trial has just checkpointed epoch 3 of 4.
    # That checkpoint becomes a pickle that would run code: refused, it falls back to epoch 2's.
    run = start("--resume")

    def near_the_end(f, s):
        return (
            s["at"] == epochs - 1
            and sum(o["epoch"] for o in snapshot(experiment).values()) >= 0.75 * 3 * epochs
        )

    evil = run.until(lambda: find(run, near_the_end), "a fresh checkpoint of epoch 3, 3/4 of the sweep done")
    known = kill(run)
    assert known[evil]["at"] < epochs and len(checkpoints_on_disk(experiment / evil)) >= 2, known
    print(
        "(reported, checkpointed) epochs at the kills:",
        [{f: (s["epoch"], s["at"]) for f, s in k.items()} for k in kills],
    )
    marker = tmp_path / "pwned"
    planted = experiment / evil / known[evil]["checkpoint"] / "checkpoint.pt"
    torch.save({**torch.load(planted, weights_only=True), "extra": _Payload(marker)}, planted)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()  # positive control: the payload does run code when unpickled unprotected

    # The last resume asks for other resources: the sweep keeps its own (Tune would give every
    # trial the new ones, and 2 threads would not reproduce the 1-thread reference exactly).
    run = start("--resume", "--cpus-per-trial", "2")
    assert run.wait() == 0, run.output()[-5000:]
    assert "ignored: --cpus-per-trial 2 (keeps 1)" in run.output(), run.output()[-3000:]
    assert [s["resources"] for s in snapshot(experiment).values()] == [[{"CPU": 1.0}]] * 3
    logs = "\n".join(r.output() for r in runs)
    assert not marker.exists(), "a trial checkpoint was unpickled without weights_only"
    assert "Traceback" not in RAY_SIGTERM_NOISE.sub("", logs), logs[-5000:]
    # both planted checkpoints were detected and skipped; each trial went on from the one before
    said = runs[2].worker_logs()
    assert f"skipping checkpoint {truncated.parent}: checkpoint {truncated} is unreadable" in said, said[
        -3000:
    ]
    assert f"resumed from the older checkpoint {experiment / cut}" in said, said[-3000:]
    said = run.worker_logs()
    assert (
        f"skipping checkpoint {planted.parent}: checkpoint {planted} is unreadable (refused by weights_only: "
        "Trying to load unsupported GLOBAL posix.system" in said
    ), said[-5000:]
    assert f"resumed from the older checkpoint {experiment / evil}" in said, said[-5000:]

    # every trial completed; the report lists each once
    results = pd.read_csv(tmp_path / "reports" / "killed" / "results.csv")
    assert len(results) == 3 and results["trial_id"].is_unique
    assert set(results["status"]) == {"TERMINATED"} and set(results["epochs_done"]) == {epochs}

    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    expected = json.loads((tmp_path / "reference.json").read_text())
    planted_at = {(cut, 1), (evil, 2)}  # (trial, kill) after which its latest checkpoint was spoiled
    for trial_dir in trial_dirs(experiment):
        name, want = trial_dir.name, expected[label(trial_dir)]
        rows = raw_rows(trial_dir)
        # the report's per-epoch view: every epoch exactly once, each equal to the uninterrupted run
        view = report.trial_results(storage.Storage(str(experiment)), name)
        assert [r["epoch"] for r in view] == list(range(1, epochs + 1)), (name, [r["epoch"] for r in rows])
        for got, ref in zip(view, want):
            assert {k: got[k] for k in ref} == ref, (name, got["epoch"])
        assert results.loc[results["trial_name"] == name, "final_top1"].item() == want[-1]["top1"]

        # the raw lines: each run of the trial reports consecutive epochs, starting right after
        # the checkpoint Tune knew when the driver died (the one before, for the spoiled two).
        # So a trial that had a checkpoint never starts again from epoch 1.
        parts = segments(rows)
        assert parts[0][0]["epoch"] == 1 and parts[-1][-1]["epoch"] == epochs, (name, rows)
        for part in parts:
            assert [r["epoch"] for r in part] == list(
                range(part[0]["epoch"], part[0]["epoch"] + len(part))
            ), (name, rows)
        for part in parts[1:]:
            j = next((j for j, r in enumerate(runs) if part[0]["pid"] in r.pids), len(runs) - 1)
            assert j >= 1, (name, "restarted within the first driver")
            had = kills[j - 1].get(name) or {"at": 0, "checkpoint": None}
            restored = had["at"] - ((name, j - 1) in planted_at)
            assert part[0]["epoch"] == restored + 1, (name, j, had, [(r["epoch"], r["pid"]) for r in rows])
            if had["checkpoint"]:
                assert part[0]["epoch"] > 1, (name, "started again from scratch although it had a checkpoint")
        assert sum(r["epoch"] == 1 for r in rows) == 1, (name, rows)


# ----------------------------------------------------------------------------- 2. worker, NaN, full disk, SIGTERM
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(sweep) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every socket this driver's Ray listens on."""
    pids = {p.pid: _name(p) for p in sweep.ray_processes()} | {sweep.proc.pid: "driver"}
    return [
        (pids[c.pid], c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def test_worker_killed_nan_full_disk_and_sigterm_then_resume(tmp_path):
    space = write_space(
        tmp_path,
        "faults",
        [
            W4,  # 001: its worker is SIGKILLed mid-epoch
            W2,  # 002: the disk is full under its 2nd checkpoint
            "{w_bits: null, a_bits: null, lr: 1.0e+12}",  # 003: diverges
            "{w_bits: 8, a_bits: 8, epochs: 4}",  # 004: a longer one
        ],
        epochs=3,
    )
    experiment = tmp_path / "runs" / "faults"
    killed, full, diverged, long = (
        experiment / n for n in ("001_W4A4_w8a8", "002_W2A2_w8a8", "003_FP32", "004_W8A8_w8a8")
    )
    # a full disk where 002's second checkpoint goes: every write there fails with ENOSPC
    (full / "checkpoint_000001").mkdir(parents=True)
    (full / "checkpoint_000001" / "checkpoint.pt").symlink_to("/dev/full")

    run = Sweep(tmp_path, [space], "first.log")
    # 001 reported epoch 1 (and checkpointed it): kill its worker at once, in epoch 2
    first = run.until(
        lambda: next((r for r in raw_rows(killed) if r.get("epoch") == 1), None), "epoch 1 of 001"
    )
    os.kill(first["pid"], signal.SIGKILL)

    # the local Ray listens on loopback only, and no dashboard
    sockets = listening(run)
    assert {"gcs_server", "raylet"} <= {n for n, _, _ in sockets}, sockets  # the check does see Ray's servers
    assert all(ip in LOOPBACK for _, ip, _ in sockets), sockets
    assert not [s for s in sockets if s[2] == 8265], sockets  # no dashboard HTTP

    def under_way():
        """001 is back in a new worker, and some trial is mid-way with a checkpoint."""
        return len(segments(raw_rows(killed))) == 2 and [
            f for f, s in snapshot(experiment).items() if s["status"] == "RUNNING" and s["checkpoint"]
        ]

    run.until(under_way, "001 retried in a new worker", timeout=300)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 130, run.output()[-5000:]
    out = run.output()
    ending = out[out.index("stopping: Tune saves the sweep's state") :]  # the sweep's line, not Tune's two
    assert "Traceback" not in RAY_SIGTERM_NOISE.sub("", ending) and "Tuner.restore" not in ending, ending
    # a partial report, and the command that resumes
    command = ending.split("The sweep was interrupted. Resume it with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("python ") and command.endswith(" --resume"), command
    partial = pd.read_csv(tmp_path / "reports" / "faults" / "results.csv").set_index("trial_name")
    stopped = snapshot(experiment)  # Tune's state, saved on the way out
    interrupted = [f for f, s in stopped.items() if s["status"] not in ("TERMINATED", "ERROR")]
    assert [f for f in interrupted if stopped[f]["checkpoint"]], stopped
    # a trial that reported its last epoch just as SIGTERM came is done, though Tune's last snapshot
    # may still call it running: the report says TERMINATED (its own results come first), and the
    # resume has nothing left to run for it
    finished = [f for f in interrupted if partial.loc[f, "status"] == "TERMINATED"]
    for f in finished:
        assert partial.loc[f, "epochs_done"] == partial.loc[f, "epochs"], (f, stopped[f])
    interrupted = [f for f in interrupted if f not in finished]
    for f in interrupted:  # the report and the saved state agree on where each one stopped
        assert (
            partial.loc[f, "status"] in ("INTERRUPTED", "PENDING")
            and partial.loc[f, "epochs_done"] == stopped[f]["epoch"]
        )
        assert stopped[f]["checkpoint"] is None or stopped[f]["checkpoint"] in checkpoints_on_disk(
            experiment / f
        )

    resumed = Sweep(tmp_path, [], "resume.log", cmd=[sys.executable, *command.split()[1:]])
    assert resumed.wait() == 1, resumed.output()[-5000:]  # 1: a trial errored (the full disk)
    results = pd.read_csv(tmp_path / "reports" / "faults" / "results.csv").set_index("trial_name")
    assert dict(results["status"]) == {
        killed.name: "TERMINATED",
        full.name: "ERROR",
        diverged.name: "FAILED",
        long.name: "TERMINATED",
    }
    assert results.loc[long.name, "epochs_done"] == 4 and results.loc[killed.name, "epochs_done"] == 3
    # each interrupted trial went on from where SIGTERM stopped it
    # (or from scratch, with a fresh history, if its only checkpoint came in while Tune stopped)
    for f in set(interrupted) - {full.name}:  # (002 never gets past epoch 1: below)
        rows = raw_rows(experiment / f)
        assert segments(rows)[-1][0]["epoch"] == stopped[f]["at"] + 1, (f, stopped[f], rows)
        assert sorted({r["epoch"] for r in rows}) == list(range(1, results.loc[f, "epochs"] + 1)), (f, rows)

    # 001: retried from its last checkpoint by a new worker while the sweep went on
    parts = segments(raw_rows(killed))
    assert parts[0][-1]["pid"] == first["pid"] != parts[1][0]["pid"], parts
    assert parts[1][0]["epoch"] == parts[0][-1]["epoch"] + 1 and parts[-1][-1]["epoch"] == 3, parts
    assert "Failure # 1" in (killed / "error.txt").read_text()
    # 002: failed with the reason; every attempt went on from epoch 1's checkpoint, never from
    # the half-written one, which no report points at
    error = results.loc[full.name, "error"]
    assert "CheckpointError: epoch 2: could not write the checkpoint to the sweep's storage" in error, error
    assert "No space left on device" in error and re.search(r"\(\d failures?\)$", error), error
    assert results.loc[full.name, "epochs_done"] == 1
    assert Path(results.loc[full.name, "checkpoint"]).name == "checkpoint_000000"
    if full.name not in interrupted:  # it had failed for good before SIGTERM: so said the partial report
        assert partial.loc[full.name, "status"] == "ERROR" and partial.loc[full.name, "error"].startswith(
            error[:100]
        )
        assert Path(partial.loc[full.name, "checkpoint"]).name == "checkpoint_000000"
    assert [r["epoch"] for r in raw_rows(full)] == [1]
    # (each attempt failed writing epoch 2: it had restored epoch 1; the resume tried again)
    assert set(re.findall(r"CheckpointError: epoch (\d+): could not write", out + resumed.output())) == {"2"}
    assert "CheckpointError: epoch 2" in resumed.output()
    assert "skipping checkpoint" not in resumed.worker_logs()
    # 003: the diverging trial stopped at once, was never retried, and is FAILED with its reason
    assert results.loc[diverged.name, "error"] == "training loss became nan in epoch 1"
    assert [r.get("failed_reason") for r in raw_rows(diverged)] == ["training loss became nan in epoch 1"]
    assert not (diverged / "error.txt").exists()


# ----------------------------------------------------------------------------- 3. a node lost
# Two local nodes of one cluster, on loopback, with token authentication: a process of its own,
# so this module's process never holds Ray state. One line in: remove the worker node; another: stop.
CLUSTER = r"""
import json, sys
from ray.cluster_utils import Cluster
fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                        "node_ip_address": "127.0.0.1", "_system_config": fast})
worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
cluster.wait_for_nodes()
raylet = lambda node: node.all_processes["raylet"][0].process.pid
print(json.dumps({"address": cluster.address, "head": raylet(cluster.head_node), "worker": raylet(worker)}), flush=True)
sys.stdin.readline()
cluster.remove_node(worker, allow_graceful=False)
print("removed", flush=True)
sys.stdin.readline()
cluster.shutdown()
"""


def test_node_lost_mid_trial_trials_finish_on_the_other_node(tmp_path):
    epochs = 2  # the lost trial: epoch 1 on the worker node, then epoch 2 on the head
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
    cluster = subprocess.Popen(
        [sys.executable, "-c", CLUSTER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **auth},
    )
    try:
        info = json.loads(cluster.stdout.readline())
        assert info["address"].startswith("127.0.0.1:"), info
        space = write_space(tmp_path, "lost", [W4, W2], epochs=epochs)
        experiment = tmp_path / "runs" / "lost"
        cmd = [
            sys.executable,
            str(ROOT / "sweep.py"),
            space,
            "--address",
            info["address"],
            "--storage",
            str(tmp_path / "runs"),
            "--reports",
            str(tmp_path / "reports"),
        ]
        run = Sweep(
            tmp_path, [], "sweep.log", cmd=cmd, env=auth
        )  # the cluster's token, as a user's shell has it
        node = {}  # trial worker pid -> "head" / "worker": the node whose raylet started it

        def seen():
            for d in trial_dirs(experiment) if experiment.exists() else []:
                for r in raw_rows(d):
                    if r["pid"] not in node:
                        try:
                            parents = {p.pid for p in psutil.Process(r["pid"]).parents()}
                        except psutil.NoSuchProcess:
                            parents = set()
                        node[r["pid"]] = (
                            "head"
                            if info["head"] in parents
                            else "worker"
                            if info["worker"] in parents
                            else "?"
                        )
            return node

        # one trial runs on each node; when the worker node's trial has a checkpoint, the node goes
        lost = run.until(
            lambda: next(
                (
                    d
                    for d in (trial_dirs(experiment) if experiment.exists() else [])
                    if any(seen().get(r["pid"]) == "worker" for r in raw_rows(d))
                ),
                None,
            ),
            "a checkpoint of the trial on the worker node",
        )
        cluster.stdin.write("remove\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == "removed"
        removed_at = time.time()
        while run.proc.poll() is None:
            seen()
            time.sleep(0.1)
        assert run.wait() == 0, run.output()[-5000:]
        print(f"node lost: the sweep finished {time.time() - removed_at:.1f} s later")
    finally:
        if cluster.poll() is None:
            cluster.stdin.write("stop\n")
            cluster.stdin.flush()
            cluster.wait(timeout=60)

    results = pd.read_csv(tmp_path / "reports" / "lost" / "results.csv")
    assert set(results["status"]) == {"TERMINATED"} and set(results["epochs_done"]) == {epochs}, results
    parts = segments(raw_rows(lost))
    assert len(parts) == 2, parts
    assert {node[r["pid"]] for r in parts[0]} == {"worker"} and {node[r["pid"]] for r in parts[1]} == {
        "head"
    }, node
    # it went on from its last checkpoint, on the head node
    assert parts[1][0]["epoch"] == parts[0][-1]["epoch"] + 1 and parts[1][-1]["epoch"] == epochs, parts
    assert "Failure # 1" in (lost / "error.txt").read_text()
