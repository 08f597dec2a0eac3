"""Sweep overhead: seconds from `python sweep.py` to the first trial's first epoch.

    python bench/sweep_start.py            # 3 runs of the default sweep, median
    python bench/sweep_start.py --runs 5
    python bench/sweep_start.py --baseline /tmp/base   # against another checkout, interleaved

Each run starts `python sweep.py` (the default sweep, search_spaces/smoke.yaml) in a fresh
process with its own storage and reports folders, and polls that folder for the first result line
a trial writes (Tune appends it to <trial>/result.json at the end of the epoch). Until
2026-11-27 the runs added `--set epochs=1`, so that first epoch was also the last and its report
waited for the deployment check (ONNX export, integer inference) too. The sweep is then stopped
(SIGINT: its normal Ctrl-C path). The time includes Python start, imports, the private Ray's
start, Tune's set-up, the trial worker's start and imports, data and model set-up, and one
digits epoch (1-4 s on 2 cores, reported apart) of whichever trial reports first.

On Linux the runs also add up the CPU-seconds (user + system) of the sweep's whole process tree
(the driver, Ray's processes, the trial workers) up to the first result, read from /proc. Divided
by the cores, that is the least wall time the same work could take however well it overlapped.

With --baseline PATH (another checkout, e.g. `git worktree add /tmp/base HEAD~1`), each round
runs both checkouts in a shuffled order with the same Python, and the table gives both
medians and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from _common import ROOT, median, pick_device, record, table  # noqa: I001

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_seconds(root_pid: int, seen: dict) -> None:
    """Record in `seen` (pid -> CPU-seconds) the user + system time of root_pid and of every
    process below it, from /proc. A process's time only grows, so the latest reading is kept;
    one that has exited keeps its last. Nothing is recorded where /proc is missing (not Linux)."""
    parent, cpu = {}, {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    children = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    todo = [root_pid] if root_pid in cpu else []
    while todo:
        pid = todo.pop()
        seen[pid] = max(seen.get(pid, 0.0), cpu[pid])
        todo += children[pid]


def first_epoch_seconds(root: str = ROOT, timeout: float = 120.0) -> tuple[float, float | None, float | None]:
    """(seconds to the first result, that epoch's own seconds, CPU-seconds used up to it or None)."""
    with tempfile.TemporaryDirectory() as storage:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(root, "sweep.py"),
                "--storage",
                storage,
                "--reports",
                os.path.join(storage, "reports"),
            ],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        cpu, polls = {}, 0
        try:
            while time.perf_counter() - t0 < timeout:
                for path in glob.glob(os.path.join(storage, "*", "*", "result.json")):
                    with open(path) as f:
                        line = f.readline()
                    if line.endswith("\n"):
                        elapsed = time.perf_counter() - t0
                        tree_cpu_seconds(proc.pid, cpu)
                        epoch = json.loads(line).get("epoch_seconds")
                        return elapsed, epoch, (sum(cpu.values()) if cpu else None)
                if proc.poll() is not None:
                    raise RuntimeError(f"sweep.py exited with {proc.returncode} before any epoch finished")
                if polls % 5 == 0:  # every 0.25 s: catches the processes that come and go
                    tree_cpu_seconds(proc.pid, cpu)
                polls += 1
                time.sleep(0.05)
            raise RuntimeError(f"no epoch finished within {timeout:.0f} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--baseline", metavar="PATH", help="another checkout to run interleaved with this one")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs {args.runs}: at least 1")
    roots = {"this checkout": ROOT}
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "sweep.py")):
            p.error(f"--baseline {args.baseline}: no sweep.py there (allowed: a checkout of this project)")
        roots["baseline"] = os.path.abspath(args.baseline)
    runs = {name: [] for name in roots}
    for i in range(args.runs):
        for name in random.sample(list(roots), len(roots)):
            total, epoch, cpu = first_epoch_seconds(roots[name])
            runs[name].append((total, epoch, cpu))
            used = f", {cpu:.1f} CPU-s used by then" if cpu is not None else ""
            print(
                f"run {i + 1}, {name}: first epoch done {total:.1f} s after start (the epoch itself {epoch:.1f} s{used})",
                flush=True,
            )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for name, rs in runs.items():
        total, epoch = median([r[0] for r in rs]), median([r[1] for r in rs])
        row = {
            "checkout": name,
            "to the first epoch (s)": f"{total:.1f}",
            "the epoch itself (s)": f"{epoch:.1f}",
            "overhead before it (s)": f"{total - epoch:.1f}",
        }
        if all(r[2] is not None for r in rs):
            cpu = median([r[2] for r in rs])
            row["CPU-s used by then"] = f"{cpu:.1f}"
            row[f"CPU-s / {cores} cores (s)"] = f"{cpu / cores:.1f}"
        rows.append(row)
    if args.baseline:
        ratio = median([a[0] / b[0] for a, b in zip(runs["this checkout"], runs["baseline"])])
        rows.append(
            {
                "checkout": "this / baseline (median of per-round ratios)",
                "to the first epoch (s)": f"{ratio:.2f}x",
            }
        )
    where = f" against {args.baseline} ({_describe(roots['baseline'])}), interleaved" if args.baseline else ""
    body = (
        f"Medians of {args.runs} runs of `python sweep.py` (search_spaces/smoke.yaml), each a fresh process{where}; "
        f"this checkout is {_describe(ROOT)}. Target: `python sweep.py` to the first trial's first epoch <= 10 s. "
        f"CPU-s: user + system time of the sweep's process tree up to the first result; divided by the {cores} "
        "cores, the least wall time that work could take.\n\n"
        + table(rows, cols=list(dict.fromkeys(k for r in rows for k in r)))
    )
    record("Sweep start to first epoch", pick_device("cpu"), body, append=not args.no_append)


def _describe(root: str) -> str:
    """The checkout's commit, for the record."""
    try:
        out = subprocess.run(
            ["git", "-C", root, "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=10
        )
        line = out.stdout.strip()
        return (line if len(line) <= 70 else line[:69] + "…") or "not a git checkout"
    except (OSError, subprocess.TimeoutExpired):
        return "not a git checkout"


if __name__ == "__main__":
    main()
