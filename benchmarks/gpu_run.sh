#!/usr/bin/env bash
# GPU checks, one device call each (the device tool: <= 10 min a command, 15 min of device time a
# task, at most 8 files back, so each mode leaves a few flat files in $OUT):
#   bash benchmarks/gpu_run.sh check   (~9.5 min; run it first, with timeout_s 590)
#       1. `distillcse bench targets --skip-million`: the headline figures (B = 64, 65,536) against their targets
#       2. the test suite on the GPU (bf16/fp16/fp32; 16 pytest-xdist workers (--dist loadgroup: the ~9 GiB cases
#          of test_int64_offsets.py on one worker, one at a time), as the first launch of each of
#          ~1,200 kernel variants JIT-compiles, ~1 s each; -v names each result as it ends, so a suite cut at its
#          limit still says what failed; the training tests skip there: no MiniLM package; the bench, CLI and
#          compile-report files are left out: CPU work that CI covers, ~2 min of it in session 12)
#       3. `distillcse verify` (bf16/fp16/fp32, K = 1 and 2: 72 rows, each held to its bounds)
#       4. `benchmarks/profile_step.py --B 65536`: where a step's time goes, and whether the host keeps up
#       (session 12's H200 run: targets hit 240 s with its slow kernels, the suite took 165 s, verify 27 s;
#       `gpu_diag.py small` now runs on its own: `run`, below)
#   bash benchmarks/gpu_run.sh sweep   (~7.5 min) `bench memory` sweeps for the README's plots (and the
#       contrastive term with a hard negative a row, supervised SimCSE's), and a BERT-base training step
#       at B = 4,096-32,768 with gradient caching (`bench train --mini-batch-size`), packed
#   bash benchmarks/gpu_run.sh thresholds   (~4 min) Group-P search vs pairwise kernel (PAIRWISE_MAX_B), and a
#       step at B around 4,096 with padded slab rows and without (time_padding.py: PAD_MIN_COLS)
#   bash benchmarks/gpu_run.sh million   (<= 9 min) bench targets' B = 2^20 point alone (one step; timeout_s 590)
#   bash benchmarks/gpu_run.sh train   (~8 min) `distillcse train` of a 3-layer MiniLM student (DistillCSE
#       and SimCSE, 40k sentences) and `bench train`; first, here: python benchmarks/pack_carry.py; carry .carry
#   LIMIT=240 bash benchmarks/gpu_run.sh run COMMAND...   one command after the install (NOTES.md's one-off checks:
#       every script needs the installed package), its output in $OUT/run.log
# Each stage has its own time limit (then SIGKILL 15 s after SIGTERM), so a slow one costs its limit and the
# rest still run; the sweep and train modes pack their results after every stage.
# The working tree travels without .git: pass the commit, `DISTILLCSE_COMMIT=$(git rev-parse --short HEAD)`
# written out in the device command, and every result row records it.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODE=${1:-check}
stage() {  # stage SECONDS LOG COMMAND...: run with a time limit, output to LOG and the console
  local limit=$1 log=$2; shift 2
  echo "== $(date +%T) $* (limit ${limit}s)" | tee -a "$OUT/$log"
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT/$log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "== exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') ($(date +%T))" | tee -a "$OUT/$log"
}
# Editable install without the network: PEP 660 with the image's setuptools (a plain `-e .` ran the
# legacy `setup.py develop`, whose inner pip fetched setuptools and failed there). Fallback: the
# package from the checkout with kernels/ linked in (tests/test_package.py then fails, and says so).
if python3 -m pip install -q --no-deps --no-build-isolation --use-pep517 -e . > /tmp/install.log 2>&1; then
  echo "editable install: ok"
else
  tail -n 5 /tmp/install.log | tee -a "$OUT/gpu.txt"; ln -sfn ../kernels distillcse/kernels; export PYTHONPATH=$PWD
  echo "editable install failed: running from the checkout, distillcse/kernels -> kernels" | tee -a "$OUT/gpu.txt"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${DISTILLCSE_COMMIT:-unknown}"; } | tee -a "$OUT/gpu.txt"
case "$MODE" in
  check)
    stage 200 targets.log python3 -m distillcse bench targets --skip-million --no-progress --out "$OUT"
    stage 230 pytest_gpu.log python3 -m pytest -v -rfE -n 16 --dist loadgroup --timeout 180 --durations=20 -p no:cacheprovider \
      --ignore=tests/test_bench.py --ignore=tests/test_cli_errors.py --ignore=tests/test_compile_sm90.py tests
    stage 75 verify_gpu.txt python3 -m distillcse verify   # 72 rows (K = 1 and 2 since session 25), exit 1 on a row out of bounds
    stage 60 profile.log python3 benchmarks/profile_step.py --B 65536 --out /tmp  # the log has it, as it goes
    ;;
  run)
    shift; stage "${LIMIT:-540}" run.log "$@"
    ;;
  sweep)
    for run in full:random full:expected contrastive:random; do
      # the fused backends first: a stage cut at its limit loses the slowest (the reference's Python loop)
      stage 90 sweep.log python3 -m distillcse bench memory --what "${run%%:*}" --shuffle "${run##*:}" \
        --impl triton torch plain plain-compile reference \
        --max-batch "${MAX_BATCH:-262144}" --time-cap 10 --repeats 5 --no-progress --out "/tmp/sweep/${run/:/_}"
      tar -czf "$OUT/sweep.tgz" -C /tmp sweep
    done
    stage 90 sweep.log python3 -m distillcse bench memory --what contrastive --hard-negatives 1 \
      --impl triton torch plain plain-compile reference \
      --max-batch "${MAX_BATCH:-262144}" --time-cap 10 --repeats 5 --no-progress --out /tmp/sweep/contrastive_hard1
    tar -czf "$OUT/sweep.tgz" -C /tmp sweep
    # a BERT-base-sized training step up to B = 32,768 with gradient caching (encoders 1,024 rows at a
    # time); with no MiniLM package here the tokens are random ids, so any text file serves as --sentences
    stage 120 sweep.log python3 -m distillcse bench train --config bert-base --sentences README.md \
      --batch 4096 16384 32768 --mini-batch-size 1024 --impl encoder-only triton --steps 3 --no-progress \
      --out /tmp/sweep/train_cached
    tar -czf "$OUT/sweep.tgz" -C /tmp sweep
    ;;
  thresholds)
    stage 240 thresholds.md python3 benchmarks/time_thresholds.py
    stage 150 padding.md python3 benchmarks/time_padding.py
    ;;
  million)
    stage 540 million.log python3 -m distillcse bench targets --million-only --no-progress --out "$OUT"
    ;;
  train)
    export DISTILLCSE_MINILM=$PWD/.carry/minilm DISTILLCSE_STS_DIR=$PWD/.carry/sts
    for run in distillcse:1 simcse:0; do
      stage 200 train.log python3 -m distillcse train --out "/tmp/train/${run%%:*}" --student-layers 3 \
        --sentences .carry/sentences.txt --distill-weight "${run##*:}" --eval-every 125 --no-progress
      tar -czf "$OUT/train.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' -C /tmp train
    done
    stage 120 train.log python3 -m distillcse bench train --sentences .carry/sentences.txt --no-progress \
      --impl triton encoder-only torch plain reference --out /tmp/train/bench_train
    tar -czf "$OUT/train.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' -C /tmp train
    ;;
  *) echo "usage: bash benchmarks/gpu_run.sh check | sweep | thresholds | million | train | run COMMAND..."; exit 2 ;;
esac
