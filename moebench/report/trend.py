"""reports/trend.md: how a pair's gap moves with the training budget. For every budget the pair was
trained at (a preset, or any --tokens), the paired difference of the final smoothed loss (variant
minus baseline, seed by seed: the same data order) with its 95% t-interval, and the speedup of the
mean curves; plus, for the largest budget, the speedup as training goes (appendix D). From a
results folder's runs.jsonl only; a budget's rows must be of one device (report.rows)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moebench.fmt import human
from moebench.metrics import speedup, speedup_curve
from moebench.registry import get
from moebench.report.compare import mean_curve, read_curve
from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS
from moebench.report.figures import trend_figures
from moebench.report.rows import no_rows, on_device, one_device, rows_file
from moebench.report.stats import Paired, fmt_paired, paired_difference
from moebench.results import load_records

DEFAULT_PAIR = ("MoE-Mamba_25M", "Mamba_25M")


@dataclass
class Budget:
    """One budget at which both models trained: their finished rows per seed and curves."""
    key: tuple                                   # (tokens, preset, batch, ctx, data id, lr source)
    rows: dict[str, dict[int, dict]] = field(default_factory=lambda: {"variant": {}, "baseline": {}})
    curves: dict[str, dict[int, tuple[list[float], list[float]]]] = field(
        default_factory=lambda: {"variant": {}, "baseline": {}})
    paired: Paired | None = None
    speedup: float | None = None
    device: str | None = None                    # the one device of its rows (report.rows.one_device)

    @property
    def tokens(self) -> int:
        return self.key[0]


def collect_budgets(rows: list[dict], variant: str, baseline: str, results_dir: Path) -> list[Budget]:
    """The budgets (latest finished row per model, budget and seed) where both models have a seed in
    common, smallest first. A model is matched by its config hash, at full scale or as the @tiny twin."""
    roles = {}
    for role, name in (("variant", variant), ("baseline", baseline)):
        for cfg in (get(name), get(name + "@tiny")):
            roles[cfg.config_hash()] = role
    budgets: dict[tuple, Budget] = {}
    for r in rows:
        role = roles.get(r.get("variant_hash"))
        if r.get("kind") != "train" or r.get("status") != "done" or role is None:
            continue
        t = r.get("train") or {}
        key = (r["metrics"]["tokens"], r.get("preset"), t.get("batch"), t.get("ctx"), r.get("data_id"),
               t.get("lr_source"))
        b = budgets.setdefault(key, Budget(key))
        seed = r.get("seed", 0)
        old = b.rows[role].get(seed)
        if old is None or str(r.get("finished", "")) >= str(old.get("finished", "")):
            b.rows[role][seed] = r
    out = []
    for b in sorted(budgets.values(), key=lambda b: (b.tokens, str(b.key))):
        finals = {role: {s: r["metrics"]["final_smoothed_loss"] for s, r in b.rows[role].items()}
                  for role in b.rows}
        b.paired = paired_difference(finals["variant"], finals["baseline"])
        if b.paired is None:
            continue
        for role in b.rows:
            for s, r in b.rows[role].items():
                c = read_curve(r, results_dir)
                if c is not None:
                    b.curves[role][s] = c
        seeds = sorted(b.curves["variant"].keys() & b.curves["baseline"].keys())
        if seeds:
            b.speedup = speedup(*mean_curve(b.curves["variant"], seeds), *mean_curve(b.curves["baseline"], seeds)).value
        out.append(b)
    return out


def build_trend(results: str | Path = LOCAL_RESULTS, out: str | Path = LOCAL_REPORTS,
                pair: tuple[str, str] = DEFAULT_PAIR, device: str | None = None) -> Path:
    """Write <out>/trend.md and trend_*.png from `results` (a folder or its runs.jsonl), of the rows
    on `device` when given; returns the markdown's path."""
    results = rows_file(results, "runs.jsonl")
    variant, baseline = pair
    all_rows = load_records(results)
    budgets = collect_budgets(on_device(all_rows, device, results), variant, baseline, results.parent)
    if not budgets:
        raise no_rows(f"no budget in {results} at which both {variant} and {baseline} finished a run of the same "
                      f"seed: run e.g. `moebench run architectures --preset gpu-small --only {variant},{baseline}`",
                      results)
    for b in budgets:    # a paired difference across two devices would measure the devices too
        b.device = one_device([r for role in b.rows.values() for r in role.values()],
                              f"the rows of {variant} and {baseline} at {human(b.tokens)} tokens ({b.key[1] or 'no preset'})", results)
    last = budgets[-1]
    seeds = sorted(last.curves["variant"].keys() & last.curves["baseline"].keys())
    curve = speedup_curve(*mean_curve(last.curves["variant"], seeds), *mean_curve(last.curves["baseline"], seeds)) \
        if seeds else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = trend_figures(budgets, curve, variant, baseline, out)
    used = sum(len(role) for b in budgets for role in b.rows.values())
    lines = [f"# trend: {variant} − {baseline} against the training budget", "",
             f"Generated by `moebench report trend` from `{results}` only ({used} of its {len(all_rows)} rows: the "
             f"latest finished run of each model, budget and seed); do not edit. Δ is the final smoothed "
             f"loss of {variant} minus {baseline}'s, seed by seed (both read the same batches), with a 95% "
             f"t-interval over the seeds; below 0, {variant} is ahead. Speedup: {baseline}'s tokens over the "
             f"tokens {variant} needs for {baseline}'s final loss, on the seed-mean curves.", "",
             "| tokens | preset | batch × ctx | data | lr source | seeds | Δ loss [95% CI] | speedup | device |",
             "|---:|---|---|---|---|---:|---|---:|---|"]
    for b in budgets:
        tokens, preset, batch, ctx, data, lr_source = b.key
        lines.append(f"| {human(tokens)} | {preset or '—'} | {batch} × {ctx} | {data or '—'} | {lr_source or '—'} | "
                     f"{b.paired.n} | {fmt_paired(b.paired)} | {f'{b.speedup:.2f}' if b.speedup else '—'} | {b.device} |")
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    if curve:
        lines += [f"The speedup curve is of the largest budget ({human(last.tokens)} tokens, seeds "
                  f"{', '.join(map(str, seeds))}): speedup(l) = tokens {baseline} took to reach loss l over the "
                  f"tokens {variant} took (the paper's appendix D, figure 8).", ""]
    path = out / "trend.md"
    path.write_text("\n".join(lines))
    return path
