#!/usr/bin/env bash
# Every benchmark of the speed/memory/generation issue in one command on a lent H100: one row per
# measured point appended to $OUT/bench.jsonl, the report's bench.md copied to $OUT (its figures stay
# behind: at most 8 files come back from a lent machine) and its summary against the targets printed last.
#
#   usage (repo root, device machine):   bash scripts/gpu_bench.sh
#   check it on a CPU first (1-2 minutes, CPU twins):  SMOKE=1 OUT=/tmp/smoke bash scripts/gpu_bench.sh
#   then, locally:  moebench results import <files_at>/bench.jsonl && moebench report bench --results results/published --out reports
#
# Sections run in order of importance, each under its own time limit and a 7.5-minute overall
# deadline. Every point is appended to bench.jsonl as soon as it is measured, so a section that is
# cut short keeps its finished points. One session (one invocation) per section:
#   train           bench train: MoE-Mamba_25M-e32 (+ dense-equivalent, loop), Mamba_25M,
#                   Transformer_25M, Transformer-MoE_25M (+ baselines); 32 x 1024, bf16, eager
#   moe             bench moe: one MoE layer, T=32768, d=512, expert 1536, E=32
#   generate-graph  bench generate: batch 64, prompts 1k..8k, 128 new tokens, CUDA graphs
#   generate-eager  the same without CUDA graphs
#   memory          bench memory: batch 1, lengths 512..65536, training and prefill
#   compile         bench train MoE-Mamba_25M-e32 --compile, with its baselines (only if time is left;
#                   not in SMOKE mode, where fp32 grouped_mm does not trace under torch.compile)
#   (log only)      scripts/bench_moe_decode.py (one MoE layer at decode), scripts/bench_mamba_decode.py
#                   (Mamba sublayers at decode) and scripts/bench_optim.py
#   bench.md, bench.log   the rendered report and every section's output
#                   (including `pytest -m gpu tests/test_generate.py`: CUDA-graph decode == eager decode)
set -u
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then     # SMOKE=1: the same sections on the CPU twins, tiny sizes (checks the script)
  T="@tiny"; DEV="--device cpu --dtype fp32"
  TRAIN="--batch 1 --ctx 32 --steps 2 --warmup 1"; MOE="--tokens 256 --d 64 --hidden 128 --experts 8 --steps 2 --warmup 1"
  GEN="--batch 2 --prompt-len 16,32 --gen-len 4"; GRAPH=""; MEM="--lengths 16,32,64 --repeats 1"; COMPILE=""
else
  . scripts/device_env.sh || { echo "scripts/device_env.sh failed"; exit 1; }
  T=""; DEV=""
  TRAIN="--batch 32 --ctx 1024 --dtype bf16 --steps 20 --warmup 5"; MOE="--tokens 32768 --d 512 --hidden 1536 --experts 32"
  GEN="--batch 64 --prompt-len 1024,2048,4096,8192 --gen-len 128"; GRAPH="--cuda-graph"
  MEM="--batch 1 --lengths 512,1024,2048,4096,8192,16384,32768,65536"; COMPILE="--steps 10 --warmup 20"
fi
OUT=${OUT:-/tmp/gpu_bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/bench.log"
DEADLINE=${DEADLINE:-450}          # seconds for all sections together
START=$SECONDS
FAMILY="Mamba_25M$T,MoE-Mamba_25M$T,Transformer_25M$T,Transformer-MoE_25M$T"

section() {  # section NAME LIMIT_S COMMAND... : COMMAND under min(LIMIT, time left), output to the log
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then echo "--- $name: skipped (deadline)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s) $*" >>"$LOG"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT (measured points kept)"
  elif [ $rc -ne 0 ]; then status="FAILED rc=$rc"; fi
  echo "--- $name: $status in $((SECONDS - t0))s" | tee -a "$LOG"
  if [ "$status" != "ok" ]; then tail -n 4 "$LOG" | sed 's/^/    /'; fi
}

# shellcheck disable=SC2086  # the option strings above are meant to split into words
MB="python3 -m moebench"
section train 150 $MB bench train MoE-Mamba_25M-e32$T Mamba_25M$T Transformer_25M$T Transformer-MoE_25M$T \
  $TRAIN $DEV --out "$OUT"
section moe 45 $MB bench moe $MOE $DEV --out "$OUT"
[ "${SMOKE:-0}" = 1 ] || section gpu-tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_generate.py
section generate-graph 90 $MB bench generate --variants "$FAMILY" $GEN $GRAPH $DEV --out "$OUT"
section generate-eager 90 $MB bench generate --variants "$FAMILY" $GEN $DEV --out "$OUT"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
section memory 120 $MB bench memory --variants "$FAMILY" $MEM $DEV --out "$OUT"
# compiled, with both baselines: the run in which the training targets can hold together (the
# compiled loop recompiles for a while, hence the longer warm-up)
[ -n "$COMPILE" ] && section compile 180 $MB bench train MoE-Mamba_25M-e32$T --compile $COMPILE $DEV \
  --out "$OUT"
if [ "${SMOKE:-0}" != 1 ]; then     # GPU-only scripts, output in the log
  section moe-decode 60 python3 scripts/bench_moe_decode.py
  section mamba-decode 60 python3 scripts/bench_mamba_decode.py
  section optimizer 60 python3 scripts/bench_optim.py
fi

rm -f "$OUT/bench.jsonl.lock"        # the writers' lock: nothing writes any more
REPORT=/tmp/gpu_bench_report
python3 -m moebench report bench --results "$OUT" --out "$REPORT" >>"$LOG" 2>&1 \
  && cp "$REPORT/bench.md" "$OUT/bench.md" || echo "--- report: FAILED (see $LOG)"
echo
echo "== summary ($((SECONDS - START))s of benchmarks; rows in $OUT/bench.jsonl) =="
# the report's summary section: from its heading to the next one
[ -f "$OUT/bench.md" ] && sed -n '/^## Summary/,/^## /{/^## [^S]/!p}' "$OUT/bench.md"
