#!/usr/bin/env bash
# One device call: install, GPU test suite, verify table, then `distillcse bench memory`
# for the full loss (shuffle expected) and the contrastive term. Results under $OUT.
# Usage (device tool): bash benchmarks/gpu_run.sh [MAX_BATCH]   (default 65536)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MAX_BATCH=${1:-65536}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -x tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
  timeout 120 python3 -m distillcse verify 2>&1 | tee "$OUT/verify_gpu.txt"
fi
for what in full contrastive; do
  timeout "${BENCH_TIMEOUT:-200}" python3 -m distillcse bench memory --what "$what" --shuffle expected \
    --max-batch "$MAX_BATCH" --no-progress --out "$OUT/$what" 2>&1 | tail -n 30
done
