"""Reports from results only: reports/<ablation>.md (a table laid out like the paper's, our numbers
next to the paper's, rank agreement) and <ablation>_*.png (drawn by report.figures).

A row belongs to a variant of the ablation when its model config hash matches the variant's at
the preset's scale (runs are shared between ablations), or, for rows written before a config
change, when its variant name matches (with a warning). A report is of one preset and one device:
rows of several of either are refused unless --preset / --device choose (pick_preset, report.rows),
rows of several versions or budgets warned about.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from moebench import paper
from moebench.ablations import SWEEPS_FILE, load_sweeps
from moebench.errors import UserError
from moebench.fmt import human
from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS
from moebench.presets import EMA_RULE, rule_of
from moebench.registry import fit_vocab, get
from moebench.report.compare import (VariantResult, compute_paired, compute_speedups, rank_agreement, ranking_scores,
                                      read_curve, speedup_cell)
from moebench.report.figures import ablation_figures
from moebench.report.rows import no_rows, on_device, one_device, rows_file
from moebench.report.stats import fmt_ms, fmt_paired, mean_std
from moebench.results import CKPT_INFO, load_records
from moebench.specs import Spec, get_spec

PROVENANCE_KEYS = {  # what a report states; it warns when rows differ in MUST_MATCH (and refuses two devices)
    "device": lambda r: (r.get("env") or {}).get("device_name"),
    "torch": lambda r: (r.get("env") or {}).get("torch"),
    "cuda": lambda r: (r.get("env") or {}).get("cuda"),
    "mamba_ssm": lambda r: (r.get("env") or {}).get("mamba_ssm"),
    "git": lambda r: _git(r),
    "mixer impl": lambda r: f"{(r.get('model') or {}).get('mixer')}:{(r.get('impl') or {}).get('mixer')}",
    "moe impl": lambda r: (r.get("impl") or {}).get("moe"),
    "data": lambda r: r.get("data_id"),
    "tokens": lambda r: (r.get("train") or {}).get("tokens"),
    "batch x ctx": lambda r: f"{(r.get('train') or {}).get('batch')} x {(r.get('train') or {}).get('ctx')}",
    "EMA alpha": lambda r: (r.get("train") or {}).get("ema_alpha"),
    "lr source": lambda r: (r.get("train") or {}).get("lr_source"),
}
MUST_MATCH = ("torch", "cuda", "mamba_ssm", "data", "tokens", "batch x ctx", "lr source")


def _git(r: dict) -> str | None:
    e = r.get("env") or {}
    if not e.get("git_sha"):
        return None
    return e["git_sha"][:9] + ("+dirty" if e.get("git_dirty") else "")


# --- collecting rows ---------------------------------------------------------------------------
@dataclass
class Report:
    ablation: str
    preset: str
    markdown: Path
    pngs: list[Path]
    warnings: list[str]
    tau: float | None


def pick_preset(spec: Spec, rows: list[dict], preset: str | None, source: Path) -> tuple[str, list[str]]:
    """The preset to report and the other presets that also have rows of this ablation: `preset`
    when given, else the one preset with rows ("" for none). Rows at several presets and no choice
    are a UserError naming them: a budget of 164K tokens on a CPU twin and one of 20M on the paper's
    shapes are different experiments, and taking one silently would hide the other."""
    counts: dict[str, int] = {}
    for p in spec.ablation.presets:
        by_hash, by_name = _targets(spec, p)
        n = sum(1 for r in rows if r.get("preset") == p and (r.get("variant_hash") in by_hash or r.get("variant") in by_name))
        if n:
            counts[p] = n
    if preset is not None:
        spec.preset(preset)                            # a bad name fails with suggestions
        return preset, [p for p in counts if p != preset]
    if len(counts) > 1:
        listed = ", ".join(f"{p} ({n} rows)" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise UserError(f"the rows of '{spec.ablation.name}' in {source} mix presets: {listed}; a report is of one "
                        f"preset, choose it with --preset (e.g. --preset {max(counts, key=lambda p: counts[p])})")
    return next(iter(counts), ""), []


def _targets(spec: Spec, preset: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(config hash -> ablation variant names, trained model name -> ablation variant name)."""
    tiny = spec.preset(preset).scale == "tiny"
    by_hash: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for v in spec.variants(preset):
        cfg = get(v + "@tiny") if tiny else get(v)
        by_hash.setdefault(cfg.config_hash(), []).append(v)
        by_name[cfg.name] = v
    return by_hash, by_name


def _same_but_vocab(cfg, row: dict) -> bool:
    """The row's model is the registry's but for the vocabulary (a run over a learned BPE, registry.fit_vocab)."""
    vocab = (row.get("model") or {}).get("vocab_size")
    return bool(vocab) and fit_vocab(cfg, vocab).config_hash() == row.get("variant_hash")


def collect(spec: Spec, preset: str, rows: list[dict], results_dir: Path,
            lr_source: str | None = None) -> tuple[dict[str, VariantResult], list[str], list[dict]]:
    """(variant -> result, warnings, failed rows) for one preset: the latest finished row per
    (variant, seed), of one learning-rate source when given."""
    tiny = spec.preset(preset).scale == "tiny"
    by_hash, by_name = _targets(spec, preset)
    out = {v: VariantResult(v, get(v + "@tiny") if tiny else get(v)) for v in spec.variants(preset)}
    latest: dict[tuple[str, int], dict] = {}
    failed, warnings, stale = [], [], set()
    for r in rows:
        if r.get("kind") != "train" or r.get("preset") != preset:
            continue
        if lr_source and (r.get("train") or {}).get("lr_source") != lr_source:
            continue
        names = by_hash.get(r.get("variant_hash"))
        if names is None and r.get("variant") in by_name:
            names = [by_name[r["variant"]]]
            if not _same_but_vocab(out[names[0]].cfg, r):
                stale.add(names[0])
        if not names:
            continue
        if r.get("status") != "done":
            failed.append(r)
            continue
        for v in names:
            key = (v, r.get("seed", 0))
            if key not in latest or str(r.get("finished", "")) >= str(latest[key].get("finished", "")):
                latest[key] = r
    if stale:
        warnings.append(f"rows of {', '.join(sorted(stale))} were produced by a model config that differs from "
                        f"today's registry (matched by name, not by config hash)")
    for (v, seed), r in sorted(latest.items(), key=lambda kv: kv[0][1]):
        out[v].rows.append(r)
        curve = read_curve(r, results_dir)
        if curve is not None:
            out[v].curves[seed] = curve
        else:
            warnings.append(f"no curve.csv for {v} seed {seed} (run {r.get('run_id')}): no speedup or curve plot")
    failed = [f for f in failed if not any((f.get("ablation_variant") or f.get("variant")) == v and f.get("seed") == s
                                           for (v, s) in latest)]
    failed_ids = {f.get("run_id") for f in failed}    # a failed run keeps its last good checkpoint too
    for info in interrupted_runs(results_dir, preset, lr_source):
        if info.get("run_id") in failed_ids:
            continue
        for v in by_hash.get(info.get("variant_hash"), []):
            if (v, info.get("seed", 0)) not in latest:
                out[v].interrupted.append(info)
    return out, warnings, failed


def interrupted_runs(results_dir: Path, preset: str, lr_source: str | None = None) -> list[dict]:
    """The checkpoint.json of every run at `preset` under results_dir/runs: a run that has one and no
    finished row stopped (Ctrl-C, a kill, a crash) before its end; `--resume` continues it."""
    found = []
    for path in sorted((results_dir / "runs").glob(f"*/{CKPT_INFO}")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("preset") != preset:
            continue
        if lr_source and (info.get("train") or {}).get("lr_source") != lr_source:
            continue
        found.append(info)
    return found


# --- the report --------------------------------------------------------------------------------
def build_report(ablation: str, results: str | Path = LOCAL_RESULTS, out: str | Path = LOCAL_REPORTS,
                 preset: str | None = None, lr_source: str | None = None, device: str | None = None) -> Report:
    """Write <out>/<ablation>.md and PNGs from the rows of `results` (a folder or its runs.jsonl) at
    one preset and on one device (rows of several are refused unless `preset` and `device` choose);
    with several rows per (variant, seed), the latest finished one, of learning-rate source
    `lr_source` when given."""
    spec = get_spec(ablation)
    results = rows_file(results, "runs.jsonl")
    all_rows = load_records(results)
    rows = on_device(all_rows, device, results)
    chosen, others = pick_preset(spec, rows, preset, results)
    if not chosen:
        raise no_rows(f"no results for ablation '{ablation}' in {results}: run `moebench run {ablation}` first", results)
    res, warnings, failed = analyse(spec, chosen, rows, results.parent, lr_source)
    done_rows = [r for v in res.values() for r in v.rows]
    if not done_rows:
        raise no_rows(f"no finished runs of ablation '{ablation}' at preset {chosen}"
                      + (f" with --lr-source {lr_source}" if lr_source else "") + f" in {results}"
                      + (f" ({len(failed)} failed)" if failed else "") + f": run `moebench run {ablation} --preset {chosen}`",
                      results)
    one_device(done_rows, f"the finished runs of '{ablation}' at preset {chosen}", results)
    if others:
        warnings.append(f"{results} also has rows of this ablation at preset(s) {', '.join(others)}; "
                        f"this report is preset {chosen}, as --preset asked")
    baseline = spec.baseline(chosen)
    if not res[baseline].rows:
        warnings.append(f"the baseline {baseline} has no finished run: no speedups")
    provenance = {k: sorted({str(f(r)) for r in done_rows}) for k, f in PROVENANCE_KEYS.items()}
    warnings += _mixed(provenance)
    table = spec.ablation.table
    prows = paper.paper_rows(table)
    present = [v for v in res.values() if v.rows]
    theirs = paper.paper_order(table, [v.name for v in present])
    tau, seed_taus, common = rank_agreement(present, theirs, ranking_scores(present, res.get(baseline)))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pngs = ablation_figures(spec, chosen, res, baseline, prows, out)
    read = f"{len(done_rows)} of its {len(all_rows)} rows: the latest finished run of each variant and seed"
    md = _markdown(spec, chosen, res, baseline, prows, provenance, warnings, failed, tau, seed_taus, common,
                   theirs, pngs, results, read)
    path = out / f"{ablation}.md"
    path.write_text(md)
    return Report(ablation, chosen, path, pngs, warnings, tau)


def analyse(spec: Spec, preset: str, rows: list[dict], results_dir: Path, lr_source: str | None = None
            ) -> tuple[dict[str, VariantResult], list[str], list[dict]]:
    """collect, then each variant's speedups and paired difference to the preset's baseline."""
    res, warnings, failed = collect(spec, preset, rows, results_dir, lr_source)
    compute_speedups(res, spec.baseline(preset))
    compute_paired(res, spec.baseline(preset))
    return res, warnings, failed


def _mixed(provenance: dict[str, list[str]]) -> list[str]:
    """Warnings for rows that should agree and do not (device, versions, data, budget...)."""
    warnings = [f"rows mix {k}: {', '.join(provenance[k])}" for k in MUST_MATCH if len(provenance[k]) > 1]
    for k in ("mixer impl", "moe impl"):   # one implementation per kind of layer (Mamba and attention differ)
        kinds = {}
        for v in provenance[k]:
            kinds.setdefault(v.split(":")[0] if ":" in v else k, []).append(v)
        for vals in kinds.values():
            if len([v for v in vals if not v.endswith("None")]) > 1:
                warnings.append(f"rows mix {k}: {', '.join(vals)}")
    return warnings


def _markdown(spec, preset, res, baseline, prows, provenance, warnings, failed, tau, seed_taus, common, theirs,
              pngs, results, read) -> str:
    abl = spec.ablation
    p = abl.presets[preset]
    tiny = p.scale == "tiny"
    lines = [f"# {abl.name}: {abl.table} of MoE-Mamba (Pióro et al. 2024)", "",
             f"**Question.** {abl.question}", "",
             f"Preset **{preset}** ({p.note}); baseline for speedups: **{baseline}**. "
             f"Generated by `moebench report {abl.name}` from `{results}` only ({read}); do not edit.", ""]
    if warnings:
        lines += ["> **Warnings**", ">"] + [f"> - {w}" for w in warnings] + [""]
    lines += ["## Results", ""]
    head = ["variant", "params", "active", "final smoothed loss", f"Δ loss vs {baseline} [95% CI]", "val ppl",
            "tokens", "seeds", f"speedup over {baseline}", "lr (source)", "paper params", "paper active",
            "paper loss", "paper speedup"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for v in res.values():
        pr = prows.get(v.name)
        paper_cols = [
            f"{pr.total_m:g}M" if pr and pr.total_m else "—", f"{pr.active_m:g}M" if pr and pr.active_m else "—",
            (f"{pr.loss:.2f}" if pr.loss is not None else f"rank {pr.rank}" if pr.rank else "—") if pr else "—",
            (pr.speedup_text or "—") if pr else "—"]
        if not v.rows:
            state = "not run"
            if v.interrupted:
                state = "interrupted at " + ", ".join(f"step {i['step']}/{i['steps']} (seed {i.get('seed', 0)})"
                                                      for i in sorted(v.interrupted, key=lambda i: i.get("seed", 0)))
            lines.append("| " + " | ".join([v.name, "—", "—", state, "—", "—", "—", "0", "—", "—"] + paper_cols) + " |")
            continue
        r0 = v.rows[0]
        ppl = mean_std([math.exp(x) for x in v.metric("val_loss")])
        sp_text = "1 (baseline)" if v.name == baseline else speedup_cell(v, baseline)
        lrs = sorted({(r["train"].get("lr"), r["train"].get("lr_source")) for r in v.rows})
        lines.append("| " + " | ".join([
            v.name + (" (@tiny)" if tiny else ""), human(r0["params"]["total"]), human(r0["params"]["active"]),
            fmt_ms(*v.loss), "0 (baseline)" if v.name == baseline else fmt_paired(v.paired), fmt_ms(*ppl, digits=1),
            human(statistics.fmean(v.metric("tokens"))), str(len(v.rows)),
            sp_text, ", ".join(f"{lr:g} ({src})" for lr, src in lrs)] + paper_cols) + " |")
    lines.append("")
    if abl.table in paper.LAYOUTS:
        lines += _pivot(abl.table, res, prows) + [""]
    lines += ["## Rank agreement with the paper", ""]
    if tau is None:
        lines.append("Not enough variants with both our result and a paper number to compare orderings.")
    else:
        kind = "losses" if all(prows[n].loss is not None for n in common) else "ranks (figure 5's trend)"
        lines.append(f"Kendall τ-b between our ranking (the mean paired difference of the final smoothed loss "
                     f"to {baseline}, seed by seed) and the paper's {kind}, over {len(common)} variants: "
                     f"**τ = {tau:.3f}** (1 = same order, -1 = reversed).")
        if seed_taus:
            m, s = mean_std([t for t in seed_taus if t is not None])
            lines.append(f"Per seed: τ = {fmt_ms(m, s)} over {len(seed_taus)} seeds.")
        scores = ranking_scores([res[n] for n in common], res.get(baseline))
        ours_order = sorted(common, key=lambda n: scores[n])
        paper_order = sorted(common, key=lambda n: theirs[n])
        lines += ["", f"- ours (best first): {' < '.join(ours_order)}",
                  f"- paper (best first): {' < '.join(paper_order)}"]
    lines += _learning_rates(res, preset, Path(results).parent)
    lines += ["", "## Figures", ""] + [f"![{png.stem}]({png.name})" for png in pngs] + [""]
    lines += ["## Provenance", "", "| | value(s) |", "|---|---|"]
    lines += [f"| {k} | {', '.join(vals)} |" for k, vals in provenance.items()]
    lines += ["", f"EMA rule: {EMA_RULE}.", ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {f.get('ablation_variant') or f.get('variant')} seed {f.get('seed')}: "
                                          f"{f.get('reason') or 'failed'} (run {f.get('run_id')})" for f in failed] + [""]
    notes = [
        "Losses are the final EMA-smoothed training log-perplexity (the paper's metric) and, for the "
        "validation perplexity, exp of the last held-out loss. Our corpus is not C4 (unless --data pointed at "
        "it) and our budgets are smaller at every preset but `paper`: compare orderings and speedups, "
        "not absolute values.",
    ]
    if tiny:
        notes.append("This preset trains the @tiny CPU twins (d_model 64, a quarter of the layers): their "
                     "parameters are the twins'; the paper's columns are the full models'.")
    if rule_of(preset).max_epochs is not None:
        ep = sorted({round(r["metrics"].get("epochs") or 0, 2) for v in res.values() for r in v.rows})
        notes.append(f"Passes over the training data per run: {', '.join(map(str, ep))}.")
    by_note: dict[tuple[str, str], list[str]] = {}
    for pr in prows.values():
        if pr.note and pr.variant in res:
            by_note.setdefault((pr.table, pr.note), []).append(pr.variant)
    notes += [f"{', '.join(names)} ({table}): {note}." for (table, note), names in by_note.items()]
    lrs = {(r["train"].get("lr"), r["train"].get("lr_source")) for v in res.values() for r in v.rows}
    if len({lr for lr, _ in lrs}) > 1 and "default" in {src for _, src in lrs} and not rule_of(preset).paper_ema:
        notes.append("The variants trained at different peak learning rates (the paper's per-family defaults). At "
                     "budgets this small the rate can move the loss more than the architecture does: for a fair "
                     f"ranking run `moebench sweep lr --ablation {abl.name} --preset {preset}`, then "
                     f"`moebench run {abl.name} --preset {preset} --lr-source sweep`.")
    if abl.table == "table 2":
        notes.append(paper.TABLE_2_PARAMS_NOTE)
    missing = [v.name for v in res.values() if v.rows and v.name not in prows]
    if missing:
        notes.append(f"No paper number for {', '.join(missing)}.")
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _pivot(table: str, res, prows) -> list[str]:
    row_label, cols, layout = paper.LAYOUTS[table]
    head = [row_label] + [f"{c} ({who})" for c in cols for who in ("ours", "paper")]
    lines = [f"Laid out as the paper's {table} (final smoothed loss):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, by_col in layout.items():
        cells = [label]
        for c in cols:
            v = by_col[c]
            cells.append(fmt_ms(*res[v].loss) if v in res else "—")
            cells.append(f"{prows[v].loss:.2f}" if v in prows and prows[v].loss is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _learning_rates(res: dict[str, VariantResult], preset: str, results_dir: Path) -> list[str]:
    """Per family (or variant with a sweep of its own) whose rows took swept rates: the sweep's grid,
    each rate's final smoothed loss (and validation loss), the rate chosen."""
    used = [v for v in res.values() if any(r["train"].get("lr_source") == "sweep" for r in v.rows)]
    if not used:
        return []
    swept = load_sweeps(results_dir)
    lines = ["", "## Learning rates", "",
             f"From `moebench sweep lr` at this preset (`{results_dir / SWEEPS_FILE}`): each rate's final smoothed "
             "training loss (validation loss), the rate chosen by the first in **bold**; a family's members take its "
             "rate unless swept themselves.", ""]
    shown = set()
    for v in used:
        r0 = v.rows[0]
        where = (preset, r0["train"]["batch"], r0["train"]["ctx"], r0.get("data_id"))
        row = swept.get((v.cfg.config_hash(), *where)) or swept.get((("family", v.cfg.family), *where))
        if row is None or id(row) in shown:
            continue
        shown.add(id(row))
        pts = " · ".join((f"**{pt['lr']:g}**" if pt["lr"] == row["best_lr"] else f"{pt['lr']:g}") + ": "
                         + (f"{pt['final_smoothed_loss']:.3f} ({pt['val_loss']:.3f})"
                            if pt.get("final_smoothed_loss") is not None and pt.get("val_loss") is not None
                            else "failed") for pt in row["points"])
        edge = " — the best rate is at the grid's edge" if row.get("at_grid_edge") else ""
        lines.append(f"- {row.get('family') or row['variant']} ({row['variant']}, {human(row['tokens'])} tokens, "
                     f"{row['finished'][:10]}): {pts}{edge}")
    return lines
