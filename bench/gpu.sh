#!/usr/bin/env bash
# Every CUDA benchmark in one go, in under 6 minutes on one H100 (each part has a time budget).
#
#   bash bench/gpu.sh                  # on the GPU box, from anywhere; needs only PyTorch (no Ray)
#   bash bench/gpu.sh --device cpu     # a dry run of the same code paths on tiny sizes (no CUDA needed)
#
# Environment:
#   CIFAR_TGZ  the CIFAR-10 JPEG archive (default ../shared/data/cifar10-jpg.tar.gz, relative to
#              the repository root); without it the epoch part is skipped with a message
#   OUT        if set, every table is also appended to $OUT/RESULTS.md (bench/RESULTS.md style)
#   PYTHON     the interpreter (default: python3)
#   R18_COMPILE=1  also time resnet18 under torch.compile (adds about 2 minutes of compiling)
#
# Parts: (1) quantizer fwd+bwd per call, incl. the eager path and the options explored;
# (2) training step FP32/W8A8/W4A4/W2A2 for resnet20 (b128, 32x32, eager and torch.compile)
# and resnet18 (b128, 224x224); (3) a full resnet20 W4A4 CIFAR-10 epoch with the data on the
# GPU, eager and under torch.compile. Tables go to stdout and bench/RESULTS.md (and $OUT).
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
    part 300 "$PY" bench/quantizer.py --device cpu --shapes 1,3 --rounds 2 --options --no-append
    part 600 "$PY" bench/train_step.py --device cpu --models resnet20:8:32 --configs fp32,w4a4 \
        --compile fp32,w4a4 --rounds 2 --memory-rounds 1 --no-append
    part 120 "$PY" bench/train_step.py --device cpu --models resnet18:2:64 --rounds 1 --memory-rounds 1 --no-append
    part 300 "$PY" bench/epoch.py --device cpu --batches 3 --eval-batches 1 --warmup-batches 1 --rounds 1 --no-append
    part 600 "$PY" bench/epoch.py --device cpu --batches 3 --eval-batches 1 --warmup-batches 1 --rounds 1 \
        --compile --no-append
else
    part 70 "$PY" bench/quantizer.py --device cuda --options
    part 110 "$PY" bench/train_step.py --device cuda --models resnet20:128:32 --compile fp32,w4a4
    if [ "${R18_COMPILE:-0}" = "1" ]; then
        part 240 "$PY" bench/train_step.py --device cuda --models resnet18:128:224 --compile fp32,w4a4
    else
        part 60 "$PY" bench/train_step.py --device cuda --models resnet18:128:224
    fi
    part 40 "$PY" bench/epoch.py --device cuda --batches 0 --rounds 2
    part 70 "$PY" bench/epoch.py --device cuda --batches 0 --rounds 2 --compile
fi
echo; echo "=== all parts done in $((SECONDS - start)) s"
