#!/usr/bin/env bash
# The GPU benchmarks in one go, sized to finish within one 10-minute command on one GPU:
# the single-GPU checks of issue 31 (fp16, no host sync in a step, plots from GPU features),
# augmentation, the training step (MoCo v2, MixMask and the MIM recipes), a whole epoch with
# its profiled busy share, then time-to-accuracy in the time left. Every step writes its
# JSON under DEST, also when its time limit stops it; the tables go into
# docs/performance.md with the device name (nvidia-smi's, written to DEST/device.csv).
#
#   bash benchmarks/gpu_suite.sh [DEST]            # DEST defaults to runs/benchmarks/gpu_suite
#   bash benchmarks/gpu_suite.sh "$OUT/gpu_suite"  # on a lent machine: results come back
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh DEST    # print the commands only; changes nothing
#   CPU_SMOKE=1 bash benchmarks/gpu_suite.sh DEST  # every step at toy sizes on the CPU
#
# Data: CIFAR-10 as the ImageFolder tarball cifar10_jpeg_q75.tar.gz (19 MB) in
# $MIXMASK_DATA, default data/ inside the repository: git ignores that folder, so a copy
# there travels with the working tree to a GPU machine that receives nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-runs/benchmarks/gpu_suite}"
export MIXMASK_DATA="${MIXMASK_DATA:-data}"  # augment.py reads it too
DATA="$MIXMASK_DATA/cifar10_jpeg_q75.tar.gz"
PY="${PYTHON:-python}"
START=$(date +%s)
TOTAL_S=${TOTAL_S:-540}  # of the 600 s a command may run: start-up and copying back

if [ -z "${DRY_RUN:-}" ] && [ ! -f "$DATA" ]; then
  echo "gpu_suite: no CIFAR-10 tarball at $DATA; copy cifar10_jpeg_q75.tar.gz there (or set MIXMASK_DATA to its folder)." >&2
  exit 2
fi

if [ -n "${CPU_SMOKE:-}" ]; then  # toy sizes, CPU: checks that every step writes its JSON
  LIMITS=(240 120 120 180)  # gpu_checks, augment, train_step, epoch_time (seconds)
  CHECKS=(--device cpu --subset 96)
  AUGMENT=(--device cpu --sizes 32 --batch 16 --seconds 0.2 --warmup 1 --workers 0
           --pil-rounds 1 --methods torchvision ours --data cifar10)
  STEP=(--device cpu --batch 8 --steps 2 --warmup 1 --width 0.125 --libraries ours
        --masking none mixmask --recipes mae)
  EPOCH=(--scale cpu --epochs 2 --profile-steps 0 data.subset=128 train.batch_size=32
         model.width=0.125 method.mocov2.queue_size=256)
  ACCURACY=(--scale cpu data.subset=256 data.eval_train_subset=256 data.eval_test_subset=128
            model.width=0.125 train.epochs=2 train.batch_size=64 method.mocov2.queue_size=256)
else
  LIMITS=(75 60 110 110)
  CHECKS=(--device cuda)
  AUGMENT=(--gpu --data cifar10)
  STEP=(--gpu --channels-last --burst --libraries ours)
  EPOCH=(--scale gpu)
  ACCURACY=(--scale gpu)
fi

run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ -n "${DRY_RUN:-}" ]; then return 0; fi
  # TERM first: every benchmark then writes what it measured; KILL 30 s later if not.
  timeout --signal=TERM -k 30 "$limit" "$@" > "$DEST/$name.log" 2>&1
  local status=$?
  tail -n 25 "$DEST/$name.log"
  echo "== $name: exit $status after $(( $(date +%s) - START ))s in all"
}

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

if [ -z "${DRY_RUN:-}" ]; then
  mkdir -p "$DEST"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/device.csv"
  fi
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
fi
run gpu_checks "${LIMITS[0]}" "$PY" benchmarks/gpu_checks.py "${CHECKS[@]}" --data "$DATA" \
  --out "$DEST/gpu_checks"
run augment "${LIMITS[1]}" "$PY" benchmarks/augment.py "${AUGMENT[@]}" --out "$DEST/augment"
run train_step "${LIMITS[2]}" "$PY" benchmarks/train_step.py "${STEP[@]}" --out "$DEST/train_step"
run epoch_time "${LIMITS[3]}" "$PY" benchmarks/epoch_time.py "${EPOCH[@]}" --out "$DEST/epoch_time" \
  "data.root=$DATA"
BUDGET=$(( $(left) - 60 ))
if [ "$BUDGET" -gt 30 ] || [ -n "${DRY_RUN:-}" ]; then
  # The run stops itself at its budget (checkpoint and JSON written); the limit is a backstop.
  run time_to_accuracy $(( BUDGET + 45 )) "$PY" benchmarks/time_to_accuracy.py \
    "${ACCURACY[@]}" --budget-s "$BUDGET" --out "$DEST/time_to_accuracy" "data.root=$DATA"
fi
echo "suite done in $(( $(date +%s) - START ))s; results under $DEST"
