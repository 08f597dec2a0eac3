"""What every benchmark shares: interleaved timing, the machine's description, RESULTS.md.

Timings on a shared machine are noisy, so every benchmark runs its candidates side by side in
one process, round-robin (A B C A B C ...), and reports medians, and ratios as the median of
the per-round ratios (each candidate against the baseline of the same round).
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import tarfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `import lsq` from a checkout, without installing it

RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
CIFAR_ARCHIVE = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz")  # the real images


def unpack_cifar(archive: str, data_dir: str) -> bool:
    """The CIFAR-10 JPEG archive unpacked to data_dir (train/ and test/), once; False if neither
    an unpacked copy nor the archive is there."""
    if os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test")):
        return True
    if not os.path.isfile(archive):
        return False
    os.makedirs(data_dir, exist_ok=True)
    print(f"unpacking {archive} to {data_dir} ...", flush=True)
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")
    return True


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, rounds: int, warmup: int, device: torch.device, inner: int = 1) -> dict:
    """{name: [seconds per call, one per round]}: each round calls every fn `inner` times, in turn,
    in a new random order (what runs just before a candidate, e.g. one that leaves the allocator
    with freed memory or one that evicts the caches, must not always be the same)."""
    times = {name: [] for name in fns}
    order = random.Random(0)
    for r in range(warmup + rounds):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) / inner)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict, name: str, base: str) -> float:
    """Median over rounds of time[name] / time[base] within the same round: a load change
    between rounds cancels out, where a ratio of two medians would carry it."""
    return median([a / b for a, b in zip(times[name], times[base])])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = ", load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{load}"


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, device: torch.device, body: str, append: bool = True) -> None:
    """Print a section and append it to bench/RESULTS.md (and to $OUT/RESULTS.md if $OUT is set)."""
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    )
    section = (
        f"\n## {title}\n\n"
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
        f"- machine: {machine(device)}\n"
        f"- versions: torch {torch.__version__}, Python {platform.python_version()}\n"
        f"- command: `{command}`\n\n{body.strip()}\n"
    )
    print(section, flush=True)
    if not append:
        return
    targets = [RESULTS] + ([os.path.join(os.environ["OUT"], "RESULTS.md")] if os.environ.get("OUT") else [])
    for path in targets:
        with open(path, "a") as f:
            f.write(section)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"
