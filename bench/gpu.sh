#!/usr/bin/env bash
# Every CUDA benchmark in one go, in under 10 minutes on one H100 (each part has a time budget).
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
# Parts: full resnet20 CIFAR-10 epochs with the data on the GPU, batch 256, FP32 and W4A4 eager;
# resnet18 b128 224x224 and resnet20 b256 training steps, FP32 and W4A4, eager and torch.compile
# (speed only: see bench/RESULTS.md on compiled training with CUDA); the quantizer per call.
# Tables go to stdout and bench/RESULTS.md (and $OUT).
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
    part 300 "$PY" bench/epoch.py --device cpu --bits fp32 --batches 3 --eval-batches 1 --warmup-batches 1 --rounds 1 --no-append
    part 600 "$PY" bench/epoch.py --device cpu --batches 3 --eval-batches 1 --warmup-batches 2 --rounds 1 \
        --compile default --no-append
    part 600 "$PY" bench/train_step.py --device cpu --models resnet18:2:64 --configs fp32,w4a4 \
        --compile fp32,w4a4 --rounds 1 --memory-rounds 1 --no-append
    part 600 "$PY" bench/train_step.py --device cpu --models resnet20:8:32 --configs fp32,w4a4 \
        --compile fp32,w4a4 --compile-mode reduce-overhead --rounds 1 --memory-rounds 1 --no-append
else
    # (1) resnet20 CIFAR-10 epochs, data on the GPU, batch 256 (the GPU protocol's): FP32 and W4A4
    # eager. The first part also unpacks and decodes the images (cached for the second).
    part 90 "$PY" bench/epoch.py --device cuda --bits fp32 --batch-size 256 --batches 0 --rounds 2
    part 60 "$PY" bench/epoch.py --device cuda --batch-size 256 --batches 0 --rounds 2
    # (2) resnet18 b128 224x224 training step: FP32 and W4A4, eager and torch.compile (default).
    # The compiled figures are speed only: the trainer refuses compile on CUDA, because compiled
    # LSQ training was measured to go wrong there (bench/RESULTS.md).
    part 170 "$PY" bench/train_step.py --device cuda --models resnet18:128:224 --configs fp32,w4a4 \
        --compile fp32,w4a4 --rounds 15
    # (3) resnet20 b256 training step, FP32 and W4A4, eager and under reduce-overhead (speed only)
    part 150 "$PY" bench/train_step.py --device cuda --models resnet20:256:32 --configs fp32,w4a4 \
        --compile fp32,w4a4 --compile-mode reduce-overhead --rounds 15
    # (4) the quantizer per call, with the options explored
    part 70 "$PY" bench/quantizer.py --device cuda --options
fi
echo; echo "=== all parts done in $((SECONDS - start)) s"
