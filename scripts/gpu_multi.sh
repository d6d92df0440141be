#!/usr/bin/env bash
# Data-parallel scaling on a lent multi-GPU host (nvidia-h100-x2 or larger): MoE-Mamba_100M and
# Mamba_100M trained for a fixed number of steps at the same global batch and micro batch, on one
# GPU (gradient accumulation) and under torchrun on N GPUs. Same micro batches in the same steps
# (moebench/distributed.py), so the losses must agree to rounding. Needs .whl/ and .carry/data/prose.
#   usage (repo root, device machine):  MOEBENCH_GIT_SHA=<sha> bash scripts/gpu_multi.sh [N_GPUS] [STEPS]
#   then locally: moebench results import <files_at>/bench.jsonl   (one bench-multi-gpu row per model)
set -u
cd "$(dirname "$0")/.."
. scripts/device_env.sh || exit 1
export MOEBENCH_SHARED_DATA=$PWD/.carry/data MOEBENCH_DATA=/tmp/moebench-data
# NVLink multicast stays off (a program using it can take the host's shared GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
NGPU=${1:-2}; STEPS=${2:-40}; BATCH=32; MICRO=8; CTX=1024
MODELS=${MODELS:-MoE-Mamba_100M Mamba_100M}   # e.g. MODELS=Mamba_100M EXTRA="--lr 5e-4" RUNS=/tmp/multi-lr
WORLDS=${WORLDS:-1 $NGPU}                     # a repeated world size (WORLDS="1 1r 2") measures run-to-run noise
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/out}; RUNS=${RUNS:-/tmp/multi}; mkdir -p "$OUT" "$RUNS"
LOG="$OUT/multi_gpu.log"
python3 -m moebench data prepare --corpus prose --max-tokens 4M >>"$LOG" 2>&1 || { echo "data prepare failed"; tail -5 "$LOG"; exit 1; }
for model in $MODELS; do
  for w in $WORLDS; do
    world=${w%r}; dir="$RUNS/$model-w$w"
    echo "=== $model on $world GPU(s)" | tee -a "$LOG"
    t0=$SECONDS
    timeout 300 torchrun --standalone --nproc_per_node "$world" -m moebench train "$model" \
      --tokens $((STEPS * BATCH * CTX)) --batch $BATCH --micro-batch $MICRO --ctx $CTX $EXTRA --out "$dir" \
      --ema-alpha 0.001 --ckpt-every 100000 >>"$LOG" 2>&1    # the smoothing of the earlier rows; no 29 GB save mid-run
    echo "    rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
    rm -f "$dir"/runs/*/ckpt.pt          # the 100M MoE's checkpoint is 29 GB: keep the disk free
  done
done
python3 scripts/multi_gpu_summary.py "$RUNS" "$NGPU" "$OUT" 2>&1 | tee -a "$LOG"
