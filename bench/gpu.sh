#!/usr/bin/env bash
# Every CUDA benchmark in one go, in about 8 minutes on one H100 (each part has a time budget).
#
#   bash bench/gpu.sh                  # on the GPU box, from anywhere; needs only PyTorch (no Ray)
#   bash bench/gpu.sh --device cpu     # a dry run of the same code paths on tiny sizes (no CUDA needed)
#
# Environment:
#   CIFAR_TGZ  the CIFAR-10 JPEG archive (default ../shared/data/cifar10-jpg.tar.gz, relative to
#              the repository root); without it the parts that train on CIFAR-10 (2, 3, 7) are
#              skipped with a message, and do not count as failed
#   OUT        if set, every table is also appended to $OUT/RESULTS.md (bench/RESULTS.md style)
#   PYTHON     the interpreter (default: the repository's .venv/bin/python if there is one, else python3)
#
# Exit status: 0 when every part ran to its end, 1 when one failed or ran out of its time budget.
#
# Parts, each with a time budget (together 505 s), the most needed first: (1) the quantizer's
# Triton kernels (lsq/kernels_cuda.py, CUDA's fast path) against the paper's formulas; (2) a FP32
# resnet20 CIFAR-10 epoch (also unpacks and decodes the images); (3) compiled training must track
# eager: 3 epochs of the trainer, eager and compile=reduce-overhead, on CIFAR-10 (train loss and
# top-1; target 5:
# the compiled epoch <= 2 s); (4) the quantizer per call with the options explored (target 2);
# (5) resnet18 b128 224x224 training steps, FP32 and W4A4, eager and torch.compile with CUDA
# graphs, the fastest mode for both (target: W4A4 <= 1.25x FP32), and W4A4 with the image's step
# gradient taken through the first conv's input gradient (w4a4-dgrad: before lsq.layers.ImageConv);
# (6) resnet20 b128 steps with the Triton kernels and with the eager quantizer; (7) the W4A4
# epoch under compile=reduce-overhead with the data path's share.
# Tables go to stdout and bench/RESULTS.md (and $OUT); part (3) prints its epochs only.
set -u
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; fi
export CIFAR_TGZ=${CIFAR_TGZ:-../shared/data/cifar10-jpg.tar.gz}
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
start=$SECONDS
failed=0

part() {  # part SECONDS command...: run with a time budget; a failure or time-out does not stop the rest
    local budget=$1; shift
    echo; echo "=== [$((SECONDS - start)) s] $* (budget ${budget} s)"
    timeout --kill-after=10 "$budget" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "!!! timed out after ${budget} s: $*"
    elif [ $rc -ne 0 ]; then echo "!!! exit $rc: $*"; fi
    [ $rc -eq 0 ] || failed=$((failed + 1))
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
    part 600 "$PY" bench/train_step.py --device cpu --models resnet18:2:64 --configs fp32,w4a4,w4a4-dgrad \
        --compile fp32,w4a4 --rounds 1 --no-append
    part 600 "$PY" bench/train_step.py --device cpu --models resnet20:8:32 --configs fp32,w4a4 \
        --compile fp32,w4a4 --compile-mode reduce-overhead --rounds 1 --no-append
else  # most important first: what a time-out cuts off is the least needed
    DATA=/tmp/lsq-cifar10  # bench/epoch.py's default: unpacked and decoded there by part (2)
    part 25 "$PY" bench/_triton_lsq.py  # the quantizer's CUDA kernels against the paper's formulas
    part 55 "$PY" bench/epoch.py --device cuda --bits fp32 --batch-size 256 --batches 0 --rounds 1
    for mode in none:40 reduce-overhead:85; do  # compiled training must track eager
        [ -f "$CIFAR_TGZ" ] || [ -d "$DATA/train" ] || { echo; echo "=== skipped (no $CIFAR_TGZ, no $DATA): lsq.train on CIFAR-10, compile=${mode%:*}"; continue; }
        part "${mode#*:}" "$PY" -m lsq.train --dataset cifar10 --data_dir "$DATA" --model resnet20 --bit 4 --epochs 3 \
            --lr 0.1 --batch_size 256 --seed 1 --compile "${mode%:*}"
    done
    part 50 "$PY" bench/quantizer.py --device cuda --options --rounds 30
    part 130 "$PY" bench/train_step.py --device cuda --models resnet18:128:224 --configs fp32,w4a4,w4a4-dgrad \
        --compile fp32,w4a4,w4a4-dgrad --compile-mode reduce-overhead --rounds 8
    for flag in "" --eager-quantizer; do  # the Triton kernels against the eager quantizer in a whole step
        part 25 "$PY" bench/train_step.py --device cuda --models resnet20:128:32 --configs fp32,w4a4 --rounds 10 $flag
    done
    part 70 "$PY" bench/epoch.py --device cuda --batch-size 256 --batches 0 --rounds 2 --compile reduce-overhead
fi
echo
if [ $failed -eq 0 ]; then echo "=== all parts done in $((SECONDS - start)) s"
else echo "=== $failed part(s) failed or timed out (lines starting !!! above); $((SECONDS - start)) s in all"; exit 1; fi
