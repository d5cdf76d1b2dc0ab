#!/usr/bin/env bash
# The GPU benchmarks in one go, sized to finish within 10 minutes on one GPU: augmentation,
# the training step (MoCo v2, MixMask and the MIM recipes), a whole epoch with its profiled
# busy share, then time-to-accuracy in the time left. Every step writes its JSON under OUT;
# the tables go into docs/performance.md with the device name (nvidia-smi's, printed first).
#
#   bash benchmarks/gpu_suite.sh [OUT]          # OUT defaults to runs/benchmarks/gpu_suite
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh      # print the commands only
#
# Data: CIFAR-10 as an ImageFolder tarball (MIXMASK_DATA, default ../shared/data).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/benchmarks/gpu_suite}"
DATA="${MIXMASK_DATA:-../shared/data}/cifar10_jpeg_q75.tar.gz"
PY="${PYTHON:-python}"
START=$(date +%s)
TOTAL_S=570  # leaves half a minute of the 10 for start-up and copying results back
mkdir -p "$OUT"

run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ -n "${DRY_RUN:-}" ]; then return 0; fi
  timeout --signal=INT "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $status after $(( $(date +%s) - START ))s in all"
}

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

if [ -z "${DRY_RUN:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.csv"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
fi
run augment 60 "$PY" benchmarks/augment.py --gpu --out "$OUT/augment"
run train_step 120 "$PY" benchmarks/train_step.py --gpu --channels-last --burst \
  --libraries ours --out "$OUT/train_step"
run epoch_time 120 "$PY" benchmarks/epoch_time.py --scale gpu --out "$OUT/epoch_time" \
  "data.root=$DATA"
BUDGET=$(( $(left) - 60 ))
if [ "$BUDGET" -gt 60 ] || [ -n "${DRY_RUN:-}" ]; then
  run time_to_accuracy $(( BUDGET + 50 )) "$PY" benchmarks/time_to_accuracy.py --scale gpu \
    --budget-s "$BUDGET" --out "$OUT/time_to_accuracy" "data.root=$DATA"
fi
echo "suite done in $(( $(date +%s) - START ))s; results under $OUT"
