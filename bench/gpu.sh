#!/usr/bin/env bash
# Every CUDA benchmark in one go, in under 8 minutes on one H100 (each part has a time budget).
#
#   bash bench/gpu.sh                  # on the GPU box, from anywhere; needs only PyTorch (no Ray)
#   bash bench/gpu.sh --device cpu     # a dry run of the same code paths on tiny sizes (no CUDA needed)
#
# Environment:
#   CIFAR_TGZ  the CIFAR-10 JPEG archive (default ../shared/data/cifar10-jpg.tar.gz, relative to
#              the repository root); without it the epoch part is skipped with a message
#   OUT        if set, every table is also appended to $OUT/RESULTS.md (bench/RESULTS.md style)
#   PYTHON     the interpreter (default: python3)
#
# Parts, each with a time budget (together 480 s): (1) a FP32 resnet20 CIFAR-10 epoch (also unpacks
# and decodes the images); (2) the same epoch W4A4 under compile=reduce-overhead (target: <= 2 s);
# (3) the correctness check of compiled training: 3 epochs of the trainer, eager and compiled, on
# CIFAR-10 (train loss and top-1 should track each other; the trainer also checks its first
# compiled step against eager and says so); (4) resnet18 b128 224x224 training steps, FP32 and
# W4A4, eager and torch.compile (target: W4A4 <= 1.25x FP32); (5) the quantizer per call, with
# the options explored, among them two Triton kernels (bench/_triton_lsq.py, checked first).
# Tables go to stdout and bench/RESULTS.md (and $OUT); part (3) prints its epochs only.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; fi
export CIFAR_TGZ=${CIFAR_TGZ:-../shared/data/cifar10-jpg.tar.gz}
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
start=$SECONDS

part() {  # part SECONDS command...: run with a time budget; a failure or time-out does not stop the rest
    local budget=$1; shift
    echo; echo "=== [$((SECONDS - start)) s] $* (budget ${budget} s)"
    timeout --kill-after=10 "$budget" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!!! timed out after ${budget} s: $*"
    elif [ $rc -ne 0 ]; then echo "!!! exit $rc: $*"; fi
}

"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
EOF

if [ "$DEVICE" = "cpu" ]; then  # dry run: every code path, tiny sizes, nothing appended to RESULTS.md
    part 300 "$PY" bench/quantizer.py --device cpu --shapes 1,3 --rounds 2 --no-append
    part 120 "$PY" bench/_triton_lsq.py  # Triton's interpreter on the CPU
    part 300 "$PY" bench/epoch.py --device cpu --bits fp32 --batches 3 --eval-batches 1 --warmup-batches 1 --rounds 1 --no-append
    part 600 "$PY" bench/epoch.py --device cpu --batches 3 --eval-batches 1 --warmup-batches 2 --rounds 1 \
        --compile default --no-append
    for mode in none default; do
        part 300 "$PY" -m lsq.train --dataset digits --model resnet20 --bit 4 --epochs 2 --lr 0.1 --seed 1 --compile "$mode"
    done
    part 600 "$PY" bench/train_step.py --device cpu --models resnet18:2:64 --configs fp32,w4a4 \
        --compile fp32,w4a4 --rounds 1 --no-append
    part 600 "$PY" bench/train_step.py --device cpu --models resnet20:8:32 --configs fp32,w4a4 \
        --compile fp32,w4a4 --compile-mode reduce-overhead --rounds 1 --no-append
else
    DATA=/tmp/lsq-cifar10  # bench/epoch.py's default: unpacked and decoded there by part (1)
    part 70 "$PY" bench/epoch.py --device cuda --bits fp32 --batch-size 256 --batches 0 --rounds 1
    part 100 "$PY" bench/epoch.py --device cuda --batch-size 256 --batches 0 --rounds 3 --compile reduce-overhead
    for mode in none:50 reduce-overhead:70; do  # the compiled run reuses part (2)'s inductor cache
        part "${mode#*:}" "$PY" -m lsq.train --dataset cifar10 --data_dir "$DATA" --model resnet20 --bit 4 --epochs 3 \
            --lr 0.1 --batch_size 256 --seed 1 --compile "${mode%:*}"
    done
    part 100 "$PY" bench/train_step.py --device cuda --models resnet18:128:224 --configs fp32,w4a4 \
        --compile fp32,w4a4 --rounds 8
    part 20 "$PY" bench/_triton_lsq.py  # the Triton option against the paper's formulas, on the GPU
    part 70 "$PY" bench/quantizer.py --device cuda --options
fi
echo; echo "=== all parts done in $((SECONDS - start)) s"
