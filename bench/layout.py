"""Memory layout: one training step in NCHW (contiguous) against NHWC (channels_last), per model
and bit width, in one process, interleaved. It decides the layout the trainer runs in
(`lsq.train.uses_channels_last`), which the last column shows.

    python bench/layout.py                                   # CPU: resnet20 b128 32x32 and 16x16, resnet18 b32 64x64
    python bench/layout.py --models resnet20:128:32 --configs fp32,w4a4 --threads 1

The step is bench/train_step.py's (the trainer's: cross-entropy, backward, SGD with momentum).
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, median, ms, paired_ratio, pick_device, record, table  # noqa: I001
from train_step import BITS, Setup, batch, config_bits, parse_specs

from lsq.train import uses_channels_last


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--models",
        default="resnet20:128:32,resnet20:128:16,resnet18:32:64",
        help="comma-separated model:batch:image_size (16x16: the embedded digits' size)",
    )
    p.add_argument("--configs", default="fp32,w4a4", help=f"from {', '.join(BITS)}")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds")
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    specs, configs = parse_specs(p, args.models, args.configs)

    rows = []
    for model_name, n, size in specs:
        x, y = batch(model_name, n, size, device)
        xs = {"NCHW": x.contiguous(), "NHWC": x.contiguous(memory_format=torch.channels_last)}
        setups = {}
        for c in configs:
            for layout, xl in xs.items():
                setups[f"{c} {layout}"] = Setup(
                    c, model_name, config_bits(c), xl, y, device, channels_last=layout == "NHWC"
                )
        for s in setups.values():  # warm-up outside the timed rounds
            s.step()
        runs = interleaved({k: s.step for k, s in setups.items()}, args.rounds, 2, device)
        for c in configs:
            rows.append(
                {
                    "model": f"{model_name} b{n} {size}x{size}",
                    "config": c,
                    "NCHW ms": ms(median(runs[f"{c} NCHW"])),
                    "NHWC ms": ms(median(runs[f"{c} NHWC"])),
                    "NHWC / NCHW": f"{paired_ratio(runs, f'{c} NHWC', f'{c} NCHW'):.2f}",
                    "trainer runs": "NHWC" if uses_channels_last(device, model_name) else "NCHW",
                }
            )
            print(rows[-1], flush=True)
        del setups

    body = (
        f"{args.threads} threads. Medians of {args.rounds} interleaved rounds; NHWC / NCHW is the median of "
        "per-round ratios (below 1: channels_last is faster).\n\n" + table(rows)
    )
    record(f"Memory layout of a training step ({device.type})", device, body, append=not args.no_append)


if __name__ == "__main__":
    main()
