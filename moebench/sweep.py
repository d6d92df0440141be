"""Learning-rate sweeps. The paper tuned each 25M model's peak learning rate separately (appendix A),
and at small budgets the rate moves the loss more than the architecture does (H100, 20M tokens,
32 x 1024: Mamba_25M val loss 4.19 at 1e-3 vs 4.41 at 5e-4). `sweep_lr` trains a variant briefly at
every rate of a log grid (factor 2), adds a point beyond an edge while the best rate sits on it, picks
the rate by the paper's metric (the final smoothed training loss; validation recorded beside it) and
appends one self-describing row per variant to <out>/lr_sweeps.jsonl. `sweep_families` sweeps one
member per model family (registry.SWEEP_VARIANTS); `moebench run --lr-source sweep` gives every
member the family's rate unless it has a sweep of its own, and reuses the winning run.

The sweep's own runs live in <out>/sweeps/ (runs.jsonl + runs/), apart from the ablations' rows;
a point already trained with the same config is reused, so widening a grid only trains the new rates.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from moebench import env
from moebench.ablations import SWEEPS_FILE, Hooks, Outcome, PlannedRun, data_identity, data_vocab, run_key
from moebench.config import TrainConfig
from moebench.data import default_data_dir, effective_corpus, prepare
from moebench.errors import UserError
from moebench.paths import LOCAL_RESULTS
from moebench.presets import ema_alpha_for, eval_every, preset_shape, rule_of
from moebench.registry import SWEEP_VARIANTS, fit_vocab, get
from moebench.results import SCHEMA, append_record, load_records
from moebench.train import TrainingFailed, run_id_for, train


MAX_EXTENSIONS = 3       # points added beyond a grid edge per sweep, at most


def sweep_run(name: str, preset: str, lr: float, data_dir: Path, data_id: str, *, tokens: int | None = None,
              seed: int = 0, compile: bool | None = None) -> PlannedRun:
    """The short run of variant `name` at rate `lr`: the preset's shapes and evaluation, its sweep
    budget (`tokens` when given). At a preset whose sweep budget is its run budget, this is the
    ablation's seed-`seed` run at that rate, but for its lr_source (ablations.make_plan reuses it)."""
    p = preset_shape(preset)
    rule = rule_of(preset)
    budget = tokens or rule.sweep_tokens
    steps = budget // (p.batch * p.ctx)
    if steps < 1:
        raise UserError(f"--tokens {budget} is less than one step of {p.batch} x {p.ctx}")
    cfg = fit_vocab(get(name + "@tiny") if p.scale == "tiny" else get(name), data_vocab(data_dir, rule.vocab))
    tcfg = TrainConfig(tokens=budget, batch=p.batch, micro_batch=p.micro_batch, ctx=p.ctx, lr=lr, lr_source="user",
                       seed=seed, ema_alpha=ema_alpha_for(preset, steps),
                       eval_every_tokens=eval_every(rule, steps, p.batch * p.ctx), eval_batches=p.eval_batches,
                       log_every=rule.log_every, data_dir=str(data_dir), compile=compile)
    tag = f"sweep-lr;preset={preset}"
    return PlannedRun(name, cfg, tcfg, tag, run_id_for(cfg, tcfg, tag), run_key(cfg, tcfg, f"sweep:{preset}", data_id),
                      lr_note=f"grid {lr:g}")


def sweep_data(preset: str, data_dir: str | Path | None) -> tuple[Path, str, str]:
    """(data folder, corpus name or "" for --data, data id), the preset's corpus prepared if missing."""
    if data_dir is not None:
        folder, corpus = Path(data_dir).expanduser().absolute(), ""
        if not (folder / "manifest.json").is_file():      # refused once, not at every rate
            raise UserError(f"--data {folder}: no prepared data there (no manifest.json); prepare it first: "
                            f"moebench data prepare --input YOUR_TEXT_FOLDER --out {folder}")
    else:
        rule = rule_of(preset)
        corpus, folder = effective_corpus(rule.corpus), default_data_dir(rule.corpus, rule.vocab)
        prepare(corpus=rule.corpus, out=folder, vocab=rule.vocab)
    return folder, corpus, data_identity(folder, corpus or folder.name)[0]


def sweep_families(variants: list[str], preset: str, grid: list[float] | None = None, **kw) -> list[dict]:
    """sweep_lr of the families of `variants`: each family's member in registry.SWEEP_VARIANTS."""
    families = dict.fromkeys(get(v.removesuffix("@tiny")).family for v in variants)
    unknown = [f for f in families if f not in SWEEP_VARIANTS]
    if unknown:
        raise UserError(f"no sweep variant for the famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                        f"registered: sweep the variants themselves (moebench sweep lr VARIANT...)")
    return sweep_lr([SWEEP_VARIANTS[f] for f in families], preset, grid, **kw)


def sweep_lr(variants: list[str], preset: str, grid: list[float] | None = None, *, tokens: int | None = None,
             out: str | Path = LOCAL_RESULTS, data_dir: str | Path | None = None, device: str = "auto",
             seed: int = 0, hooks: Hooks | None = None, compile: bool | None = None, ckpt_every_steps: int = 0,
             ckpt_minutes: float | None = None) -> list[dict]:
    """Sweep each variant: train every rate of the grid not trained yet (default: the preset's,
    2.5e-4..2e-3 for the paper's shapes, 1e-3..8e-3 for the CPU twins), then, while the best rate
    (lowest final smoothed training loss) lies on an edge, one more rate beyond it (x2 or /2, at most
    MAX_EXTENSIONS). Appends one row per variant to <out>/lr_sweeps.jsonl and returns the rows."""
    if not variants:
        raise UserError("name at least one variant (or --ablation NAME)")
    out = Path(out)
    dev = env.resolve_device(device)
    preset_shape(preset)                                 # a bad preset fails before the data is prepared
    data_dir, corpus, data_id = sweep_data(preset, data_dir)
    envd = env.collect(dev)
    rows = []
    for name in dict.fromkeys(v.removesuffix("@tiny") for v in variants):
        lrs = sorted(set(grid or rule_of(preset).sweep_grid))
        points: dict[float, dict] = {}
        extensions = 0
        while True:
            for lr in lrs:
                if lr not in points:
                    run = sweep_run(name, preset, lr, data_dir, data_id, tokens=tokens, seed=seed, compile=compile)
                    points[lr] = _train_point(run, out / "sweeps", preset, data_id, corpus, device, hooks or Hooks(),
                                              ckpt_every_steps=ckpt_every_steps, ckpt_minutes=ckpt_minutes)
            best = _best(points.values())
            edge = best is not None and len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])
            if not edge or extensions == MAX_EXTENSIONS:
                break
            lrs = [lrs[0] / 2] + lrs if best["lr"] == lrs[0] else lrs + [lrs[-1] * 2]
            extensions += 1
        run = sweep_run(name, preset, lrs[0], data_dir, data_id, tokens=tokens, seed=seed, compile=compile)
        row = {
            "schema": SCHEMA, "kind": "lr_sweep", "variant": name, "family": run.cfg.family,
            "model_name": run.cfg.name, "variant_hash": run.cfg.config_hash(), "preset": preset,
            "tokens": run.tcfg.tokens, "batch": run.tcfg.batch, "ctx": run.tcfg.ctx,
            "micro_batch": run.tcfg.micro_batch, "seed": seed, "data_id": data_id, "metric": "final_smoothed_loss",
            "grid": lrs, "extensions": extensions, "points": [points[lr] for lr in lrs],
            "best_lr": best["lr"] if best else None, "best_loss": best["final_smoothed_loss"] if best else None,
            "best_val_loss": best["val_loss"] if best else None,
            "best_run_id": best["run_id"] if best else None, "at_grid_edge": edge,
            "env": envd, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        append_record(out / SWEEPS_FILE, row)
        rows.append(row)
    return rows


def _train_point(run: PlannedRun, sweep_out: Path, preset: str, data_id: str, corpus: str, device: str,
                 hooks: Hooks, **ckpt_every) -> dict:
    """One rate: the run's row from sweeps/runs.jsonl when it was trained before, else train it."""
    done = {r["run_key"]: r for r in load_records(sweep_out / "runs.jsonl")
            if r.get("status") == "done" and r.get("run_key")}
    row, error = done.get(run.run_key), ""
    if row is None:
        if hooks.on_start:
            hooks.on_start(run)
        resume = (sweep_out / "runs" / run.run_id / "ckpt.pt").exists()
        extra = {"sweep": "lr", "preset": preset, "run_key": run.run_key, "data_id": data_id,
                 "corpus": corpus or None, "ablation_variant": run.variant}
        progress = (lambda p: hooks.on_progress(run, p)) if hooks.on_progress else None
        try:
            row = train(run.cfg, run.tcfg, sweep_out, resume=resume, device=device, run_tag=run.run_tag,
                        extra=extra, on_progress=progress, **ckpt_every)
        except KeyboardInterrupt:
            raise
        except TrainingFailed as e:
            error = str(e)
        except Exception as e:                   # noqa: BLE001: one rate must not stop the sweep
            error = f"{type(e).__name__}: {e}"
        if hooks.on_end:
            hooks.on_end(Outcome(run, "done" if row else "failed", row, error))
    m = (row or {}).get("metrics", {})
    return {"lr": run.tcfg.lr, "run_id": run.run_id, "run_key": run.run_key, "status": "done" if row else "failed",
            "error": error, "final_smoothed_loss": m.get("final_smoothed_loss"), "val_loss": m.get("val_loss"),
            "tokens_per_s": m.get("tokens_per_s"), "impl": (row or {}).get("impl")}


def _best(points) -> dict | None:
    """The point of the lowest final smoothed training loss (the paper's metric) among finished ones."""
    ok = [pt for pt in points if pt["status"] == "done" and _finite(pt["final_smoothed_loss"])]
    return min(ok, key=lambda pt: pt["final_smoothed_loss"]) if ok else None


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)
