#!/usr/bin/env bash
# GPU checks in two device calls (each under the tool's 10 minutes), results under $OUT:
#   bash benchmarks/gpu_run.sh tests              install, GPU test suite (bf16/fp16 included), verify table
#   bash benchmarks/gpu_run.sh bench [MAX_BATCH]  install, `distillcse bench memory` for the full loss
#                                                 (shuffle expected and random) and the contrastive term
#   bash benchmarks/gpu_run.sh train              install, `distillcse train` of a 3-layer MiniLM student, one
#                                                 epoch of 40k sentences, DistillCSE and SimCSE; `bench train`
#                                                 (first, here: python benchmarks/pack_carry.py; carry .carry)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODE=${1:-tests}
MAX_BATCH=${2:-65536}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
case "$MODE" in
  tests)
    timeout 420 python3 -m pytest -q -x tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
    timeout 150 python3 -m distillcse verify 2>&1 | tee "$OUT/verify_gpu.txt"
    ;;
  bench)
    for run in full:expected full:random contrastive:expected; do
      timeout "${BENCH_TIMEOUT:-170}" python3 -m distillcse bench memory --what "${run%%:*}" --shuffle "${run##*:}" \
        --max-batch "$MAX_BATCH" --no-progress --out "$OUT/${run/:/_}" 2>&1 | tail -n 30
    done
    ;;
  train)
    export DISTILLCSE_MINILM=$PWD/.carry/minilm DISTILLCSE_STS_DIR=$PWD/.carry/sts
    for run in distillcse:1 simcse:0; do
      timeout 200 python3 -m distillcse train --out "$OUT/train_${run%%:*}" --student-layers 3 \
        --sentences .carry/sentences.txt --distill-weight "${run##*:}" --eval-every 125 --no-progress 2>&1 | tail -n 15
    done
    timeout 150 python3 -m distillcse bench train --sentences .carry/sentences.txt --no-progress \
      --out "$OUT/bench_train" 2>&1 | tail -n 20
    ;;
  *) echo "usage: bash benchmarks/gpu_run.sh tests | bench [MAX_BATCH] | train"; exit 2 ;;
esac
