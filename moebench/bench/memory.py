"""Peak memory and time of training (forward + backward) and prefill (no grad, last-position logits)
against sequence length. Running out of memory is a result (status "oom"), and the longer lengths
of the same variant and mode are then recorded as oom without running."""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from moebench.bench.common import (OnPoint, Session, allocated_gib, amp_context, build, free_memory, impl_of,
                                   oom_guard, peak_gib, reset_peak, mixer_request, stats, sync, time_repeats)
from moebench.config import ModelConfig
from moebench.env import resolve_device
from moebench.models.lm import default_loss_chunk


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
                 results: str | Path | None = None, on_point: OnPoint = None) -> list[dict]:
    """One row per (variant, mode, length), appended to `results`/bench.jsonl when it is given."""
    dev = resolve_device(device)
    impl = mixer_request(impl, dev)
    loss_chunk = default_loss_chunk(dev) if loss_chunk is None else loss_chunk
    lengths = sorted(lengths)
    config = {"variants": [c.name for c in cfgs], "lengths": lengths, "batch": batch, "dtype": dtype,
              "impl": impl, "moe_impl": moe_impl, "repeats": repeats, "warmup": warmup,
              "loss_chunk": loss_chunk, "modes": list(modes)}
    session = Session("bench-memory", config, dev, results, on_point)
    amp = amp_context(dtype, dev)
    for cfg in cfgs:
        torch.manual_seed(0)
        model = build(cfg, impl, moe_impl, dev)
        static = allocated_gib(dev)
        oom_at: dict[str, int] = {}
        for mode in modes:
            model.train(mode == "train")
            for L in lengths:
                res = {"variant": cfg.name, "family": cfg.family, "model": cfg.to_dict(), "mode": mode, "length": L,
                       "batch": batch,
                       "tokens": batch * L, "impl": impl_of(model), "static_mem_gib": static}
                if mode in oom_at:
                    res.update(status="oom", skipped=True, note=f"not run: out of memory at length {oom_at[mode]}")
                else:
                    res.update(oom_guard(lambda: _measure(model, cfg, mode, batch, L, amp, loss_chunk, repeats,
                                                          warmup, dev), dev))
                    if res["status"] == "oom":
                        model.zero_grad(set_to_none=True)         # a failed backward leaves some behind
                        free_memory(dev)
                        oom_at[mode] = L
                session.add(res)
        del model
        free_memory(dev)
    return session.rows


def _measure(model, cfg, mode, batch, L, amp, loss_chunk, repeats, warmup, dev) -> dict:
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
    return {"time_s": stats(times), "tokens_per_s": batch * L / statistics.median(times), "peak_mem_gib": peak_gib(dev)}
