#!/usr/bin/env bash
# One device call: install, GPU test suite, verify table, benchmark. Results under $OUT.
# Usage (device tool): bash benchmarks/gpu_run.sh [bench sizes...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest -q -x tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
  timeout 120 python3 -m distillcse verify 2>&1 | tee "$OUT/verify_gpu.txt"
fi
if [ "$#" -gt 0 ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_fused.py --sizes "$@" --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -n 40
fi
