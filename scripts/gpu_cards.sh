#!/usr/bin/env bash
# The benchmarks behind the model cards' claims (reports/claims.md, "Model cards"; issue 18) on a lent
# GPU, each point appended to $OUT/bench.jsonl as it is measured:
#   decode     bench generate, CUDA graphs, batch 1 and 64, contexts 1k..64k: Mamba_25M, Mamba2_25M,
#              MoE-Mamba_25M against Transformer_25M, Transformer-MoE_25M ("5x faster inference")
#   long       bench memory, batch 1, 4k..1M tokens: prefill and training time and peak memory (the
#              log-log slope, "million-token sequences"; a length that runs out of memory ends its mode)
# usage (repo root, device machine):  bash scripts/gpu_cards.sh [SECONDS]    (default 540)
# then, here:  moebench results import FILES_AT/bench.jsonl && moebench report claims
set -u
. scripts/device_env.sh || exit 1
OUT=${OUT:-/tmp/gpu_cards}; mkdir -p "$OUT"
end=$(( $(date +%s) + ${1:-540} ))
left() { echo $(( end - $(date +%s) )); }
MB="python3 -m moebench"
PAIRS="Mamba_25M,Transformer_25M,MoE-Mamba_25M,Transformer-MoE_25M,Mamba2_25M"
for batch in 64 1; do
  timeout $(( $(left) / 3 )) $MB bench generate --variants "$PAIRS" --batch $batch --prompt-len 1024,4096,16384,65536 \
    --gen-len 128 --cuda-graph --out "$OUT" 2>&1 | tail -3
done
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout $(left) $MB bench memory --variants Mamba_25M,Mamba2_25M,MoE-Mamba_25M,Transformer_25M --batch 1 \
  --lengths 4096,16384,65536,262144,1048576 --repeats 2 --out "$OUT" 2>&1 | tail -3
ls -la "$OUT"
