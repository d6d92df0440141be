"""Learning-rate sweeps. The paper tuned each 25M model's peak learning rate separately (appendix A),
and at small budgets the rate moves the loss more than the architecture does (H100, 20M tokens,
32 x 1024: Mamba_25M val loss 4.19 at 1e-3 vs 4.41 at 5e-4). `sweep_lr` trains each variant
briefly at every rate of a grid, at a preset's scale, and appends one self-describing row per
variant to <out>/lr_sweeps.jsonl; `moebench run --lr-source sweep` then uses the best rate.

The sweep's own runs live in <out>/sweeps/ (runs.jsonl + runs/), apart from the ablations' rows;
a point already trained with the same config is reused, so widening a grid only trains the new rates.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from moebench import env
from moebench.ablations import SWEEPS_FILE, Hooks, Outcome, PlannedRun, data_identity, run_key
from moebench.config import TrainConfig
from moebench.data import default_data_dir, effective_corpus, prepare
from moebench.errors import UserError
from moebench.presets import ema_alpha_for, eval_every, presets, rule_of
from moebench.registry import get
from moebench.results import SCHEMA, append_record, load_records
from moebench.train import TrainingFailed, run_id_for, train


def parse_grid(text: str) -> list[float]:
    try:
        grid = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"bad --grid '{text}': use comma-separated rates, e.g. 2.5e-4,5e-4,1e-3") from None
    if not grid or any(not 0 < g < 1 for g in grid):
        raise UserError(f"--grid needs rates in (0, 1), got '{text}'")
    return grid


def sweep_preset(preset: str):
    """batch / ctx / scale of a preset (the same in every ablation; only budgets differ)."""
    table = presets(paper_tokens=1, with_100m=True)
    if preset not in table:
        raise UserError(f"unknown preset '{preset}' (presets: {', '.join(p for p in table if not rule_of(p).hidden)})")
    return table[preset]


def plan_sweep(variants: list[str], preset: str, grid: list[float], *, tokens: int | None = None,
               data_dir: str | Path | None = None, seed: int = 0):
    """(runs, data dir, corpus, data id): one short run per (variant, rate)."""
    p = sweep_preset(preset)
    rule = rule_of(preset)
    budget = tokens or rule.sweep_tokens
    steps = budget // (p.batch * p.ctx)
    if steps < 1:
        raise UserError(f"--tokens {budget} is less than one step of {p.batch} x {p.ctx}")
    if data_dir is not None:
        data_dir, corpus = Path(data_dir).expanduser().absolute(), ""
    else:
        corpus, data_dir = effective_corpus(rule.corpus), default_data_dir(rule.corpus)
    data_id, _ = data_identity(data_dir, corpus or data_dir.name)
    runs = []
    for name in dict.fromkeys(v.removesuffix("@tiny") for v in variants):
        cfg = get(name + "@tiny") if p.scale == "tiny" else get(name)
        for lr in grid:
            tcfg = TrainConfig(tokens=budget, batch=p.batch, micro_batch=p.micro_batch, ctx=p.ctx, lr=lr,
                               lr_source="user", seed=seed, ema_alpha=ema_alpha_for(preset, steps),
                               eval_every_tokens=eval_every(rule, steps, p.batch * p.ctx),
                               eval_batches=p.eval_batches, log_every=rule.log_every, data_dir=str(data_dir))
            tag = f"sweep-lr;preset={preset}"
            runs.append(PlannedRun(name, cfg, tcfg, tag, run_id_for(cfg, tcfg, tag),
                                   run_key(cfg, tcfg, f"sweep:{preset}", data_id), lr_note=f"grid {lr:g}"))
    return runs, data_dir, corpus, data_id


def sweep_lr(variants: list[str], preset: str, grid: list[float] | None = None, *, tokens: int | None = None,
             out: str | Path = "results", data_dir: str | Path | None = None, device: str = "auto",
             seed: int = 0, hooks: Hooks | None = None) -> list[dict]:
    """Train every (variant, rate) not trained yet and append one row per variant to
    <out>/lr_sweeps.jsonl: all points, the best rate (lowest final validation loss; the smoothed
    training loss where no validation ran), and whether it lies at the grid's edge. The grid
    defaults to the preset's (2.5e-4..2e-3 for the paper's shapes, 1e-3..8e-3 for the CPU twins)."""
    if not variants:
        raise UserError("name at least one variant (or --ablation NAME)")
    out = Path(out)
    sweep_out = out / "sweeps"
    dev = env.resolve_device(device)
    grid = list(grid or rule_of(preset).sweep_grid)
    runs, data_dir, corpus, _ = plan_sweep(variants, preset, grid, tokens=tokens, data_dir=data_dir, seed=seed)
    if corpus:
        prepare(corpus=rule_of(preset).corpus, out=data_dir)
    data_id, _ = data_identity(data_dir, corpus)
    for run in runs:
        run.run_key = run_key(run.cfg, run.tcfg, f"sweep:{preset}", data_id)
    hooks = hooks or Hooks()
    done = {r["run_key"]: r for r in load_records(sweep_out / "runs.jsonl")
            if r.get("status") == "done" and r.get("run_key")}
    points: dict[str, list[dict]] = {}
    for run in runs:
        row, error = done.get(run.run_key), ""
        if row is None:
            if hooks.on_start:
                hooks.on_start(run)
            resume = (sweep_out / "runs" / run.run_id / "ckpt.pt").exists()
            extra = {"sweep": "lr", "preset": preset, "run_key": run.run_key, "data_id": data_id,
                     "corpus": corpus or None, "ablation_variant": run.variant}
            progress = (lambda p, run=run: hooks.on_progress(run, p)) if hooks.on_progress else None
            try:
                row = train(run.cfg, run.tcfg, sweep_out, resume=resume, device=device, run_tag=run.run_tag,
                            extra=extra, on_progress=progress)
            except KeyboardInterrupt:
                raise
            except TrainingFailed as e:
                error = str(e)
            except Exception as e:                   # noqa: BLE001: one rate must not stop the sweep
                error = f"{type(e).__name__}: {e}"
            if hooks.on_end:
                hooks.on_end(Outcome(run, "done" if row else "failed", row, error))
        m = (row or {}).get("metrics", {})
        points.setdefault(run.variant, []).append({
            "lr": run.tcfg.lr, "run_id": run.run_id, "status": "done" if row else "failed", "error": error,
            "val_loss": m.get("val_loss"), "final_smoothed_loss": m.get("final_smoothed_loss"),
            "tokens_per_s": m.get("tokens_per_s"), "impl": (row or {}).get("impl")})
    rows = []
    envd = env.collect(dev)
    for run in {r.variant: r for r in runs}.values():
        pts = points[run.variant]
        metric = "val_loss" if all(pt["val_loss"] is not None for pt in pts if pt["status"] == "done") else "final_smoothed_loss"
        ok = [pt for pt in pts if pt["status"] == "done" and _finite(pt[metric])]
        best = min(ok, key=lambda pt: pt[metric]) if ok else None
        lrs = sorted(pt["lr"] for pt in pts)
        row = {
            "schema": SCHEMA, "kind": "lr_sweep", "variant": run.variant, "model_name": run.cfg.name,
            "variant_hash": run.cfg.config_hash(), "preset": preset, "tokens": run.tcfg.tokens,
            "batch": run.tcfg.batch, "ctx": run.tcfg.ctx, "micro_batch": run.tcfg.micro_batch,
            "seed": seed, "data_id": data_id, "metric": metric, "grid": lrs, "points": pts,
            "best_lr": best["lr"] if best else None, "best_loss": best[metric] if best else None,
            "at_grid_edge": bool(best) and len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]),
            "env": envd, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        append_record(out / SWEEPS_FILE, row)
        rows.append(row)
    return rows


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)
