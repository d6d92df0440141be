"""Speed and memory benchmarks. No CLI, no plots: each function returns one self-describing record
(schema, kind, config, results, env) that cli_bench prints and saves and bench_report renders.

  bench_train     whole training steps (forward + backward + fused AdamW) per variant, with the
                  dense-equivalent and loop baselines of every MoE variant and the ratios to them
  bench_moe       one MoE layer (grouped, loop) against one dense FFN, forward and backward
  bench_memory    peak memory and time of training and prefill against sequence length; OOM is a result
  bench_generate  prefill + step decoding against context length; KV-cache bandwidth bound

Timing follows torch's Timer / triton's do_bench: warm up, then time each repeat with CUDA events
(perf_counter on CPU), take the median and store every repeat. Peak memory is reset before the
measured repeats. Implementations are passed explicitly and recorded with every result, so a slow
fallback never quietly becomes "the Mamba number".
"""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable

import torch

from moebench import env
from moebench.env import resolve_device
from moebench.config import ModelConfig
from moebench.models.lm import build_model, default_loss_chunk, flops_per_token

SCHEMA = 1
GiB = 2**30
# HBM bandwidth from the vendors' datasheets, bytes/s (the fallback when it is not measured)
Update = Callable[[dict], None] | None


# ---- shared helpers -----------------------------------------------------------------------------


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' means the mamba-ssm kernels on CUDA (failing loudly if they are missing) and the
    reference on CPU: a benchmark never falls back silently."""
    if impl == "auto":
        return "fast" if device.type == "cuda" else "ref"
    return impl


def new_record(kind: str, config: dict, device: torch.device) -> dict:
    return {"schema": SCHEMA, "kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "complete": False, "config": config, "results": [], "env": env.collect(device),
            "device": env.device_name(device)}


def _add(record: dict, res: dict, on_update: Update) -> dict:
    """Append one measured point; the caller's on_update rewrites the record after every point, so
    an interrupted benchmark keeps what it measured."""
    record["results"].append(res)
    if on_update:
        on_update(record)
    return res


def _finish(record: dict, on_update: Update) -> dict:
    record["complete"] = True
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if on_update:
        on_update(record)
    return record


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of fn, one per repeat, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 3):
    """(graph, fn's output): fn captured in a CUDA graph after `warmup` calls on a side stream (which
    compile Triton kernels and pick cuBLAS algorithms outside the capture), replayed once. For scripts."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 5) -> float:
    """Milliseconds per call of fn: the middle of `repeats` timings (the upper one of two), for scripts."""
    t = sorted(time_repeats(fn, repeats, warmup, device))
    return t[len(t) // 2] * 1e3


def kernel_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float | None:
    """Milliseconds of GPU kernels per call of fn (torch.profiler, CUDA activity only): the device's
    share of the work, whatever the host's launch overhead. None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / repeats / 1e3


def stats(times: list[float]) -> dict:
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times),
            "max": max(times), "n": len(times), "all": times}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def amp_context(dtype: str, device: torch.device):
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "fp32":
        return nullcontext
    raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")


def has_moe(cfg: ModelConfig) -> bool:
    return cfg.ffn == "moe" or bool(cfg.inner_moe)


def impl_of(model, compiled: bool = False) -> dict:
    """What goes into every result: the model's Impl (moebench/impl.py) and whether it was compiled."""
    return {**model.impl.to_dict(), "compile": compiled}


def build(cfg: ModelConfig, impl: str, moe_impl: str, device: torch.device, moe_override: str | None = None):
    """The model with the mixer `impl` and the MoE `moe_override or moe_impl` ('auto', 'grouped',
    'loop'), resolved on `device` at build."""
    return build_model(cfg, impl={"mixer": impl, "moe": moe_override or moe_impl}, device=device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ---- whole training steps -----------------------------------------------------------------------


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """Each MoE replaced by one dense FFN of the expert's size (same active parameters)."""
    return replace(cfg, ffn="dense", name=cfg.name + "[dense-eq]")


def train_one(cfg: ModelConfig, *, batch: int, ctx: int, dtype: str, compile: bool, steps: int, warmup: int,
              device: torch.device, impl: str, moe_impl: str, loss_chunk: int, label: str | None = None,
              baseline: str | None = None, moe_override: str | None = None) -> dict:
    """Median time of a whole training step (forward, backward, grad clip, fused AdamW) on random tokens."""
    res = {"variant": label or cfg.name, "of": cfg.name if baseline else None, "baseline": baseline,
           "model": cfg.to_dict(), "status": "ok"}
    try:
        res.update(_train_one(cfg, batch, ctx, dtype, compile, steps, warmup, device, impl, moe_impl,
                              loss_chunk, moe_override))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        res.update(status="oom", error=str(e).splitlines()[0][:200])
    free_memory(device)
    return res


def _train_one(cfg, batch, ctx, dtype, compile, steps, warmup, device, impl, moe_impl, loss_chunk, moe_override):
    from moebench.optim import clip_grad_norm, make_optimizer
    torch.manual_seed(0)
    model = build(cfg, impl, moe_impl, device, moe_override)
    model.train()
    opt = make_optimizer(model, 1e-4)    # as train.py: the model's Impl.adamw
    fwd = torch.compile(model) if compile else model
    amp = amp_context(dtype, device)
    tokens_BL = torch.randint(0, cfg.vocab_size, (batch, ctx + 1), device=device)
    x_BL, y_BL = tokens_BL[:, :-1], tokens_BL[:, 1:]
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with amp():
            o = fwd(x_BL, y_BL, return_logits=False, loss_chunk=loss_chunk)
            total = o.loss + o.aux_loss
        total.backward()
        clip_grad_norm(opt, params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    reset_peak(device)
    t0 = time.perf_counter()
    times = time_repeats(step, steps, 0, device)
    wall_s = time.perf_counter() - t0
    n_active = model.n_active_params()
    fpt = flops_per_token(cfg, n_active, ctx)
    tok_s = batch * ctx / statistics.median(times)
    peak = env.peak_flops(env.device_name(device)) if device.type == "cuda" and dtype == "bf16" else None
    return {"params": {"total": model.n_params(), "active": n_active}, "flops_per_token": fpt,
            "impl": {**impl_of(model, compile), "dtype": dtype, "loss_chunk": loss_chunk},
            "step_s": stats(times), "tokens_per_s": tok_s, "tflops": tok_s * fpt / 1e12,
            "mfu": tok_s * fpt / peak if peak else None, "peak_mem_gib": peak_gib(device),
            "warmup_s": warmup_s, "wall_s": wall_s}


def bench_train(cfgs: list[ModelConfig], *, batch: int = 32, ctx: int = 1024, dtype: str = "bf16",
                compile: bool = False, steps: int = 20, warmup: int = 5, device: str = "auto",
                impl: str = "auto", moe_impl: str = "auto", loss_chunk: int | None = None,
                baselines: bool = True, on_update: Update = None) -> dict:
    """Every variant, then for each MoE variant its `dense-equivalent` and `loop` baselines; MoE
    results get `ratios` (tokens/s over each baseline's)."""
    dev = resolve_device(device)
    impl = resolve_impl(impl, dev)
    loss_chunk = default_loss_chunk(dev) if loss_chunk is None else loss_chunk
    config = {"variants": [c.name for c in cfgs], "batch": batch, "ctx": ctx, "dtype": dtype, "compile": compile,
              "steps": steps, "warmup": warmup, "impl": impl, "moe_impl": moe_impl, "loss_chunk": loss_chunk,
              "baselines": baselines, "grad_clip": 0.5}
    record = new_record("bench-train", config, dev)
    kw = dict(batch=batch, ctx=ctx, dtype=dtype, compile=compile, steps=steps, warmup=warmup, device=dev,
              impl=impl, moe_impl=moe_impl, loss_chunk=loss_chunk)

    for cfg in cfgs:
        main = _add(record, train_one(cfg, **kw), on_update)
        if not (baselines and has_moe(cfg)):
            continue
        ratios = {}
        if cfg.ffn == "moe":
            dense = _add(record, train_one(dense_equivalent(cfg), baseline="dense-equivalent", **kw), on_update)
            dense["of"] = cfg.name
            ratios["vs_dense_equivalent"] = _ratio(main, dense)
        loop = _add(record, train_one(cfg, label=cfg.name + "[loop]", baseline="loop", moe_override="loop", **kw),
                    on_update)
        ratios["vs_loop"] = _ratio(main, loop)
        main["ratios"] = ratios
    return _finish(record, on_update)


def _ratio(a: dict, b: dict) -> float | None:
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


# ---- one MoE layer ------------------------------------------------------------------------------


def bench_moe(*, tokens: int = 32768, d: int = 512, hidden: int = 1536, experts: int = 32, top_k: int = 1,
              capacity_factor: float | None = 1.0, dtype: str = "bf16", steps: int = 20, warmup: int = 5,
              device: str = "auto", loop: bool = True, on_update: Update = None) -> dict:
    """Forward and forward+backward time of one MoE layer (grouped; loop) and one dense FFN of the
    expert's size on T random tokens, plus the two grouped GEMMs alone on balanced groups (the floor
    the routing overhead sits on)."""
    from moebench.models.ffn import FFN
    from moebench.models.moe import MoE
    from moebench.ops.experts import experts_grouped

    dev = resolve_device(device)
    config = {"tokens": tokens, "d": d, "hidden": hidden, "experts": experts, "top_k": top_k,
              "capacity_factor": capacity_factor, "dtype": dtype, "steps": steps, "warmup": warmup}
    record = new_record("bench-moe", config, dev)
    amp = amp_context(dtype, dev)
    torch.manual_seed(0)
    x_TD = torch.randn(tokens, d, device=dev, requires_grad=True)
    g_TD = torch.randn(tokens, d, device=dev)
    ffn = FFN(d, hidden, d).to(dev)
    with dev:     # 'auto' routing resolves on the default device: Triton on CUDA
        moe = MoE(d, hidden, d, experts, top_k=top_k, capacity_factor=capacity_factor, impl="loop")
    flops_fwd = 2.0 * tokens * 2 * d * hidden           # two matmuls, 2 FLOPs per multiply-add

    def run_ffn():
        with amp():
            y = ffn(x_TD)
        return y

    def run_moe():
        with amp():
            y, aux = moe(x_TD)
        return y, aux

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

    def measure(name: str, fn, flops: float, extra: dict | None = None):
        res = {"name": name, "status": "ok", **(extra or {})}
        try:
            with torch.no_grad():
                fwd = time_repeats(fn, steps, warmup, dev)
            both = time_repeats(fwd_bwd(fn), steps, warmup, dev)
            # a lone layer of this size can be launch-bound (the host is slower than the GPU):
            # the kernels' own time says what the layer costs inside a GPU-bound training step
            res.update(fwd_ms=stats([t * 1e3 for t in fwd]), fwd_bwd_ms=stats([t * 1e3 for t in both]),
                       tflops_fwd_bwd=3 * flops / statistics.median(both) / 1e12,
                       kernel_ms_fwd_bwd=kernel_ms(fwd_bwd(fn), dev))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            res.update(status="oom", error=str(e).splitlines()[0][:200])
        free_memory(dev)
        _add(record, res, on_update)

    measure("dense", run_ffn, flops_fwd, {"what": f"FFN {d}->{hidden}->{d}"})
    impls = ["grouped", "loop"] if loop else ["grouped"]
    weights = moe.state_dict()
    for impl in impls:
        try:
            with dev:
                moe = MoE(d, hidden, d, experts, top_k=top_k, capacity_factor=capacity_factor, impl=impl)
        except RuntimeError as e:                        # grouped_mm missing in this torch
            _add(record, {"name": impl, "status": "unavailable", "error": str(e)}, on_update)
            continue
        moe.load_state_dict(weights)                     # both paths on the same weights
        with torch.no_grad(), amp():
            dropped = float(moe(x_TD)[1].dropped_frac)
        measure(impl, run_moe, flops_fwd * top_k,
                {"what": f"Switch MoE E={experts} top-{top_k} cf={capacity_factor}", "dropped_frac": dropped})
    if "grouped" in [r["name"] for r in record["results"] if r["status"] == "ok"]:
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

        res = {"name": "grouped_gemm_only", "status": "ok", "what": "2 grouped GEMMs, balanced groups"}
        with torch.no_grad():
            fwd = time_repeats(gemm_only, steps, warmup, dev)
        both = time_repeats(gemm_fwd_bwd, steps, warmup, dev)
        res.update(fwd_ms=stats([t * 1e3 for t in fwd]), fwd_bwd_ms=stats([t * 1e3 for t in both]),
                   tflops_fwd_bwd=3 * flops_fwd * top_k / statistics.median(both) / 1e12,
                   kernel_ms_fwd_bwd=kernel_ms(gemm_fwd_bwd, dev))
        _add(record, res, on_update)
    ms = {r["name"]: r["fwd_bwd_ms"]["median"] for r in record["results"] if r.get("status") == "ok"}
    kern = {r["name"]: r["kernel_ms_fwd_bwd"] for r in record["results"] if r.get("kernel_ms_fwd_bwd")}
    record["ratios"] = {k: v for k, v in {
        "grouped_over_dense": ms["grouped"] / ms["dense"] if {"grouped", "dense"} <= ms.keys() else None,
        "loop_over_grouped": ms["loop"] / ms["grouped"] if {"loop", "grouped"} <= ms.keys() else None,
        "grouped_over_gemm_only": ms["grouped"] / ms["grouped_gemm_only"]
        if {"grouped", "grouped_gemm_only"} <= ms.keys() else None,
        "grouped_over_dense_kernels": kern["grouped"] / kern["dense"] if {"grouped", "dense"} <= kern.keys() else None,
    }.items() if v is not None}
    return _finish(record, on_update)


# ---- memory against sequence length -------------------------------------------------------------


def memory_train_step(model, idx_BL, tgt_BL, amp, loss_chunk: int) -> None:
    """Forward + backward at one length (gradients freed afterwards)."""
    with amp():
        o = model(idx_BL, tgt_BL, return_logits=False, loss_chunk=loss_chunk)
        total = o.loss + o.aux_loss
    total.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def memory_prefill_step(model, idx_BL, amp) -> torch.Tensor:
    """Forward without grad; logits only for the last position (the head never sees the whole prompt)."""
    with amp():
        h_BLD, _ = model.hidden(idx_BL)
        return model.head(h_BLD[:, -1])


def bench_memory(cfgs: list[ModelConfig], *, lengths: list[int], batch: int = 1, dtype: str = "bf16",
                 device: str = "auto", impl: str = "auto", moe_impl: str = "auto", repeats: int = 2,
                 warmup: int = 1, loss_chunk: int | None = None, modes: tuple[str, ...] = ("train", "prefill"),
                 on_update: Update = None) -> dict:
    """Peak memory and median time per (variant, mode, length). An out-of-memory error is a result
    (status "oom"); longer lengths of the same variant and mode are then recorded as oom without running."""
    dev = resolve_device(device)
    impl = resolve_impl(impl, dev)
    loss_chunk = default_loss_chunk(dev) if loss_chunk is None else loss_chunk
    lengths = sorted(lengths)
    config = {"variants": [c.name for c in cfgs], "lengths": lengths, "batch": batch, "dtype": dtype,
              "impl": impl, "moe_impl": moe_impl, "repeats": repeats, "warmup": warmup,
              "loss_chunk": loss_chunk, "modes": list(modes)}
    record = new_record("bench-memory", config, dev)
    amp = amp_context(dtype, dev)
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build(cfg, impl, moe_impl, dev)
        static = allocated_gib(dev)
        oom_at: dict[str, int] = {}
        for mode in modes:
            model.train(mode == "train")
            for L in lengths:
                res = {"variant": cfg.name, "family": cfg.family, "mode": mode, "length": L, "batch": batch,
                       "tokens": batch * L, "impl": impl_of(model), "static_mem_gib": static}
                if mode in oom_at:
                    res.update(status="oom", skipped=True, note=f"not run: out of memory at length {oom_at[mode]}")
                else:
                    res.update(_memory_point(model, cfg, mode, batch, L, amp, loss_chunk, repeats, warmup, dev))
                    if res["status"] == "oom":
                        oom_at[mode] = L
                _add(record, res, on_update)
        del model
        free_memory(dev)
    return _finish(record, on_update)


def _memory_point(model, cfg, mode, batch, L, amp, loss_chunk, repeats, warmup, dev) -> dict:
    failed = None
    try:
        idx_BL = torch.randint(0, cfg.vocab_size, (batch, L + 1), device=dev)
        x_BL, y_BL = idx_BL[:, :-1], idx_BL[:, 1:]
        if mode == "train":
            fn = lambda: memory_train_step(model, x_BL, y_BL, amp, loss_chunk)   # noqa: E731
        else:
            fn = lambda: memory_prefill_step(model, x_BL, amp)                      # noqa: E731
        for _ in range(warmup):
            fn()
        sync(dev)
        reset_peak(dev)
        times = time_repeats(fn, repeats, 0, dev)
        out = {"status": "ok", "time_s": stats(times), "tokens_per_s": batch * L / statistics.median(times),
               "peak_mem_gib": peak_gib(dev)}
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        failed = str(e).splitlines()[0][:200] if str(e) else "out of memory"
    if failed is not None:                                 # outside the except: the traceback is gone
        model.zero_grad(set_to_none=True)
        free_memory(dev)
        return {"status": "oom", "error": failed}
    return out


# ---- generation ---------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device, gib: float = 1.0) -> dict | None:
    """Achieved HBM bandwidth, bytes/s: a read-only reduction and a copy (read + write) of `gib` GiB."""
    if device.type != "cuda":
        return None
    n = int(gib * GiB) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    read = statistics.median(time_repeats(lambda: x.sum(dtype=torch.float32), 10, 3, device))
    copy = statistics.median(time_repeats(lambda: y.copy_(x), 10, 3, device))
    del x, y
    free_memory(device)
    return {"read_bytes_s": 2 * n / read, "copy_bytes_s": 2 * 2 * n / copy, "buffer_gib": gib}


def kv_bytes_per_step(model, batch: int, ctx: float, elt: int) -> float:
    """Bytes of K and V that one decode step must read: every attention layer, ctx cached positions."""
    n = 0.0
    for block in model.blocks:
        m = block.mixer
        if hasattr(m, "load_prefill"):
            n += 2 * batch * m.n_head * m.d_head * ctx * elt
    return n


def bench_generate(cfgs: list[ModelConfig], *, prompt_lens: list[int], gen_len: int = 128, batch: int = 64,
                   cuda_graph: bool = False, dtype: str = "bf16", device: str = "auto", impl: str = "auto",
                   moe_impl: str = "auto", on_update: Update = None) -> dict:
    """Prefill time/memory and decode tokens/s per (variant, prompt length). The model's weights are
    cast to the benchmark dtype (no per-step autocast copies of the experts); greedy decoding."""
    from moebench.generate import Decoder, cast_for_inference, decoding

    dev = resolve_device(device)
    impl = resolve_impl(impl, dev)
    wdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    elt = torch.empty((), dtype=wdtype).element_size()
    bw = measure_bandwidth(dev)
    sheet = env.datasheet_bandwidth(env.device_name(dev)) if dev.type == "cuda" else None
    if bw:
        bandwidth, source = bw["read_bytes_s"], "measured (bf16 sum over 1 GiB)"
    elif sheet:
        bandwidth, source = sheet, "datasheet"
    else:
        bandwidth, source = None, None
    config = {"variants": [c.name for c in cfgs], "prompt_lens": sorted(prompt_lens), "gen_len": gen_len,
              "batch": batch, "cuda_graph": cuda_graph, "dtype": dtype, "impl": impl, "moe_impl": moe_impl,
              "sampling": "greedy", "moe_capacity": "dropless (capacity_factor None) while decoding"}
    record = new_record("bench-generate", config, dev)
    record["bandwidth"] = {"used_bytes_s": bandwidth, "source": source, "measured": bw, "datasheet_bytes_s": sheet}
    for cfg in cfgs:
        torch.manual_seed(0)
        model = cast_for_inference(build(cfg, impl, moe_impl, dev), wdtype).eval()
        with decoding(model):
            # warm-up: kernel selection and Triton compilation happen here, not in the timings
            _generate_point(model, cfg, Decoder, 16, 4, batch, cuda_graph, dev)
            for L in sorted(prompt_lens):
                res = {"variant": cfg.name, "family": cfg.family, "mixer": cfg.mixer, "prompt_len": L,
                       "gen_len": gen_len, "batch": batch,
                       "impl": {**impl_of(model), "cuda_graph": cuda_graph}}
                res.update(_generate_point(model, cfg, Decoder, L, gen_len, batch, cuda_graph, dev))
                if res["status"] == "ok":
                    res["prompt_logits_gib"] = batch * L * cfg.vocab_size * elt / GiB   # what prefill avoids
                    kv = kv_bytes_per_step(model, batch, L + (gen_len + 1) / 2, elt)
                    if kv:
                        res["kv_bytes_per_step"] = kv
                        if bandwidth:
                            res["kv_bound_ms"] = kv / bandwidth * 1e3
                            res["kv_bound_source"] = source
                            res["ratio_to_kv_bound"] = res["ms_per_step"] / res["kv_bound_ms"]
                        if sheet:
                            res["kv_bound_ms_datasheet"] = kv / sheet * 1e3
                _add(record, res, on_update)
        del model
        free_memory(dev)
    return _finish(record, on_update)


def _generate_point(model, cfg, Decoder, L, gen_len, batch, cuda_graph, dev) -> dict:
    failed = None
    try:
        prompt_BL = torch.randint(0, cfg.vocab_size, (batch, L), device=dev)
        out_BN = torch.empty(batch, gen_len, dtype=torch.long, device=dev)
        free_memory(dev)
        base = allocated_gib(dev)
        reset_peak(dev)
        dec = Decoder(model, batch, L + gen_len + 1, cuda_graph=cuda_graph)
        sync(dev)
        t0 = time.perf_counter()
        logits_BV = dec.prefill(prompt_BL)
        sync(dev)
        prefill_s = time.perf_counter() - t0
        prefill_peak = peak_gib(dev)
        reset_peak(dev)
        tok_B = logits_BV.argmax(-1)
        sync(dev)
        t0 = time.perf_counter()
        for i in range(gen_len):
            logits_BV = dec.step(tok_B)
            tok_B = logits_BV.argmax(-1)
            out_BN[:, i] = tok_B
        sync(dev)
        decode_s = time.perf_counter() - t0
        out = {"status": "ok", "prefill_s": prefill_s, "prefill_tokens_per_s": batch * L / prefill_s,
               "decode_s": decode_s, "ms_per_step": decode_s / gen_len * 1e3,
               "decode_tokens_per_s": batch * gen_len / decode_s, "state_bytes": dec.state_bytes(),
               "state_gib": dec.state_bytes() / GiB, "prefill_peak_gib": prefill_peak,
               "decode_peak_gib": peak_gib(dev), "base_mem_gib": base, "capture_s": dec.capture_s}
        del dec
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        failed = str(e).splitlines()[0][:200] if str(e) else "out of memory"
    free_memory(dev)
    if failed is not None:
        return {"status": "oom", "error": failed}
    return out
