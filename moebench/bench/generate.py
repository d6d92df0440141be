"""Prefill and step decoding against context length: decode tokens/s, memory, the (constant) state
of Mamba models and the KV-cache bandwidth bound of attention models. Greedy decoding; the model's
weights are cast to the benchmark dtype (no per-step autocast copies of the experts)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from moebench import env
from moebench.bench.common import (GiB, OnPoint, Session, allocated_gib, build, free_memory, impl_of,
                                   mixer_request, oom_guard, peak_gib, reset_peak,
                                   sync, time_repeats)
from moebench.config import ModelConfig
from moebench.env import resolve_device
from moebench.generate import Decoder, cast_for_inference, decoding


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
    if model.cfg.mixer != "attention":
        return 0.0
    return sum(2 * batch * b.mixer.n_head * b.mixer.d_head * ctx * elt for b in model.blocks)


def bench_generate(cfgs: list[ModelConfig], *, prompt_lens: list[int], gen_len: int = 128, batch: int = 64,
                   cuda_graph: bool = False, dtype: str = "bf16", device: str = "auto", impl: str = "auto",
                   moe_impl: str = "auto", results: str | Path | None = None, on_point: OnPoint = None) -> list[dict]:
    """One row per (variant, prompt length), appended to `results`/bench.jsonl when it is given.
    Every row carries the bandwidth its KV bound divides by (measured once per session)."""
    dev = resolve_device(device)
    impl = mixer_request(impl, dev)
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
    session = Session("bench-generate", config, dev, results, on_point)
    used = {"used_bytes_s": bandwidth, "source": source, "measured": bw, "datasheet_bytes_s": sheet}
    for cfg in cfgs:
        torch.manual_seed(0)
        model = cast_for_inference(build(cfg, impl, moe_impl, dev), wdtype).eval()
        with decoding(model):
            # warm-up: kernel selection and Triton compilation happen here, not in the timings
            oom_guard(lambda: decode_point(model, cfg, 16, 4, batch, cuda_graph, dev), dev)
            for L in sorted(prompt_lens):
                res = {"variant": cfg.name, "family": cfg.family, "mixer": cfg.mixer, "model": cfg.to_dict(),
                       "prompt_len": L, "gen_len": gen_len, "batch": batch, "bandwidth": used,
                       "impl": {**impl_of(model), "cuda_graph": cuda_graph}}
                res.update(oom_guard(lambda: decode_point(model, cfg, L, gen_len, batch, cuda_graph, dev), dev))
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
                session.add(res)
        del model
        free_memory(dev)
    return session.rows


def decode_point(model, cfg, L: int, gen_len: int, batch: int, cuda_graph: bool, dev: torch.device) -> dict:
    """Prefill a random prompt of L tokens, then time gen_len greedy decode steps."""
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
    return {"prefill_s": prefill_s, "prefill_tokens_per_s": batch * L / prefill_s,
            "decode_s": decode_s, "ms_per_step": decode_s / gen_len * 1e3,
            "decode_tokens_per_s": batch * gen_len / decode_s, "state_bytes": dec.state_bytes(),
            "state_gib": dec.state_bytes() / GiB, "prefill_peak_gib": prefill_peak,
            "decode_peak_gib": peak_gib(dev), "base_mem_gib": base, "capture_s": dec.capture_s}
