"""`moebench ablations | run | report | sweep lr`: the paper's tables as runnable studies.
Its `app` is merged into the main one; each command parses and calls the library. What loads torch
(training, planning, reports) is imported inside the commands, after names and options check out,
so that a typo is refused at once."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from moebench.cli.common import CKPT_EVERY, CkptEveryOpt, err, out, split_list
from moebench.cli.progress import TrainingProgress
from moebench.errors import UserError
from moebench.fmt import duration, human, parse_ckpt_every, parse_tokens
from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS, PUBLISHED_RESULTS
from moebench.presets import DEFAULT_PRESET, PRESET_RULES, PUBLIC_PRESETS, parse_grid, preset_shape, rule_of
from moebench.registry import get
from moebench.specs import get_spec, load_specs, resolve_variants


def _grid_help() -> str:
    """The presets' default grids, from their rules: "0.001,0.002,0.004,0.008 at cpu-tiny; ..."."""
    by_grid: dict[tuple[float, ...], list[str]] = {}
    for name in PUBLIC_PRESETS:
        by_grid.setdefault(PRESET_RULES[name].sweep_grid, []).append(name)
    return "; ".join(",".join(f"{lr:g}" for lr in grid) + " at " + ", ".join(names) for grid, names in by_grid.items())


PRESETS_HELP = " | ".join(PUBLIC_PRESETS)

app = typer.Typer()
sweep_app = typer.Typer(no_args_is_help=True, help="Hyperparameter sweeps (learning rate).")
app.add_typer(sweep_app, name="sweep")


@app.command("ablations")
def ablations_cmd():
    """The ablations (one per table of the paper) with their presets and budgets."""
    table = Table(title="ablations (experiments/*.py)")
    for col in ("name", "table", "variants", "baseline", "seeds", "presets: tokens per run"):
        table.add_column(col)
    for spec in load_specs().values():
        a = spec.ablation
        budgets = ", ".join(f"{n} {human(p.tokens)}" for n, p in a.presets.items() if not rule_of(n).hidden)
        seeds = ", ".join(f"{n} {p.seeds}" for n, p in a.presets.items() if not rule_of(n).hidden and p.seeds > 1)
        extra = ", ".join(f"{v} {k}" for v, k in a.extra_seeds.items() if v in a.variants)
        table.add_row(a.name, a.table, str(len(a.variants)), a.baseline,
                      (seeds or "1") + (f" ({extra})" if extra and seeds else ""), budgets)
    out.print(table)


@app.command("run")
def run_cmd(
    ablation: Annotated[str, typer.Argument(help="architectures | experts | ratios | inner | parallel")],
    preset: Annotated[str, typer.Option(help=PRESETS_HELP)] = DEFAULT_PRESET,
    only: Annotated[Optional[str], typer.Option(help="comma-separated variants to run, e.g. Mamba_25M,MoE-Mamba_25M")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="run seeds 0..N-1 of every variant (default: the preset's, "
                                                     "more for the ablation's headline variants)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue interrupted runs from their checkpoints")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and estimates; train nothing")] = False,
    out_dir: Annotated[str, typer.Option("--out", help="results folder (runs.jsonl, runs/, lr_sweeps.jsonl)")] = LOCAL_RESULTS,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    allow_repeat: Annotated[bool, typer.Option("--allow-repeat", help="allow budgets that repeat the data more than the preset allows")] = False,
    lr_source: Annotated[Optional[str], typer.Option(help="default (the paper's rates) | sweep (the family sweeps of "
                                                           "`moebench sweep lr`) | preset (one rate for all, cpu-tiny); "
                                                           "default: the preset's (sweep at the GPU presets)")] = None,
    data: Annotated[Optional[str], typer.Option(help="a prepared data folder instead of the preset's corpus (e.g. C4)")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="override the preset's tokens per run: 200k, 20M")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step "
                                                    "(default: eager; a compiled step did not learn on an H100, see README)")] = None,
    ckpt_every: CkptEveryOpt = CKPT_EVERY,
):
    """Run an ablation's variants at a preset: prepares the data if missing, skips runs already done.

    Examples: moebench run architectures --dry-run; moebench run experts --preset gpu-small --seeds 2
    """
    spec = get_spec(ablation)
    spec.preset(preset)
    resolve_variants(spec, preset, split_list(only))
    budget = parse_tokens(tokens) if tokens else None
    every = parse_ckpt_every(ckpt_every)
    from moebench.ablations import make_plan
    plan = make_plan(ablation, preset, only=split_list(only), seeds=seeds, lr_source=lr_source, out=out_dir,
                     data_dir=data, tokens=budget, allow_repeat=allow_repeat, compile=compile)
    if dry_run:
        print_plan(plan, device)
        return
    from moebench.ablations import ensure_data
    ensure_data(plan)
    todo = [r for r in plan.runs if r.status in ("todo", "resume")]
    done = len(plan.runs) - len(todo)
    err.print(f"{ablation} at {preset}: {len(plan.runs)} runs, {done} already done, {len(todo)} to run; "
              f"data {plan.data_dir} ({plan.data_id}); results in {plan.out}", highlight=False, soft_wrap=True)
    try:
        outcomes = _execute_with_progress(plan, todo, device, resume, every)
    except KeyboardInterrupt as e:
        err.print(f"[yellow]{e or 'interrupted'}[/yellow]; continue with: moebench run {ablation} --preset {preset} "
                  f"--resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    bad = [o for o in outcomes if o.status in ("failed", "interrupted")]
    ran = [o for o in outcomes if o.status == "done"]
    busy = [o for o in outcomes if o.status == "skipped" and o.error]
    busy_part = f"{len(busy)} skipped (another process trains them), " if busy else ""
    reused = sum(o.status == "reused" for o in outcomes)
    reused_part = f"{reused} recorded from the learning-rate sweep (its run at the chosen rate), " if reused else ""
    print_speeds(ran)
    err.print(f"{len(ran)} trained, {reused_part}{sum(o.status == 'skipped' for o in outcomes) - len(busy)} skipped (done before), "
              f"{busy_part}{len(bad)} not finished; report: moebench report {ablation} --preset {preset} "
              f"--results {plan.out / 'runs.jsonl'}", highlight=False, soft_wrap=True)
    for o in busy:
        err.print(f"[yellow]busy:[/yellow] {o.run.variant} seed {o.run.tcfg.seed}: {o.error}", highlight=False,
                  soft_wrap=True)
    for o in bad:
        err.print(f"[red]{o.status}:[/red] {o.run.variant} seed {o.run.tcfg.seed}: {o.error}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(1)


def print_speeds(done: list) -> None:
    """What the runs just trained cost, per variant, on which device: the rows' wall time and tokens/s
    (every row keeps them, with the device, in its metrics and env)."""
    by: dict[str, list[dict]] = {}
    for o in done:
        if o.row:
            by.setdefault(o.run.variant, []).append(o.row)
    if not by:
        return
    device = next(iter(by.values()))[0]["env"].get("device_name", "?")
    table = Table(title=f"time per run on {device}", box=box.SIMPLE)
    for col in ("variant", "runs", "wall s (each)", "tokens/s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v, rows in by.items():
        walls = [r["metrics"]["wall_s"] for r in rows]
        rates = sorted(r["metrics"]["tokens_per_s"] or 0 for r in rows)
        table.add_row(v, str(len(rows)), f"{sum(walls) / len(walls):.1f}", f"{rates[len(rates) // 2]:,.0f}")
    err.print(table)


def _execute_with_progress(plan, todo: list, device: str, resume: bool, every: tuple[int, float]) -> list:
    from moebench.ablations import Hooks, execute
    with TrainingProgress(f"{plan.ablation} ({len(todo)} runs)", sum(r.tcfg.tokens for r in todo)) as shown:
        def label(run):
            n = next((i + 1 for i, r in enumerate(todo) if r is run), None)
            return f"{run.variant} s{run.tcfg.seed}" + (f" ({n} of {len(todo)})" if n else "")

        def on_start(run):
            shown.start(label(run), run.tcfg.tokens)

        def on_end(o):
            if o.status == "reused":              # not in the total: nothing trained
                return
            shown.end(o.status if o.status != "done" else f"done, smoothed loss "
                      f"{o.row['metrics']['final_smoothed_loss']:.3f}", o.run.tcfg.tokens, label(o.run))
        return execute(plan, device=device, resume=resume, hooks=Hooks(on_start, lambda run, p: shown.update(p), on_end),
                       ckpt_every_steps=every[0], ckpt_minutes=every[1])


def print_plan(plan, device: str) -> None:
    from moebench.estimate import estimate_plan
    est = estimate_plan(plan, device)
    table = Table(title=f"moebench run {plan.ablation} --preset {plan.preset} (dry run; baseline {plan.baseline})")
    for col in ("variant", "seed", "status", "tokens", "steps", "batch x ctx", "params", "active",
                "FLOPs/tok", "lr", "est. time"):
        table.add_column(col, justify="right" if col in ("tokens", "steps", "params", "active", "FLOPs/tok") else "left")
    for e in est.runs:
        run, tcfg, d = e.run, e.run.tcfg, e.model
        micro = f" (micro {tcfg.micro_batch})" if tcfg.micro_batch else ""
        table.add_row(run.cfg.name, str(tcfg.seed), run.status, human(e.steps * tcfg.batch * tcfg.ctx),
                      f"{e.steps:,}", f"{tcfg.batch} x {tcfg.ctx}{micro}", human(d["total_params"]),
                      human(d["active_params"]), human(d["flops_per_token"]),
                      f"{tcfg.lr:g} ({run.lr_note})", f"{duration(e.seconds)} ({e.how})" if run.status not in ("done", "reuse") else run.status)
    out.print(table)
    prepared = "prepared" if plan.n_train_tokens else "not prepared yet (run prepares it)"
    epochs = f"{est.epochs:.2f}" if est.epochs is not None else "?"
    limit = est.max_epochs
    out.print(f"data: {plan.data_dir} ({plan.corpus or 'user data'}, {prepared}); "
              f"{epochs} passes per run (preset limit {limit if limit is not None else 'none'})", highlight=False, soft_wrap=True)
    if est.repeats_too_often:
        out.print(f"[yellow]this budget makes more than {limit:g} passes over the data: the run will refuse it "
                  f"without --allow-repeat[/yellow]", soft_wrap=True)
    todo = sum(r.status not in ("done", "reuse") for r in plan.runs)
    out.print(f"device: {est.device_name}; {todo} of {len(plan.runs)} runs to do; estimated {duration(est.total_s)}"
              + (f" + {est.unknown} runs without an estimate" if est.unknown else "")
              + (f"; {est.wall}" if est.wall else ""),
              highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    ablation: Annotated[str, typer.Argument(help="architectures | experts | ratios | inner | parallel | bench | trend | "
                                                 "claims")],
    out_dir: Annotated[str, typer.Option("--out", help="folder for ABLATION.md and the PNGs")] = LOCAL_REPORTS,
    results: Annotated[str, typer.Option(help=f"the results folder (or its runs.jsonl / bench.jsonl); the published "
                                              f"rows: {PUBLISHED_RESULTS}")] = LOCAL_RESULTS,
    preset: Annotated[Optional[str], typer.Option(help="which preset's rows (needed when the rows have several)")] = None,
    device: Annotated[Optional[str], typer.Option(help="only rows of the device whose name contains this, e.g. cpu, "
                                                       "H100 (rows of several devices are refused)")] = None,
    lr_source: Annotated[Optional[str], typer.Option(help="only rows trained at default | sweep rates (default: the latest row)")] = None,
    pair: Annotated[Optional[str], typer.Option(help="report trend: VARIANT,BASELINE (default: MoE-Mamba_25M,Mamba_25M)")] = None,
):
    """Write OUT/ABLATION.md and PNGs from the rows of RESULTS only (by default your own, into an
    ignored folder); `report bench` the benchmarks, `report trend` a pair's gap against the training
    budget (every budget it ran at), `report claims` a verdict on each of the paper's claims.

    Example: moebench report experts --results results/published --preset gpu-small --lr-source sweep
    """
    if ablation == "claims":
        from moebench.report.claims import build_claims
        out.print(str(build_claims(results, out_dir, preset, device)), highlight=False)
        return
    if ablation == "trend":
        from moebench.report.trend import DEFAULT_PAIR, build_trend
        names = split_list(pair) if pair is not None else list(DEFAULT_PAIR)
        if not names or len(names) != 2:
            raise UserError(f"--pair takes two variants, VARIANT,BASELINE; got '{pair}'")
        out.print(str(build_trend(results, out_dir, (names[0], names[1]), device)), highlight=False)
        return
    if ablation == "bench":       # the benchmark rows (RESULTS/bench.jsonl), not an ablation
        from moebench.report.bench import render_bench_report
        out.print(str(render_bench_report(results, out_dir, device=device)), highlight=False)
        return
    get_spec(ablation)
    from moebench.report.ablation import build_report
    rep = build_report(ablation, results=results, out=out_dir, preset=preset, lr_source=lr_source, device=device)
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
    tau = f"Kendall tau vs the paper {rep.tau:.3f}" if rep.tau is not None else "no rank comparison"
    out.print(f"{rep.markdown} ({rep.preset}; {tau}) + {len(rep.pngs)} figures", highlight=False, soft_wrap=True)


@sweep_app.command("lr")
def sweep_lr_cmd(
    variants: Annotated[Optional[list[str]], typer.Argument(help="registry names, e.g. Mamba_25M MoE-Mamba_25M")] = None,
    ablation: Annotated[Optional[str], typer.Option(help="sweep one variant per model family of this ablation "
                                                        "(registry.SWEEP_VARIANTS); the others take its rate")] = None,
    grid: Annotated[Optional[str], typer.Option(help=f"comma-separated peak rates (default: {_grid_help()})")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="tokens per point (default: the preset's sweep budget)")] = None,
    preset: Annotated[str, typer.Option(help="batch, context and model scale of the sweep")] = DEFAULT_PRESET,
    out_dir: Annotated[str, typer.Option("--out", help="results folder (lr_sweeps.jsonl, sweeps/)")] = LOCAL_RESULTS,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    data: Annotated[Optional[str], typer.Option(help="a prepared data folder instead of the preset's corpus")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step "
                                                    "(default: eager; a compiled step did not learn on an H100, see README)")] = None,
    ckpt_every: CkptEveryOpt = CKPT_EVERY,
):
    """Short runs at each rate of a log grid (extended past an edge while the best rate sits on it);
    records the best rate by the final smoothed training loss per variant in OUT/lr_sweeps.jsonl.

    Example: moebench sweep lr --ablation experts --preset gpu-small; then moebench run experts --preset gpu-small
    """
    names = list(variants or [])
    family_of = list(get_spec(ablation).variants(preset)) if ablation else []
    if not names and not family_of:
        raise UserError("name variants to sweep, or --ablation NAME (one sweep per family of its variants)")
    for name in names:
        get(name)
    preset_shape(preset)
    lrs = parse_grid(grid) if grid else list(rule_of(preset).sweep_grid)
    budget = parse_tokens(tokens) if tokens else None
    every_steps, every_minutes = parse_ckpt_every(ckpt_every)
    from moebench.ablations import Hooks
    from moebench.sweep import sweep_families, sweep_lr
    with TrainingProgress() as shown:
        def on_start(run):
            shown.start(f"{run.variant} lr {run.tcfg.lr:g}", run.tcfg.tokens)

        def on_end(o):
            shown.end(f"done, smoothed loss {o.row['metrics']['final_smoothed_loss']:.3f}" if o.row else
                      f"failed: {o.error}")

        try:
            kw = dict(tokens=budget, ckpt_every_steps=every_steps, ckpt_minutes=every_minutes, out=out_dir,
                      data_dir=data, device=device, compile=compile,
                      hooks=Hooks(on_start, lambda run, p: shown.update(p), on_end))
            rows = (sweep_families(family_of, preset, lrs, **kw) if family_of else []) + \
                (sweep_lr(names, preset, lrs, **kw) if names else [])
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]; run the same command again to continue (finished points are kept)")
            raise typer.Exit(130)
    table = Table(title=f"learning-rate sweep at {preset} (appended to {out_dir}/lr_sweeps.jsonl)")
    for col in ("variant", "family", "rate: final smoothed loss (val)", "best"):
        table.add_column(col)
    for r in rows:
        cells = "  ".join(f"{pt['lr']:g}: " + (f"{pt['final_smoothed_loss']:.3f} ({pt['val_loss']:.3f})"
                                                if pt["final_smoothed_loss"] is not None and pt["val_loss"] is not None
                                                else "failed") for pt in r["points"])
        best = "none" if r["best_lr"] is None else f"{r['best_lr']:g}" + (" (grid edge!)" if r["at_grid_edge"] else "")
        table.add_row(r["variant"], r["family"], cells, best)
    out.print(table)
    out.print(f"chosen by the final smoothed training loss (the paper's metric); `moebench run ABLATION --preset "
              f"{preset}` takes these rates{'' if rule_of(preset).lr_source == 'sweep' else ' with --lr-source sweep'}",
              highlight=False, soft_wrap=True)
    if any(r["best_lr"] is None for r in rows):
        raise typer.Exit(1)
