"""One MoE layer (grouped; per-expert loop) against one dense FFN of the expert's size, forward and
forward+backward, plus the two grouped GEMMs alone on balanced groups: the floor the routing
overhead sits on. The ratios between the paths are computed by the report from one session's rows."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from moebench.bench.common import OnPoint, Session, amp_context, kernel_ms, oom_guard, stats, time_repeats
from moebench.env import resolve_device
from moebench.models.ffn import FFN
from moebench.models.moe import MoE
from moebench.ops.experts import experts_grouped


def time_layer(fwd, fwd_bwd, flops_fwd: float, steps: int, warmup: int, device: torch.device) -> dict:
    """Forward (no grad) and forward+backward timings of one layer, and its GPU kernels' share."""
    with torch.no_grad():
        fwd_s = time_repeats(fwd, steps, warmup, device)
    both_s = time_repeats(fwd_bwd, steps, warmup, device)
    # a lone layer of this size can be launch-bound (the host is slower than the GPU): the kernels'
    # own time says what the layer costs inside a GPU-bound training step
    return {"fwd_ms": stats([t * 1e3 for t in fwd_s]), "fwd_bwd_ms": stats([t * 1e3 for t in both_s]),
            "tflops_fwd_bwd": 3 * flops_fwd / statistics.median(both_s) / 1e12,
            "kernel_ms_fwd_bwd": kernel_ms(fwd_bwd, device)}


def bench_moe(*, tokens: int = 32768, d: int = 512, hidden: int = 1536, experts: int = 32, top_k: int = 1,
              capacity_factor: float | None = 1.0, dtype: str = "bf16", steps: int = 20, warmup: int = 5,
              device: str = "auto", loop: bool = True, results: str | Path | None = None,
              on_point: OnPoint = None) -> list[dict]:
    """Rows named dense, grouped, loop (unless loop=False) and grouped_gemm_only, on T random tokens."""
    dev = resolve_device(device)
    config = {"tokens": tokens, "d": d, "hidden": hidden, "experts": experts, "top_k": top_k,
              "capacity_factor": capacity_factor, "dtype": dtype, "steps": steps, "warmup": warmup}
    session = Session("bench-moe", config, dev, results, on_point)
    amp = amp_context(dtype, dev)
    torch.manual_seed(0)
    x_TD = torch.randn(tokens, d, device=dev, requires_grad=True)
    g_TD = torch.randn(tokens, d, device=dev)
    ffn = FFN(d, hidden, d).to(dev)
    with dev:     # 'auto' routing resolves on the default device: Triton on CUDA, as in a model
        moe = MoE(d, hidden, d, experts, top_k=top_k, capacity_factor=capacity_factor, impl="loop")
    weights = moe.state_dict()
    flops_fwd = 2.0 * tokens * 2 * d * hidden           # two matmuls, 2 FLOPs per multiply-add

    def run_ffn():
        with amp():
            return ffn(x_TD)

    def run_moe():
        with amp():
            return moe(x_TD)

    def fwd_bwd(fn):
        def call():
            out = fn()
            y, aux = out if isinstance(out, tuple) else (out, None)
            outs, grads = [y], [g_TD.to(y.dtype)]
            if aux is not None:
                outs.append(aux.lb_loss)
                grads.append(torch.ones_like(aux.lb_loss))
            torch.autograd.backward(outs, grads)
            for p in (x_TD, *ffn.parameters(), *moe.parameters()):
                p.grad = None
        return call

    def measure(name: str, fn, flops: float, extra: dict) -> dict:
        res = {"name": name, **extra}
        res.update(oom_guard(lambda: time_layer(fn, fwd_bwd(fn), flops, steps, warmup, dev), dev))
        return session.add(res)

    measure("dense", run_ffn, flops_fwd, {"what": f"FFN {d}->{hidden}->{d}"})
    grouped_ok = False
    for impl in ["grouped", "loop"] if loop else ["grouped"]:
        try:
            with dev:
                moe = MoE(d, hidden, d, experts, top_k=top_k, capacity_factor=capacity_factor, impl=impl)
        except RuntimeError as e:                        # grouped_mm missing in this torch
            session.add({"name": impl, "status": "unavailable", "error": str(e)})
            continue
        moe.load_state_dict(weights)                     # both paths on the same weights
        with torch.no_grad(), amp():
            dropped = float(moe(x_TD)[1].dropped_frac)
        res = measure(impl, run_moe, flops_fwd * top_k,
                      {"what": f"Switch MoE E={experts} top-{top_k} cf={capacity_factor}", "dropped_frac": dropped})
        grouped_ok |= impl == "grouped" and res["status"] == "ok"
    if grouped_ok:
        # the expert GEMMs alone on T·K rows in E equal groups (in the compute dtype, with gradients)
        cdt = torch.bfloat16 if dtype == "bf16" else torch.float32
        rows = tokens * top_k
        x_SD = torch.randn(rows, d, device=dev, dtype=cdt, requires_grad=True)
        w1 = moe.w1_EDF.detach().to(cdt).requires_grad_(True)
        w2 = moe.w2_EFD.detach().to(cdt).requires_grad_(True)
        offs_E = ((torch.arange(1, experts + 1, device=dev) * rows) // experts).to(torch.int32)
        g_SD = torch.randn(rows, d, device=dev, dtype=cdt)

        def gemm_only():
            return experts_grouped(x_SD, w1, w2, offs_E)

        def gemm_fwd_bwd():
            gemm_only().backward(g_SD)
            x_SD.grad = w1.grad = w2.grad = None

        res = {"name": "grouped_gemm_only", "what": "2 grouped GEMMs, balanced groups"}
        res.update(oom_guard(lambda: time_layer(gemm_only, gemm_fwd_bwd, flops_fwd * top_k, steps, warmup, dev), dev))
        session.add(res)
    return session.rows
