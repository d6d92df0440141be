"""The MoE sublayer of a decode step on a GPU: moebench/ops/moe_decode.py's kernels against the
grouped path (moebench/models/moe.py, impl='grouped') and against torch's LayerNorm and add around
them, each captured in a CUDA graph.

    usage (device machine, repo root):  PYTHONPATH=$PWD python3 scripts/bench_moe_decode.py

E=32, D=512, F=1536, Dout=512, bf16, relu, top-1, dropless (eval). The router is the MoE's own,
randomly initialised: its top-1 choice is close to uniform over the experts. Timed per T (64, 128):
  router                      decode_router alone (whole rows, one tl.dot, 16 tokens a program)
  experts                     decode_experts: the expert kernel and the combine
  expert kernel <config>      the single expert kernel alone (moe_decode._expert_partials), the
                              default EXPERT_CONFIG first, then the alternatives it was chosen over
                              without a GPU: pick the fastest, and set EXPERT_CONFIG to it
  grouped                     MoE.forward(need_aux=False) on the grouped path (a dozen launches)
  layer                       MoE.forward(need_aux=False) on its decode path (fused kernels)
  sublayer torch-ln + add     x + MoE(LayerNorm(x)): F.layer_norm, router, experts, combine, an add
  sublayer fused              decode_moe_residual: norm + router, experts, combine (3 launches)
Each is replayed 200 times back to back ("warm": the used weights, up to 100 MB, are less than twice
the 50 MB L2 of an H100, so some reads may hit it), and 50 times one by one after reading 256 MB,
which evicts L2 ("cold", the median: a real model's other layers evict it too). TB/s counts the
weights of the used experts (2 matrices each), the bytes the expert kernels must read, on every
line but the routers' (the router's input decides which experts are used: x, or LayerNorm(x)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moebench.bench.common import capture_cuda_graph
from moebench.models.moe import MoE
from moebench.ops import moe_decode
from moebench.ops.moe_decode import (decode_experts, decode_experts_ref, decode_moe_residual,
                                     decode_moe_residual_ref, decode_router, decode_router_ref)

DEV = torch.device("cuda")
E, D, FH, N = 32, 512, 1536, 512
REPEATS, COLD_REPEATS = 200, 50
# the expert kernel's alternatives to moe_decode.EXPERT_CONFIG (see its comment)
EXPERT_CONFIGS = [
    moe_decode.EXPERT_CONFIG,
    dict(BLOCK_F=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_F=128, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_F=128, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_F=128, BLOCK_K=32, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_F=128, BLOCK_K=128, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_F=64, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_F=256, BLOCK_K=64, BLOCK_N=128, num_warps=8, num_stages=3),
    # persistent: the grid sized to the GPU (per_sm programs an SM), items strided over it
    dict(BLOCK_F=128, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3, per_sm=2),
    dict(BLOCK_F=64, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3, per_sm=4),
]


def warm_us(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEATS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / REPEATS


def cold_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor) -> float:
    times = []
    for _ in range(COLD_REPEATS):
        flush.sum()             # a read evicts L2 without leaving dirty lines to write back during the replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(expert_T: torch.Tensor) -> int:
    """Bytes of the used experts' w1 and w2 in bf16: what the expert kernels must read."""
    return expert_T.unique().numel() * (D * FH + FH * N) * 2


def timed(T: int, name: str, fn, flush: torch.Tensor, n_bytes: int | None) -> torch.Tensor:
    """Time fn (warm and cold), print one line, return its output."""
    graph, out = capture_cuda_graph(fn)
    warm, cold = warm_us(graph), cold_us(graph, flush)
    rate = "" if n_bytes is None else (f"  {n_bytes / 1e6:5.1f} MB of expert weights: {n_bytes / cold / 1e6:5.2f} TB/s "
                                       f"cold, {n_bytes / warm / 1e6:5.2f} warm")
    print(f"T={T:4d} {name:44s} cold {cold:7.2f} us  warm {warm:7.2f} us{rate}")
    return out


def max_diff(name: str, T: int, got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.float() - want.float()).abs()
    bad = (diff > 1e-2 + 1.6e-2 * want.float().abs()).any(-1)
    print(f"T={T:4d} max|{name}| = {diff.max().item():.3g} (max|want| {want.float().abs().max().item():.3g}); "
          f"{bad.sum().item()} of {T} rows beyond the bf16 tolerance (a near tie of two experts can flip one)")


def main() -> None:
    torch.manual_seed(0)
    # "grouped": the training path's plan, gathers and grouped GEMMs; "fused": the decode kernels
    moe = MoE(D, FH, N, E, top_k=1, capacity_factor=None, impl="grouped", routing="triton")
    fused = MoE(D, FH, N, E, top_k=1, capacity_factor=None, impl="grouped", routing="triton", decode=True)
    moe, fused = (m.to(DEV).eval().to(torch.bfloat16) for m in (moe, fused))
    fused.load_state_dict(moe.state_dict())
    r, w1, w2, act = moe.router_DE, moe.w1_EDF, moe.w2_EFD, moe.activation
    # a LayerNorm whose weight and bias are not the identity
    ln_w = (1 + 0.1 * torch.randn(D, device=DEV)).to(torch.bfloat16)
    ln_b = (0.1 * torch.randn(D, device=DEV)).to(torch.bfloat16)
    eps = 1e-5
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; E={E} D={D} F={FH} Dout={N} bf16 {act}, "
          f"CUDA graphs: {REPEATS} warm replays, median of {COLD_REPEATS} cold (L2 flushed)")
    with torch.no_grad():
        for T in (64, 128):
            x_TD = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
            p_T, expert_T = decode_router_ref(x_TD, r)
            n_x = weight_bytes(expert_T)

            timed(T, "router", lambda: decode_router(x_TD, r)[0], flush, None)
            y_new = timed(T, "experts (expert kernel + combine)",
                          lambda: decode_experts(x_TD, expert_T, p_T, w1, w2, act), flush, n_x)
            for cfg in EXPERT_CONFIGS:
                label = "F{BLOCK_F} K{BLOCK_K} N{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
                label += f" persistent {cfg['per_sm']}/SM" if cfg.get("per_sm") else ""
                timed(T, f"expert kernel {label}",
                      lambda cfg=cfg: moe_decode._expert_partials(x_TD, expert_T, w1, w2, act, cfg), flush, n_x)

            y_grouped = timed(T, "grouped (MoE.forward)", lambda: moe(x_TD, need_aux=False)[0], flush, n_x)
            timed(T, "layer (MoE.forward, decode path)", lambda: fused(x_TD, need_aux=False)[0], flush, n_x)

            h_TD = F.layer_norm(x_TD, (D,), ln_w, ln_b, eps)
            n_h = weight_bytes(decode_router_ref(h_TD, r)[1])

            def torch_norm_sublayer():
                h_TD = F.layer_norm(x_TD, (D,), ln_w, ln_b, eps)
                ph_T, eh_T = decode_router(h_TD, r)
                return x_TD + decode_experts(h_TD, eh_T, ph_T, w1, w2, act)

            out_old = timed(T, "sublayer torch-ln + add", torch_norm_sublayer, flush, n_h)
            out_new = timed(T, "sublayer fused (decode_moe_residual)",
                            lambda: decode_moe_residual(x_TD, ln_w, ln_b, eps, r, w1, w2, act), flush, n_h)

            y_ref = decode_experts_ref(x_TD, expert_T, p_T, w1, w2, act)
            for name, y in (("experts - ref", y_new), ("grouped - ref", y_grouped)):
                max_diff(name, T, y, y_ref)
            out_ref = decode_moe_residual_ref(x_TD, ln_w, ln_b, eps, r, w1, w2, act)
            for name, out in (("sublayer fused - ref", out_new), ("sublayer torch-ln + add - ref", out_old)):
                max_diff(name, T, out, out_ref)


if __name__ == "__main__":
    main()
