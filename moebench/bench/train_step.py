"""Whole training steps (forward, backward, gradient clipping, fused AdamW) per variant, with the
dense-equivalent and per-expert-loop baselines of every MoE variant. A MoE variant's ratios to its
baselines are not stored: the report divides the tokens/s of rows of one session."""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from moebench import env
from moebench.bench.common import (OnPoint, Session, amp_context, build, has_moe, impl_of, oom_guard, peak_gib,
                                   mixer_request, reset_peak, stats, sync, time_repeats)
from moebench.config import ModelConfig
from moebench.env import resolve_device
from moebench.models.lm import default_loss_chunk, flops_per_token
from moebench.impl import resolve_adamw
from moebench.optim import clip_grad_norm, make_optimizer


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """Each MoE replaced by one dense FFN of the expert's size (same active parameters)."""
    return replace(cfg, ffn="dense", name=cfg.name + "[dense-eq]")


def train_one(cfg: ModelConfig, *, batch: int, ctx: int, dtype: str, compile: bool, steps: int, warmup: int,
              device: torch.device, impl: str, moe_impl: str, loss_chunk: int, label: str | None = None,
              baseline: str | None = None, of: str | None = None, moe_override: str | None = None) -> dict:
    """One result: the median time of a whole training step on random tokens; `baseline` names what
    it is a baseline of (`of`, the MoE variant)."""
    res = {"variant": label or cfg.name, "of": of, "baseline": baseline, "model": cfg.to_dict()}
    res.update(oom_guard(lambda: time_train_step(cfg, batch, ctx, dtype, compile, steps, warmup, device, impl,
                                                 moe_impl, loss_chunk, moe_override), device))
    return res


def make_train_step(cfg, batch, ctx, dtype, compile, device, impl, moe_impl, loss_chunk, moe_override=None):
    """(model, step): the model built as `build` does and one whole training step on a fixed random
    batch (forward, backward, clipping, the optimizer of the model's Impl.adamw), as train.py runs it."""
    torch.manual_seed(0)
    model = build(cfg, impl, moe_impl, device, moe_override)
    model.train()
    opt = make_optimizer(model, 1e-4)    # as train.py: the step of the model's Impl.adamw
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

    return model, step


def time_train_step(cfg, batch, ctx, dtype, compile, steps, warmup, device, impl, moe_impl, loss_chunk,
                    moe_override) -> dict:
    model, step = make_train_step(cfg, batch, ctx, dtype, compile, device, impl, moe_impl, loss_chunk, moe_override)
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
                baselines: bool = True, results: str | Path | None = None, on_point: OnPoint = None) -> list[dict]:
    """Every variant, each MoE variant followed by its `dense-equivalent` and `loop` baselines. One row
    per result, appended to `results`/bench.jsonl when it is given; returns the session's rows."""
    dev = resolve_device(device)
    impl = mixer_request(impl, dev)
    loss_chunk = default_loss_chunk(dev) if loss_chunk is None else loss_chunk
    config = {"variants": [c.name for c in cfgs], "batch": batch, "ctx": ctx, "dtype": dtype, "compile": compile,
              "steps": steps, "warmup": warmup, "impl": impl, "moe_impl": moe_impl, "loss_chunk": loss_chunk,
              "baselines": baselines, "adamw": resolve_adamw("auto", dev), "grad_clip": 0.5}
    session = Session("bench-train", config, dev, results, on_point)
    kw = dict(batch=batch, ctx=ctx, dtype=dtype, compile=compile, steps=steps, warmup=warmup, device=dev,
              impl=impl, moe_impl=moe_impl, loss_chunk=loss_chunk)
    for cfg in cfgs:
        session.add(train_one(cfg, **kw))
        if not (baselines and has_moe(cfg)):
            continue
        if cfg.ffn == "moe":         # dense_equivalent swaps the block's FFN; an inner MoE has none to swap
            session.add(train_one(dense_equivalent(cfg), baseline="dense-equivalent", of=cfg.name, **kw))
        session.add(train_one(cfg, label=cfg.name + "[loop]", baseline="loop", of=cfg.name, moe_override="loop",
                              **kw))
    return session.rows
