"""Ablations: the paper's tables as runnable studies. Each spec in experiments/*.py names its
variants, its baseline and a token budget per preset; moebench.specs loads them, this module turns one into a
plan (which runs, with which train config), prepares the data and runs what is missing. What a
preset decides lives in moebench.presets, the --dry-run time estimates in moebench.estimate.

A run's identity (`run_key`) is its model's config hash + the preset + a hash of its train config
and of the data it reads (corpus name and token counts, not paths), so identical runs are shared
between ablations (table 4's Mamba_25M is table 3's) and between machines' result files.
"""
from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from moebench import env
from moebench.config import ModelConfig, TrainConfig, default_lr, stable_hash
from moebench.data import VOCAB_SIZE, default_data_dir, effective_corpus, prepare
from moebench.errors import RunBusy, UserError
from moebench.paths import LOCAL_RESULTS
from moebench.presets import DEFAULT_PRESET, EMA_RULE, ema_alpha_for, eval_every, rule_of
from moebench.registry import SWEEP_VARIANTS, fit_vocab, get
from moebench.results import SCHEMA, append_record, load_records
# the specs' loading lives in moebench.specs (no torch); its names stay importable from here
from moebench.specs import REPO_ROOT, Spec, get_ablation, get_spec, load_specs, resolve_variants  # noqa: F401
from moebench.train import TrainingFailed, run_id_for, train

SWEEPS_FILE = "lr_sweeps.jsonl"


# --- planning --------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    variant: str                 # the ablation's name for it (e.g. Mamba_25M)
    cfg: ModelConfig             # what is trained (the @tiny twin at tiny scale)
    tcfg: TrainConfig
    run_tag: str
    run_id: str
    run_key: str = ""            # identity for skipping and reporting (see module docstring)
    status: str = "todo"         # todo | done | resume (a checkpoint exists) | reuse (the sweep trained it)
    lr_note: str = ""
    sweep_key: str = ""          # the run_key the sweep's run of the same training has (lr_source sweep)


@dataclass
class Plan:
    ablation: str
    preset: str
    baseline: str
    corpus: str                  # "" when the user gave --data
    data_dir: Path
    data_id: str                 # corpus + token counts once prepared; "<corpus>:unprepared" before
    n_train_tokens: int | None
    lr_source: str
    runs: list[PlannedRun]
    out: Path
    allow_repeat: bool = False

    @property
    def epochs(self) -> float | None:
        if not self.n_train_tokens or not self.runs:
            return None
        return max(r.tcfg.tokens for r in self.runs) / self.n_train_tokens


def data_identity(data_dir: Path, fallback: str) -> tuple[str, int | None]:
    """(data id, train tokens): the corpus name and token counts of a prepared folder, which are
    the same on every machine that prepares the same inputs; paths are not part of it."""
    try:
        m = json.loads((data_dir / "manifest.json").read_text())
        name = m.get("corpus") or Path(m.get("input") or data_dir).name
        n_train, n_val = m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]
        return f"{name}:{n_train}+{n_val}", n_train
    except (OSError, ValueError, KeyError, TypeError):
        return f"{fallback}:unprepared", None


def run_key(cfg: ModelConfig, tcfg: TrainConfig, preset: str, data_id: str) -> str:
    train = tcfg.to_dict()
    train.pop("data_dir")
    return f"{cfg.config_hash()}-{stable_hash({'train': train, 'preset': preset, 'data': data_id})[:10]}"


def data_vocab(data_dir: Path, vocab: int | None = None) -> int:
    """The tokenizer's size of a prepared folder (its manifest), else `vocab` (to be learned), else GPT-2's."""
    try:
        return json.loads((Path(data_dir) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return vocab or VOCAB_SIZE


def make_plan(name: str, preset: str = DEFAULT_PRESET, *, only: list[str] | None = None,
              seeds: int | None = None, lr_source: str | None = None, out: str | Path = LOCAL_RESULTS,
              data_dir: str | Path | None = None, tokens: int | None = None,
              allow_repeat: bool = False, compile: bool | None = None) -> Plan:
    """Which runs `moebench run NAME --preset PRESET` would do, and their status in `out`. Learning
    rates: the paper's (lr_source "default"), the sweeps' ("sweep": a variant's own sweep, else its
    family's) or the preset's one rate ("preset", cpu-tiny); None takes the preset's choice."""
    spec = get_spec(name)
    p = spec.preset(preset)
    rule = rule_of(preset)
    lr_source = lr_source or rule.lr_source
    if lr_source not in ("default", "sweep", "preset") or (lr_source == "preset" and rule.lr is None):
        raise UserError(f"unknown --lr-source '{lr_source}': use default or sweep"
                        + (" or preset" if rule.lr is not None else ""))
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().absolute()
        corpus = ""
        if not (data_dir / "manifest.json").is_file():
            raise UserError(f"--data {data_dir}: no prepared data there (no manifest.json); prepare it "
                            f"first: moebench data prepare --input YOUR_TEXT_FOLDER --out {data_dir}")
    else:
        corpus = effective_corpus(rule.corpus)
        data_dir = default_data_dir(rule.corpus, rule.vocab)
    data_id, n_train = data_identity(data_dir, corpus or data_dir.name)
    vocab = data_vocab(data_dir, rule.vocab)
    budget = tokens or p.tokens
    steps = budget // (p.batch * p.ctx)
    if steps < 1:
        raise UserError(f"{budget} tokens is less than one step of {p.batch} x {p.ctx}")
    swept = load_sweeps(out) if lr_source == "sweep" else {}
    runs, missing = [], []
    for v in resolve_variants(spec, preset, only):
        base = get(v)
        cfg = fit_vocab(get(v + "@tiny") if p.scale == "tiny" else base, vocab)
        if lr_source == "sweep":
            own = swept.get((cfg.config_hash(), preset, p.batch, p.ctx, data_id))
            best = own or swept.get((("family", cfg.family), preset, p.batch, p.ctx, data_id))
            if best is None:
                missing.append(v)
                continue
            lr = best["best_lr"]
            note = f"{'own' if own else cfg.family + ' family'} sweep {best['finished'][:10]}"
        elif lr_source == "preset":
            lr, note = rule.lr, "the preset's rate for all"
        else:
            lr, note = default_lr(base), "paper default"
        for seed in range(seeds or spec.ablation.seeds(preset, v)):
            tcfg = TrainConfig(tokens=budget, batch=p.batch, micro_batch=p.micro_batch, ctx=p.ctx, lr=lr,
                               lr_source=lr_source, seed=seed, ema_alpha=ema_alpha_for(preset, steps),
                               eval_every_tokens=eval_every(rule, steps, p.batch * p.ctx),
                               eval_batches=p.eval_batches, log_every=rule.log_every, data_dir=str(data_dir),
                               compile=compile)
            tag = f"preset={preset}"
            # the sweep's run at this rate is this run, when the sweep's budget is the preset's
            same = run_key(cfg, replace(tcfg, lr_source="user"), f"sweep:{preset}", data_id) if lr_source == "sweep" else ""
            runs.append(PlannedRun(v, cfg, tcfg, tag, run_id_for(cfg, tcfg, tag),
                                   run_key(cfg, tcfg, preset, data_id), lr_note=note, sweep_key=same))
    if missing:
        data_flag = f" --data {data_dir}" if not corpus else ""
        raise UserError(f"no learning-rate sweep at preset {preset} on data {data_id} for {', '.join(missing)} or "
                        f"their families in {out / SWEEPS_FILE}: run `moebench sweep lr --ablation {name} "
                        f"--preset {preset}{data_flag}` first (one sweep per family), or use --lr-source default")
    plan = Plan(name, preset, spec.baseline(preset), corpus, data_dir, data_id, n_train, lr_source, runs, out,
                allow_repeat)
    refresh_status(plan)
    return plan


def refresh_status(plan: Plan) -> None:
    done = {r.get("run_key") for r in load_records(plan.out / "runs.jsonl")
            if r.get("status") == "done" and r.get("kind") == "train"}
    swept = {r.get("run_key") for r in load_records(plan.out / "sweeps" / "runs.jsonl") if r.get("status") == "done"}
    for run in plan.runs:
        if run.run_key in done:
            run.status = "done"
        elif run.sweep_key and run.sweep_key in swept:
            run.status = "reuse"                  # trained by the sweep: recorded, not trained again
        elif (plan.out / "runs" / run.run_id / "ckpt.pt").exists():
            run.status = "resume"
        else:
            run.status = "todo"


def load_sweeps(out: str | Path) -> dict[tuple, dict]:
    """(model config hash, preset, batch, ctx, data id) -> the latest sweep row of that model, and
    (("family", family), preset, batch, ctx, data id) -> the latest of the family's sweep variant."""
    best: dict[tuple, dict] = {}
    for r in load_records(Path(out) / SWEEPS_FILE):
        if r.get("kind") == "lr_sweep" and r.get("best_lr") is not None:
            where = (r["preset"], r["batch"], r["ctx"], r.get("data_id"))
            best[(r["variant_hash"], *where)] = r
            if r.get("family") and SWEEP_VARIANTS.get(r["family"]) == r["variant"]:
                best[(("family", r["family"]), *where)] = r
    return best


def ensure_data(plan: Plan) -> Plan:
    """Prepare the preset's corpus if missing, then refuse a budget that repeats it too often."""
    if plan.corpus:
        prepare(corpus=rule_of(plan.preset).corpus, out=plan.data_dir, vocab=rule_of(plan.preset).vocab)
    data_id, n_train = data_identity(plan.data_dir, plan.corpus)
    plan.data_id, plan.n_train_tokens = data_id, n_train
    for run in plan.runs:
        run.run_key = run_key(run.cfg, run.tcfg, plan.preset, data_id)
        if run.sweep_key:
            run.sweep_key = run_key(run.cfg, replace(run.tcfg, lr_source="user"), f"sweep:{plan.preset}", data_id)
    check_epochs(plan)
    refresh_status(plan)
    return plan


def check_epochs(plan: Plan) -> None:
    limit = rule_of(plan.preset).max_epochs
    epochs = plan.epochs
    if limit is None or epochs is None or plan.allow_repeat or epochs <= limit:
        return
    tokens = max(r.tcfg.tokens for r in plan.runs)
    raise UserError(
        f"preset {plan.preset}: {tokens:,} tokens per run is {epochs:.2f} passes over {plan.data_dir} "
        f"({plan.n_train_tokens:,} training tokens); this preset allows at most {limit:g}. Pass "
        f"--allow-repeat to repeat the data (epochs are recorded in every row), or point --data at a "
        f"larger prepared corpus (e.g. C4)")


# --- running ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    run: PlannedRun
    status: str                  # done | skipped | failed | interrupted
    row: dict | None = None
    error: str = ""


@dataclass
class Hooks:
    """Callbacks for a progress display; all optional."""
    on_start: Callable[[PlannedRun], None] | None = None
    on_progress: Callable[[PlannedRun, object], None] | None = None
    on_end: Callable[[Outcome], None] | None = None


def execute(plan: Plan, *, device: str = "auto", resume: bool = False, hooks: Hooks | None = None,
            ckpt_every_steps: int = 0, ckpt_minutes: float | None = None) -> list[Outcome]:
    """Run every planned run that is not done. A failing run (an exception, or a NaN loss:
    TrainingFailed) is recorded and the next one starts; Ctrl-C stops the whole ablation."""
    env.resolve_device(device)                      # a bad device fails once, before any run
    hooks = hooks or Hooks()
    outcomes = []
    for run in plan.runs:
        refresh_status(plan)                    # another process may have finished or started it meanwhile
        if run.status == "done":
            outcomes.append(Outcome(run, "skipped"))
            continue
        if run.status == "reuse":
            outcomes.append(Outcome(run, "reused", _record_reuse(plan, run)))
            if hooks.on_end:
                hooks.on_end(outcomes[-1])
            continue
        if run.status == "resume" and not resume:
            outcomes.append(Outcome(run, "interrupted", error=f"has a checkpoint in {plan.out / 'runs' / run.run_id}: "
                                                               f"pass --resume to continue it"))
            if hooks.on_end:
                hooks.on_end(outcomes[-1])
            continue
        if hooks.on_start:
            hooks.on_start(run)
        extra = {"ablation": plan.ablation, "preset": plan.preset, "ablation_variant": run.variant,
                 "run_key": run.run_key, "data_id": plan.data_id, "corpus": plan.corpus or None,
                 "ema_rule": EMA_RULE, "lr_note": run.lr_note}
        progress = (lambda p, run=run: hooks.on_progress(run, p)) if hooks.on_progress else None
        try:
            row = train(run.cfg, run.tcfg, plan.out, resume=run.status == "resume", device=device,
                        run_tag=run.run_tag, extra=extra, on_progress=progress, ckpt_every_steps=ckpt_every_steps,
                        ckpt_minutes=ckpt_minutes)
            if not math.isfinite(row["metrics"].get("final_smoothed_loss") or math.nan):
                raise TrainingFailed(f"{run.cfg.name}: final smoothed loss is not finite")
            outcome = Outcome(run, "done", row)
        except KeyboardInterrupt:
            raise
        except RunBusy as e:                    # another process is training this run: not a failure
            outcome = Outcome(run, "skipped", error=str(e))
        except TrainingFailed as e:
            outcome = Outcome(run, "failed", error=str(e))
        except Exception as e:                   # noqa: BLE001: one variant must not stop the others
            outcome = Outcome(run, "failed", error=f"{type(e).__name__}: {e}")
            _record_failure(plan, run, extra, device, traceback.format_exc())
        outcomes.append(outcome)
        if hooks.on_end:
            hooks.on_end(outcome)
    return outcomes


def _record_reuse(plan: Plan, run: PlannedRun) -> dict:
    """The sweep's run of this training (seed, rate, budget, evaluation all equal) as this run's row:
    its numbers and curve, this ablation's tags, lr_source "sweep", and where it came from."""
    sweep_rows = [r for r in load_records(plan.out / "sweeps" / "runs.jsonl")
                  if r.get("run_key") == run.sweep_key and r.get("status") == "done"]
    src = sweep_rows[-1]
    row = {**src, "ablation": plan.ablation, "preset": plan.preset, "ablation_variant": run.variant,
           "run_key": run.run_key, "data_id": plan.data_id, "corpus": plan.corpus or None, "ema_rule": EMA_RULE,
           "lr_note": run.lr_note, "train": {**src["train"], "lr_source": "sweep"},
           "curve": f"sweeps/runs/{src['run_id']}/curve.csv",     # relative to the results folder
           "reused_from": {"file": "sweeps/runs.jsonl", "run_id": src["run_id"], "run_key": src["run_key"]}}
    row.pop("sweep", None)
    append_record(plan.out / "runs.jsonl", row)
    return row


def _record_failure(plan: Plan, run: PlannedRun, extra: dict, device: str, tb: str) -> None:
    """train() records NaN failures itself; any other exception gets a row here, so that the
    results say what was tried."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    append_record(plan.out / "runs.jsonl", {
        "schema": SCHEMA, "kind": "train", "run_id": run.run_id, "status": "failed",
        "reason": tb.strip().splitlines()[-1][:500], "traceback": tb[-4000:],
        "variant": run.cfg.name, "variant_hash": run.cfg.config_hash(), "seed": run.tcfg.seed,
        "model": run.cfg.to_dict(), "train": run.tcfg.to_dict(), "env": env.collect(env.resolve_device(device)),
        "started": now, "finished": now, **extra})
