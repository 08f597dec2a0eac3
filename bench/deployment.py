"""The deployment check's integer reference path (lsq/export.py): its exact integer convolutions
as fp32 matrix products (where every partial sum fits 2^24) against float64 ones. Both run
`compare_paths` (fake-quant model, integer path) on the same images, interleaved, and must give
the same figures.

    python bench/deployment.py                    # resnet20 W4A4, 1000 CIFAR-sized images, 2 threads
    python bench/deployment.py --images 500 --bits 8
"""

from __future__ import annotations

import argparse

import torch
from _common import interleaved, median, paired_ratio, pick_device, record, table  # noqa: I001

from lsq.export import DeployLayer, compare_paths
from lsq.models import build_model
from lsq.policy import BitPolicy, init_steps, quantize_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--images", type=int, default=1000, help="random 32x32 images, in batches of 500 (the trainer's)"
    )
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="body bits (first/last: 8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = p.parse_args()
    if args.images < 1 or args.rounds < 1:
        p.error("--images and --rounds: at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    quantize_model(model, BitPolicy(args.bits, args.bits, "w8a8", "w8a8"))
    x = torch.randn(args.images, 3, 32, 32)
    init_steps(model, x[:128])
    model.eval()
    loader = [(x[i : i + 500], torch.randint(0, 10, (len(x[i : i + 500]),))) for i in range(0, len(x), 500)]

    figures = {}
    original = DeployLayer.gemm

    def float64_gemm(self, x, w, dtype):  # every layer's products in float64
        return original(self, x, w, torch.float64)

    def run(name, gemm):
        def fn():
            DeployLayer.gemm = gemm
            try:
                figures[name] = compare_paths(model, loader)
            finally:
                DeployLayer.gemm = original

        return fn

    runs = interleaved(
        {
            "fp32 products": run("fp32 products", original),
            "float64 products": run("float64 products", float64_gemm),
        },
        args.rounds,
        0,
        torch.device("cpu"),
    )
    same = all(
        figures["fp32 products"][k] == figures["float64 products"][k]
        for k in ("int_top1", "int_agreement", "int_max_abs_acc")
    )
    t = {k: median(v) for k, v in runs.items()}
    rows = [
        {
            "integer path": k,
            "compare_paths (s)": f"{v:.2f}",
            "per 10,000 images (s)": f"{v * 10000 / args.images:.0f}",
            "x float64": f"{paired_ratio(runs, k, 'float64 products'):.2f}",
        }
        for k, v in t.items()
    ]
    body = (
        f"resnet20 W{args.bits}A{args.bits} (first/last w8a8), {args.images} random 32x32 images, "
        f"{args.threads} threads, medians of {args.rounds} interleaved rounds (the ratio: of per-round "
        "ratios). Integer figures identical in both "
        f"(top-1, agreement, largest accumulator): **{same}**.\n\n" + table(rows)
    )
    record("Deployment check: integer path", pick_device("cpu"), body, append=not args.no_append)
    if not same:
        raise SystemExit("the two integer paths disagree")


if __name__ == "__main__":
    main()
