"""Mamba residual sublayers at decode time on a GPU: the fused kernels (moebench/ops/mamba_decode.py)
under several block configurations against the unfused step (LayerNorm, Mamba.step on mamba-ssm's
and causal-conv1d's kernels, the residual add).

    usage (device machine, repo root):  . scripts/device_env.sh && python3 scripts/bench_mamba_decode.py

Eight sublayers of Mamba_25M's shape (D=512, I=1024, N=16, R=32, W=4), each with its own weights
and state, one after the other in one CUDA graph, as in a model's decode step (their weights and
states, ~60 MB at batch 64, overflow the 50 MB L2). Printed: µs per sublayer, the median of 20
timings of 50 replays each.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from moebench.bench.common import capture_cuda_graph
from moebench.generate import cast_for_inference
from moebench.models.mamba import Mamba
from moebench.ops import mamba_decode

DEV = torch.device("cuda")
LAYERS, D = 8, 512
CONFIGS = [dict(), dict(ssm_i=32, ssm_warps=2), dict(ssm_i=128), dict(ssm_i=256, ssm_warps=8), dict(in_i=64),
           dict(in_b=64, in_i=16, in_warps=8), dict(in_warps=8)]


def layers(batch: int):
    torch.manual_seed(0)
    out = []
    for _ in range(LAYERS):
        mixer = cast_for_inference(Mamba(D, device=DEV), torch.bfloat16)
        norm = cast_for_inference(nn.LayerNorm(D, device=DEV), torch.bfloat16)
        state = mixer.allocate_state(batch, DEV, torch.bfloat16)
        out.append((norm, mixer, state))
    return out


def unfused(x_BD, norm, mixer, state):
    y_BD, _ = mixer.step(norm(x_BD), state)
    return x_BD + y_BD


def per_layer_us(step, stack, x_BD) -> float:
    def run():
        h = x_BD
        for norm, mixer, state in stack:
            h = step(h, norm, mixer, state)
        return h
    graph, _ = capture_cuda_graph(run)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 50 / LAYERS)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    base = dict(mamba_decode.BLOCKS)
    for batch in (64, 16):
        stack = layers(batch)
        x_BD = torch.randn(batch, D, device=DEV, dtype=torch.bfloat16)
        print(f"batch {batch}: unfused (LayerNorm + Mamba.step + add): {per_layer_us(unfused, stack, x_BD):6.2f} µs/layer")
        for cfg in CONFIGS:
            mamba_decode.BLOCKS.clear()
            mamba_decode.BLOCKS.update(base, **cfg)
            us = per_layer_us(mamba_decode.mamba_decode_residual, stack, x_BD)
            print(f"batch {batch}: fused {cfg or 'default'}: {us:6.2f} µs/layer")
        mamba_decode.BLOCKS.clear()
        mamba_decode.BLOCKS.update(base)


if __name__ == "__main__":
    main()
