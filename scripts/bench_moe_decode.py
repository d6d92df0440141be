"""One MoE layer at decode time on a GPU: the fused decode kernels (moebench/ops/moe_decode.py) against
the grouped path (moebench/models/moe.py, impl='grouped'), each captured in a CUDA graph.

    usage (device machine, repo root):  PYTHONPATH=$PWD python3 scripts/bench_moe_decode.py

E=32, D=512, F=1536, Dout=512, bf16, top-1, dropless (eval). The router is the MoE's own, randomly
initialised: its top-1 choice is close to uniform over the experts. Timed per T:
  decode          decode_experts alone (router output given)
  router+decode   the MoE's router (as MoE.forward computes it) then decode_experts
  router          the router alone
  grouped         MoE.forward(need_aux=False): router, plan, gather, 2 grouped GEMMs, combine
Each is replayed 200 times back to back ("warm": the used weights, up to 100 MB, are less than twice
the 50 MB L2 of an H100, so some reads may hit it), and 50 times one by one after reading 256 MB,
which evicts L2 ("cold", the median: a real model's other layers evict it too). GB/s counts the
weights of the used experts (2 matrices each), the bytes the decode kernels must read, on every line.
"""
from __future__ import annotations

import torch

from moebench.models.moe import MoE
from moebench.ops.moe_decode import decode_experts, decode_experts_ref, decode_router_ref

DEV = torch.device("cuda")
E, D, FH, N = 32, 512, 1536, 512
REPEATS, COLD_REPEATS = 200, 50


def capture(fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn captured in a CUDA graph, after warm-up on a side stream (compiles the Triton kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


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


def router(moe: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p_T, expert_T = decode_router_ref(x_TD, moe.router_DE)     # as MoE.forward, in torch
    return expert_T, p_T            # decode_experts' argument order


def main() -> None:
    torch.manual_seed(0)
    moe = MoE(D, FH, N, E, top_k=1, capacity_factor=None, impl="grouped").to(DEV).eval().to(torch.bfloat16)
    fused = MoE(D, FH, N, E, top_k=1, capacity_factor=None, impl="grouped").to(DEV).eval().to(torch.bfloat16)
    fused.load_state_dict(moe.state_dict())
    moe.decode_kernels = False         # "grouped": the training path's plan, gathers and grouped GEMMs
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; E={E} D={D} F={FH} Dout={N} bf16, "
          f"CUDA graphs: {REPEATS} warm replays, median of {COLD_REPEATS} cold (L2 flushed)")
    with torch.no_grad():
        for T in (16, 64, 128):
            x_TD = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
            expert_T, p_T = router(moe, x_TD)
            n_used = expert_T.unique().numel()
            weight_bytes = n_used * (D * FH + FH * N) * 2
            runs = {
                "decode": lambda: decode_experts(x_TD, expert_T, p_T, moe.w1_EDF, moe.w2_EFD, moe.activation),
                "router+decode": lambda: decode_experts(x_TD, *router(moe, x_TD), moe.w1_EDF, moe.w2_EFD,
                                                        moe.activation),
                "router": lambda: router(moe, x_TD)[1],
                "grouped": lambda: moe(x_TD, need_aux=False)[0],
                "layer": lambda: fused(x_TD, need_aux=False)[0],     # MoE.forward's decode path
            }
            outs = {}
            for name, fn in runs.items():
                graph, outs[name] = capture(fn)
                for mode, us in (("warm", warm_us(graph)), ("cold", cold_us(graph, flush))):
                    print(f"T={T:4d} {name:14s} {mode}: {us:7.2f} us/call, {n_used} experts used, "
                          f"{weight_bytes / 1e6:.1f} MB of expert weights, {weight_bytes / us / 1e3:7.0f} GB/s")
            ref = decode_experts_ref(x_TD, expert_T, p_T, moe.w1_EDF, moe.w2_EFD, moe.activation).float()
            got, grouped = outs["decode"].float(), outs["grouped"].float()
            scale = ref.abs().max().item()
            for name, y in (("decode", got), ("router+decode", outs["router+decode"].float()), ("grouped", grouped),
                          ("layer", outs["layer"].float())):
                print(f"T={T:4d} max|{name} - fp32 ref| = {(y - ref).abs().max().item():.3g} (max|y| {scale:.3g})")
            diff = (got - grouped).abs().max().item()
            ok = torch.allclose(got, grouped, rtol=1.6e-2, atol=1e-2 * scale)
            print(f"T={T:4d} max|decode - grouped| = {diff:.3g}: {'OK' if ok else 'MISMATCH'} (bf16 tolerance)")


if __name__ == "__main__":
    main()
