"""One CIFAR-10 epoch with the whole trainer (lsq/train.py) on the real images, and the share of
it that the small-data path (augmenting and batching on the device) takes.

    python bench/epoch.py --batches 50                 # CPU: 50 batches, extrapolated to the epoch
    python bench/epoch.py --device cuda --batches 0    # the full epoch (390 batches)
    python bench/epoch.py --batches 50 --warmup-batches 5 --compile default   # the trainer's compile option

The images come from the archive ../shared/data/cifar10-jpg.tar.gz (or $CIFAR_TGZ, or
--archive), unpacked once to --data-dir (default /tmp/lsq-cifar10) and reused. Without the
archive it says so and exits 0.

Timed, alternately, after a warm-up (which absorbs torch.compile, cudnn autotuning and the
quantizer's fast-path build):
  data path   iterating the training DeviceLoader alone: shuffle, random crop + flip, uint8 ->
              normalized float, labels
  train       Trainer.train_one_epoch over the same batches (it includes the data path)
  eval        Trainer.evaluate over the test set (or --eval-batches of it)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from _common import CIFAR_ARCHIVE, median, pick_device, record, sync, table, unpack_cifar  # noqa: I001

from lsq.config import TrialConfig
from lsq.train import Trainer


class FirstBatches:
    """The first n batches of a loader (all of them for n = 0)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, (n or len(loader))

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bits", default="4", help="body bits (w = a), or 'fp32'")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=50, help="training batches timed (0: the whole epoch)")
    p.add_argument("--eval-batches", type=int, default=0, help="test batches timed (0: the whole test set)")
    p.add_argument("--warmup-batches", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating data/train/eval rounds (medians)")
    p.add_argument(
        "--compile",
        default="none",
        choices=["none", "default", "reduce-overhead"],
        help="the trainer's compile option (TrialConfig.compile)",
    )
    p.add_argument("--archive", default=os.environ.get("CIFAR_TGZ") or CIFAR_ARCHIVE)
    p.add_argument("--data-dir", default=os.path.join("/tmp", "lsq-cifar10"))
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    if not unpack_cifar(args.archive, args.data_dir):
        print(
            f"skipped: no CIFAR-10 archive at {os.path.abspath(args.archive)} (set CIFAR_TGZ or --archive) "
            f"and no unpacked copy in {args.data_dir}",
            flush=True,
        )
        return 0
    bits = None if args.bits == "fp32" else int(args.bits)
    cfg = TrialConfig.from_dict(
        {
            "model": args.model,
            "dataset": "cifar10",
            "data_dir": args.data_dir,
            "w_bits": bits,
            "a_bits": bits,
            "epochs": 1,
            "batch_size": args.batch_size,
            "device": device.type,
            "compile": args.compile,
        }
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    train_loader, test_loader = trainer.data.train, trainer.data.test
    n_train, n_test = len(train_loader), len(test_loader)

    t0 = time.perf_counter()  # warm-up: compile, autotune, fast-path build, allocator
    trainer.data.train = FirstBatches(train_loader, args.warmup_batches)
    trainer.train_one_epoch()
    trainer.data.test = (
        test_loader if args.compile != "none" else FirstBatches(test_loader, 1)
    )  # compile: both test batch sizes
    trainer.evaluate()
    sync(device)
    warmup_s = time.perf_counter() - t0

    def data_only():
        for images, labels in FirstBatches(train_loader, args.batches):
            pass
        sync(device)

    trainer.data.train = FirstBatches(train_loader, args.batches)
    trainer.data.test = FirstBatches(test_loader, args.eval_batches)
    nb, ne = len(trainer.data.train), len(trainer.data.test)
    times, last = {"data": [], "train": [], "eval": []}, {}
    for _ in range(args.rounds):
        times["data"].append(timed(data_only, device))
        times["train"].append(timed(trainer.train_one_epoch, device))
        times["eval"].append(timed(lambda: last.update(trainer.evaluate()), device))
    data, train, ev = (median(times[k]) for k in ("data", "train", "eval"))
    train_epoch, eval_epoch = train / nb * n_train, ev / ne * n_test
    extrapolated = nb < n_train or ne < n_test

    label = f"{cfg.label()} {args.model}" + (f" compile={args.compile}" if args.compile != "none" else "")
    rows = [
        {
            "part": f"data path alone ({nb} batches)",
            "seconds": f"{data:.3f}",
            "ms / batch": f"{data / nb * 1e3:.2f}",
        },
        {
            "part": f"train_one_epoch ({nb} batches)",
            "seconds": f"{train:.3f}",
            "ms / batch": f"{train / nb * 1e3:.2f}",
        },
        {
            "part": f"evaluate ({ne} of {n_test} batches)",
            "seconds": f"{ev:.3f}",
            "ms / batch": f"{ev / ne * 1e3:.2f}",
        },
        {
            "part": f"train epoch ({n_train} batches){', extrapolated' if nb < n_train else ''}",
            "seconds": f"{train_epoch:.2f}",
            "ms / batch": "",
        },
        {
            "part": f"epoch incl. evaluation{', extrapolated' if extrapolated else ''}",
            "seconds": f"{train_epoch + eval_epoch:.2f}",
            "ms / batch": "",
        },
        {
            "part": "**data path share of training** (target < 5 %)",
            "seconds": f"**{100 * data / train:.1f} %**",
            "ms / batch": "",
        },
    ]
    body = (
        f"{label} on CIFAR-10 ({trainer.data.train_size} training images), batch {args.batch_size}; "
        f"medians of {args.rounds} alternating rounds. Set-up (data load/decode, model) {setup_s:.1f} s; "
        f"warm-up ({args.warmup_batches} batches + evaluation: compile/autotune) {warmup_s:.1f} s. "
        f"Test top-1 after the timed rounds (a check that they trained): {last['top1']:.2f} % "
        f"on {ne} test batches.\n\n" + table(rows)
    )
    record(f"CIFAR-10 epoch with the trainer ({device.type})", device, body, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
