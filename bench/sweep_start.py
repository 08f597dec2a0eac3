"""Sweep overhead: seconds from `python sweep.py` to the first trial's first epoch.

    python bench/sweep_start.py            # 3 runs of the smoke space, median
    python bench/sweep_start.py --runs 5

Each run starts `python sweep.py search_spaces/smoke.yaml --set epochs=1` in a fresh process
with its own storage folder, and polls that folder for the first result line a trial writes
(Tune appends it to <trial>/result.json at the end of the epoch). The sweep is then stopped
(SIGINT: its normal Ctrl-C path). The time includes Python start, imports, the private Ray's
start, Tune's set-up, the trial worker's start and imports, data and model set-up, and one
digits epoch (about 1.5 s of training on 2 cores: reported apart).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from _common import ROOT, median, pick_device, record, table  # noqa: I001


def first_epoch_seconds(timeout: float = 120.0) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as storage:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "sweep.py"), "search_spaces/smoke.yaml",
                                 "--set", "epochs=1", "--storage", storage, "--reports", os.path.join(storage, "reports")],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while time.perf_counter() - t0 < timeout:
                for path in glob.glob(os.path.join(storage, "*", "*", "result.json")):
                    with open(path) as f:
                        line = f.readline()
                    if line.endswith("\n"):
                        elapsed = time.perf_counter() - t0
                        epoch = json.loads(line).get("epoch_seconds")
                        return elapsed, epoch
                if proc.poll() is not None:
                    raise RuntimeError(f"sweep.py exited with {proc.returncode} before any epoch finished")
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
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        total, epoch = first_epoch_seconds()
        runs.append((total, epoch))
        print(f"run {i + 1}: first epoch done {total:.1f} s after start (the epoch itself {epoch:.1f} s)", flush=True)
    total, epoch = median([r[0] for r in runs]), median([r[1] for r in runs])
    rows = [{"measure": "`python sweep.py` to the first trial's first epoch", "seconds": f"{total:.1f}"},
            {"measure": "of which the epoch itself (digits, resnet20 W4A4)", "seconds": f"{epoch:.1f}"},
            {"measure": "overhead before the epoch (target: the total <= 10 s)", "seconds": f"{total - epoch:.1f}"}]
    body = f"Medians of {args.runs} runs of search_spaces/smoke.yaml --set epochs=1, each a fresh process.\n\n" + table(rows)
    record("Sweep start to first epoch", pick_device("cpu"), body, append=not args.no_append)


if __name__ == "__main__":
    main()
