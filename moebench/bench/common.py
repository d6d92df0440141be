"""What every benchmark shares: timing, memory, autocast, the out-of-memory guard, the session that
turns measured points into result rows, and how a benchmark builds a model and reads back which
implementation it runs.

Timing follows torch's Timer / triton's do_bench: warm up, then time each repeat with CUDA events
(perf_counter on CPU), take the median and store every repeat. Peak memory is reset before the
measured repeats.
"""
from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from moebench import env
from moebench.config import ModelConfig
from moebench.errors import UserError
from moebench.models.lm import build_model
from moebench.results import FILES, append_record, bench_row, new_session

GiB = 2**30
OnPoint = Callable[[dict], None] | None


# ---- sessions: one invocation, one row per point ------------------------------------------------


class Session:
    """One invocation of a benchmark. `add(result)` turns a measured point into a row, appends it to
    the results folder's bench.jsonl at once (so an interrupted benchmark keeps what it measured) and
    hands it to on_point (the CLI's progress line)."""

    def __init__(self, kind: str, config: dict, device: torch.device, results: str | Path | None = None,
                 on_point: OnPoint = None):
        self.kind, self.config, self.on_point = kind, config, on_point
        self.id = new_session()
        self.env = env.collect(device)
        self.device = env.device_name(device)
        if results is not None and Path(results).exists() and not Path(results).is_dir():
            raise UserError(f"{results} is a file: --out names the results folder (rows go to OUT/{FILES[kind]})")
        self.path = Path(results) / FILES[kind] if results is not None else None
        self.rows: list[dict] = []

    def add(self, result: dict) -> dict:
        row = bench_row(self.kind, self.id, self.config, result, env=self.env, device=self.device)
        if self.path is not None:
            append_record(self.path, row)
        self.rows.append(row)
        if self.on_point:
            self.on_point(row)
        return result


# ---- timing -------------------------------------------------------------------------------------


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


# ---- memory -------------------------------------------------------------------------------------


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


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def oom_guard(measure: Callable[[], dict], device: torch.device) -> dict:
    """{"status": "ok", **measure()}, or {"status": "oom", "error": ...} when measure runs out of
    memory (any other error propagates). Memory is freed afterwards either way, outside the except
    block: the traceback's frames hold the failed step's activations until it ends."""
    failed = None
    try:
        out = {"status": "ok", **measure()}
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        failed = str(e).splitlines()[0][:200] if str(e) else "out of memory"
    free_memory(device)
    return out if failed is None else {"status": "oom", "error": failed}


def amp_context(dtype: str, device: torch.device):
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "fp32":
        return nullcontext
    raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")


# ---- building models and reading back their implementation --------------------------------------


def mixer_request(impl: str, device: torch.device) -> str:
    """'auto' asks for the mamba-ssm kernels on CUDA, so that a missing kernel fails the benchmark
    instead of timing the reference as "the Mamba number"; the reference on CPU."""
    if impl == "auto":
        return "fast" if device.type == "cuda" else "ref"
    return impl


def has_moe(cfg: ModelConfig) -> bool:
    return cfg.ffn == "moe" or bool(cfg.inner_moe)


def impl_of(model, compiled: bool = False) -> dict:
    """What a result records of the model's implementation: its Impl (moebench/impl.py), compiled or not."""
    return {**model.impl.to_dict(), "compile": compiled}


def build(cfg: ModelConfig, impl: str, moe_impl: str, device: torch.device, moe_override: str | None = None):
    """The model on `device` with the mixer `impl` and the MoE path `moe_override or moe_impl`."""
    return build_model(cfg, impl={"mixer": impl, "moe": moe_override or moe_impl}, device=device)
