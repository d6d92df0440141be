#!/usr/bin/env bash
# The GPU baseline of `moebench bench check`, made on a lent H100, and its run-to-run noise measured
# right after on the same machine.
#
#   usage (repo root, device machine):   bash scripts/gpu_baseline.sh
#   check it on a CPU first (a minute, CPU twins):  SMOKE=1 OUT=/tmp/smoke bash scripts/gpu_baseline.sh
#   then, locally:  cp <files_at>/baseline.jsonl results/baselines/h100.jsonl and commit it
#
# 1. the baseline: BASE_RUNS (3) invocations of each headline benchmark, appended to $OUT/baseline.jsonl
#    (bench check compares medians, so one slow invocation does not set the bar):
#      bench train MoE-Mamba_25M-e32 Mamba_25M (+ the MoE's dense-equivalent and loop), 32 x 1024, bf16
#      bench moe (T=32768, d=512, expert 1536, E=32)
#      bench generate MoE-Mamba_25M, Mamba_25M, Transformer-MoE_25M at batch 64, 8k prompt, CUDA graphs
# 2. the noise: NOISE_RUNS (2) `bench check --repeats $REPEATS` (1 unless set) against that baseline,
#    tables in $OUT/noise.log: on an idle machine every change there is run-to-run noise, which has
#    to stay well under bench check's 10% for the --repeats that the check is run with.
set -u
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  T="@tiny"; DEV="--device cpu --dtype fp32"; BASE_RUNS=${BASE_RUNS:-2}; NOISE_RUNS=${NOISE_RUNS:-1}
  TRAIN="--batch 1 --ctx 32 --steps 2 --warmup 1"; MOE="--tokens 256 --d 64 --hidden 128 --experts 8 --steps 2 --warmup 1"
  GEN="--batch 2 --prompt-len 32 --gen-len 4"; GRAPH=""
else
  . scripts/device_env.sh || { echo "scripts/device_env.sh failed"; exit 1; }
  T=""; DEV=""; BASE_RUNS=${BASE_RUNS:-3}; NOISE_RUNS=${NOISE_RUNS:-2}
  TRAIN="--batch 32 --ctx 1024 --dtype bf16 --steps 20 --warmup 5"; MOE="--tokens 32768 --d 512 --hidden 1536 --experts 32"
  GEN="--batch 64 --prompt-len 8192 --gen-len 128"; GRAPH="--cuda-graph"
fi
REPEATS=${REPEATS:-1}
OUT=${OUT:-/tmp/gpu_baseline-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
MB="python3 -m moebench"
# shellcheck disable=SC2086  # the option strings above are meant to split into words
for i in $(seq "$BASE_RUNS"); do
  echo "== baseline run $i of $BASE_RUNS, $(date +%T)"
  $MB bench train MoE-Mamba_25M-e32$T Mamba_25M$T $TRAIN $DEV --out "$OUT/base" --format json >/dev/null || exit 1
  $MB bench moe $MOE $DEV --out "$OUT/base" --format json >/dev/null || exit 1
  $MB bench generate --variants "MoE-Mamba_25M$T,Mamba_25M$T,Transformer-MoE_25M$T" $GEN $GRAPH $DEV \
    --out "$OUT/base" --format json >/dev/null || exit 1
done
cp "$OUT/base/bench.jsonl" "$OUT/baseline.jsonl"
for i in $(seq "$NOISE_RUNS"); do
  echo "== noise: bench check --repeats $REPEATS, run $i of $NOISE_RUNS, $(date +%T)" >>"$OUT/noise.log"
  $MB bench check --baseline "$OUT/baseline.jsonl" --repeats "$REPEATS" >>"$OUT/noise.log" 2>/dev/null
  echo "(exit $?)" >>"$OUT/noise.log"
done
grep -E "^==|metrics compared" "$OUT/noise.log"
echo "baseline: $OUT/baseline.jsonl ($(wc -l < "$OUT/baseline.jsonl") rows); tables: $OUT/noise.log"
