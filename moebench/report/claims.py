"""reports/claims.md: the paper's claims one by one, each with the paper's numbers, ours, the test used
and a verdict computed from a results folder only: reproduced, not reproduced at this budget (the test cannot
tell, e.g. an interval that straddles 0, or one seed), contradicted (the test says the opposite), or
not run (no rows).

Tests: "A beats B" takes the paired difference of the final smoothed loss, seed by seed, and its 95%
t-interval (below 0: reproduced; above: contradicted). "A ≈ B" asks the interval to lie within ±EPS
nats (outside it on one side: contradicted). An ordering of several variants takes Kendall's τ between
our ranking and the paper's, judged by its normal approximation under independence (z beyond ±1.96).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from moebench import paper
from moebench.ablations import get_spec
from moebench.metrics import speedup_curve
from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS
from moebench.report.ablation import analyse, pick_preset
from moebench.report.cards import card_claims
from moebench.report.compare import VariantResult, ranking_scores
from moebench.report.rows import no_rows, on_device, one_device, rows_file
from moebench.report.stats import Paired, fmt_paired, kendall_tau, paired_difference
from moebench.results import load_records

EPS = 0.02                   # nats: "about equal" for final losses
EPS_TEST = 0.05              # nats: "test ≈ train" (appendix G), validation against the smoothed training loss
REPRODUCED, NOT_AT_BUDGET, CONTRADICTED, NOT_RUN = ("reproduced", "not reproduced at this budget", "contradicted",
                                                    "not run")
Res = dict[str, VariantResult]


@dataclass(frozen=True)
class Claim:
    id: str
    ablation: str
    text: str                # the claim, as the paper makes it
    paper: str               # the paper's numbers behind it
    test: Callable[[Res], tuple[str, str, str]]    # -> (ours, the test used, verdict)


# ---- tests ------------------------------------------------------------------------------------------

def _pair(res: Res, a: str, b: str) -> Paired | None:
    if a not in res or b not in res or not res[a].rows or not res[b].rows:
        return None
    return paired_difference(res[a].final_by_seed, res[b].final_by_seed)


def _below(p: Paired | None) -> str:
    if p is None:
        return NOT_RUN
    if p.lo is None:
        return NOT_AT_BUDGET
    return REPRODUCED if p.hi < 0 else CONTRADICTED if p.lo > 0 else NOT_AT_BUDGET


def _within(p: Paired | None, eps: float = EPS) -> str:
    if p is None:
        return NOT_RUN
    if p.lo is None:
        return NOT_AT_BUDGET
    return REPRODUCED if -eps <= p.lo and p.hi <= eps else CONTRADICTED if p.lo > eps or p.hi < -eps else NOT_AT_BUDGET


def _pooled(res: Res, pairs: list[tuple[str, str]]) -> Paired | None:
    """The paired differences a - b of several pairs together (each pair's seeds)."""
    a, b = {}, {}
    for i, (x, y) in enumerate(pairs):
        if x in res and y in res:
            a.update({(i, s): v for s, v in res[x].final_by_seed.items()})
            b.update({(i, s): v for s, v in res[y].final_by_seed.items()})
    return paired_difference(a, b)


def beats(a: str, b: str) -> Callable[[Res], tuple[str, str, str]]:
    def test(res):
        p = _pair(res, a, b)
        return f"Δ {a} − {b}: {fmt_paired(p)}", "paired difference, 95% t-interval below 0", _below(p)
    return test


def about(a: str, b: str) -> Callable[[Res], tuple[str, str, str]]:
    def test(res):
        p = _pair(res, a, b)
        return f"Δ {a} − {b}: {fmt_paired(p)}", f"95% t-interval within ±{EPS} nats", _within(p)
    return test


def not_worse(a: str, b: str) -> Callable[[Res], tuple[str, str, str]]:
    """A keeps B's quality: the interval's upper end below +EPS (contradicted: its lower end above)."""
    def test(res):
        p = _pair(res, a, b)
        verdict = (NOT_RUN if p is None else NOT_AT_BUDGET if p.lo is None
                   else REPRODUCED if p.hi < EPS else CONTRADICTED if p.lo > EPS else NOT_AT_BUDGET)
        return f"Δ {a} − {b}: {fmt_paired(p)}", f"95% t-interval below +{EPS} nats", verdict
    return test


def pooled_beats(pairs: list[tuple[str, str]], what: str) -> Callable[[Res], tuple[str, str, str]]:
    def test(res):
        p = _pooled(res, pairs)
        return f"Δ {what}: {fmt_paired(p)}", "paired differences of all pairs, 95% t-interval below 0", _below(p)
    return test


def pooled_about(pairs: list[tuple[str, str]], what: str) -> Callable[[Res], tuple[str, str, str]]:
    def test(res):
        p = _pooled(res, pairs)
        return f"Δ {what}: {fmt_paired(p)}", f"pooled 95% t-interval within ±{EPS} nats", _within(p)
    return test


def ordering(table: str, variants: list[str] | None = None, baseline: str = "Mamba_25M"
             ) -> Callable[[Res], tuple[str, str, str]]:
    """Our ranking (paired differences to the baseline) against the paper's order, by Kendall's τ."""
    def test(res):
        present = [v for n, v in res.items() if v.rows and (variants is None or n in variants)]
        theirs = paper.paper_order(table, [v.name for v in present])
        ours = ranking_scores(present, res.get(baseline))
        common = [n for n in theirs if n in ours]
        if len(common) < 3:
            return "—", "Kendall τ", NOT_RUN
        tau = kendall_tau([ours[n] for n in common], [theirs[n] for n in common])
        n = len(common)
        z = (tau or 0.0) / math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
        verdict = REPRODUCED if z > 1.96 else CONTRADICTED if z < -1.96 else NOT_AT_BUDGET
        order = " < ".join(sorted(common, key=lambda x: ours[x]))
        return f"τ = {tau:.2f} over {n} variants (z = {z:.1f}); ours: {order}", \
            "Kendall τ against the paper's order, z beyond ±1.96", verdict
    return test


def speedup_grows(variant: str, baseline: str) -> Callable[[Res], tuple[str, str, str]]:
    """Appendix D: speedup(l) rises as training goes: the slope of speedup against log tokens over
    the second half of each seed pair's speedup curve, the same sign in every seed pair."""
    def test(res):
        if variant not in res or baseline not in res:
            return "—", "", NOT_RUN
        v, b = res[variant], res[baseline]
        slopes = []
        for s in sorted(v.curves.keys() & b.curves.keys()):
            pts = speedup_curve(*v.curves[s], *b.curves[s])
            half = pts[len(pts) // 2:]
            if len(half) >= 3:
                slopes.append(float(np.polyfit(np.log([t for t, _ in half]), [r for _, r in half], 1)[0]))
        if not slopes:
            why = "never reaches the baseline's losses" if v.rows and b.rows else "no curves"
            return f"— ({why})", "slope of speedup(l) over the second half", NOT_RUN if not v.rows else NOT_AT_BUDGET
        same = len(slopes) >= 2 and (all(x > 0 for x in slopes) or all(x < 0 for x in slopes))
        verdict = (REPRODUCED if slopes[0] > 0 else CONTRADICTED) if same else NOT_AT_BUDGET
        return f"slopes per seed pair: {', '.join(f'{x:+.3f}' for x in slopes)}", \
            "slope of speedup(l) against log tokens, second half; the same sign in every seed pair", verdict
    return test


def test_close_to_train(res: Res) -> tuple[str, str, str]:
    """Appendix G: the held-out loss of each run against its final smoothed training loss."""
    d = {(n, r.get("seed", 0)): r["metrics"]["val_loss"] for n, v in res.items() for r in v.rows
         if r["metrics"].get("val_loss") is not None}
    t = {(n, r.get("seed", 0)): r["metrics"]["final_smoothed_loss"] for n, v in res.items() for r in v.rows}
    p = paired_difference(d, t)
    return f"validation − smoothed train over {p.n if p else 0} runs: {fmt_paired(p)}", \
        f"95% t-interval within ±{EPS_TEST} nats", _within(p, EPS_TEST)


# ---- the claims -------------------------------------------------------------------------------------

SEQ_PAR = [(f"MoE-Mamba_25M-e{e}", f"ParMoE-Mamba_25M-e{e}") for e in (1, 2, 4, 8, 16, 32)]
EVERY2 = [(f"InnerMoE_25M-{'+'.join(p)}-every2", f"InnerMoE_25M-{'+'.join(p)}-all")
          for p in (("conv",), ("gate",), ("out",), ("conv", "gate"), ("conv", "out"), ("gate", "out"),
                    ("conv", "gate", "out"))]

CLAIMS = [
    Claim("T1-order", "architectures", "MoE-Mamba < Transformer-MoE < Mamba < Transformer (final loss, 25M)",
          "3.19 < 3.23 < 3.34 < 3.43", ordering("table 1", ["MoE-Mamba_25M", "Transformer-MoE_25M", "Mamba_25M",
                                                          "Transformer_25M"])),
    Claim("T1-moe-mamba", "architectures", "MoE-Mamba beats Mamba (speedup 1.76 at 25M)", "3.19 vs 3.34",
          beats("MoE-Mamba_25M", "Mamba_25M")),
    Claim("T1-transformer-moe", "architectures", "Transformer-MoE beats Mamba (speedup 1.56 at 25M)", "3.23 vs 3.34",
          beats("Transformer-MoE_25M", "Mamba_25M")),
    Claim("T2-ratio", "ratios", "the loss falls as the Mamba share grows (figure 5)", "figure 5's ranks",
          ordering("table 2")),
    Claim("F-8xE4", "ratios", "8 layers of expansion 4 ≈ vanilla Mamba (appendix F)", "no number: ≈",
          about("Mamba_25M-8xE4", "Mamba_25M")),
    Claim("T3-order", "inner", "the ordering of the inner-MoE placements (table 3)", "table 3's losses",
          ordering("table 3")),
    Claim("T3-every2", "inner", "MoE in every other layer beats MoE in all layers (table 3)", "table 3's pairs",
          pooled_beats(EVERY2, "every other layer − all layers, 7 placements")),
    Claim("T4-experts", "experts", "the loss falls monotonically with the number of experts (table 4)",
          "1: 3.66 … 32: 3.53", ordering("table 4", [f"MoE-Mamba_25M-e{e}" for e in (1, 4, 8, 16, 32)])),
    Claim("T4-beats-mamba", "experts", "from 4 experts on, MoE-Mamba beats Mamba (table 4)", "speedups > 1 from 4",
          pooled_beats([(f"MoE-Mamba_25M-e{e}", "Mamba_25M") for e in (4, 8, 16, 32)], "MoE-Mamba e4…e32 − Mamba")),
    Claim("T7-sequential", "parallel", "sequential MoE-Mamba is ahead of parallel (table 7)", "table 7's pairs",
          pooled_beats(SEQ_PAR, "sequential − parallel, 6 expert counts")),
    Claim("T7-parallel-mamba", "parallel", "parallel MoE-Mamba ≈ Mamba from 8 experts (table 7)", "table 7",
          pooled_about([(f"ParMoE-Mamba_25M-e{e}", "Mamba_25M") for e in (8, 16, 32)], "parallel e8…e32 − Mamba")),
    Claim("D-speedup-grows", "architectures", "the speedup grows as training goes on (appendix D, figure 8)",
          "1.6–1.9 at 25M, rising at 100M", speedup_grows("MoE-Mamba_25M", "Mamba_25M")),
    Claim("R1-quality", "architectures", "Mamba-R1 card: MoE with Mamba maintains a Transformer-MoE's quality",
          "no number", not_worse("MoE-Mamba_25M", "Transformer-MoE_25M")),
    Claim("G-test-train", "architectures", "test log-perplexity ≈ training log-perplexity (appendix G)",
          "close at 100M", test_close_to_train),
]


def build_claims(results: str | Path = LOCAL_RESULTS, out: str | Path = LOCAL_REPORTS,
                 preset: str | None = None, device: str | None = None) -> Path:
    """Write <out>/claims.md: every claim's verdict from the rows of `results` (a folder or its
    runs.jsonl; each ablation at `preset`, by default its one preset with rows, and on one device,
    `device` when given) and the model cards' from the bench.jsonl beside it; returns the
    markdown's path."""
    results = rows_file(results, "runs.jsonl")
    all_rows = load_records(results)
    rows = on_device(all_rows, device, results, required=False)
    analysed: dict[str, tuple[str, Res]] = {}
    read = []
    for name in dict.fromkeys(c.ablation for c in CLAIMS):
        spec = get_spec(name)
        chosen, _ = pick_preset(spec, rows, preset if preset in spec.ablation.presets else None, results)
        res = analyse(spec, chosen, rows, results.parent)[0] if chosen else {}
        done = [r for v in res.values() for r in v.rows]
        on = one_device(done, f"the finished runs of '{name}' at preset {chosen}", results)
        if done:
            read.append(f"{name}: {len(done)} at {chosen} on {on}")
        analysed[name] = (chosen, res)
    bench = results.parent / "bench.jsonl"
    bench_rows = on_device(load_records(bench), device, bench, required=False) if bench.is_file() else []
    cards = card_claims(bench_rows)
    if not read and not cards:
        raise no_rows(f"no finished runs of the paper's ablations in {results}"
                      + (f" on a device matching '{device}'" if device else "")
                      + " and no model-card benchmark rows beside it: run e.g. `moebench run architectures` first",
                      results)
    lines = ["# claims: does MoE-Mamba reproduce?", "",
             f"Generated by `moebench report claims` from `{results}` only; do not edit. Each claim of the paper "
             f"(Pióro et al. 2024) with its numbers, ours, the test and a verdict: reproduced, not reproduced at "
             f"this budget (the test cannot tell), contradicted, or not run. Losses are final smoothed training "
             f"losses; Δ is paired seed by seed (the same data order) with a 95% t-interval; ≈ means within "
             f"±{EPS} nats.", "",
             f"Runs read (the latest finished one of each variant and seed, of the {len(all_rows)} rows in the "
             f"file): " + ("; ".join(read) or "none") + ".", "",
             "| claim | ablation (preset) | paper | ours | test | verdict |", "|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for c in CLAIMS:
        chosen, res = analysed[c.ablation]
        ours, test, verdict = c.test(res) if res else ("—", "", NOT_RUN)
        counts[verdict] = counts.get(verdict, 0) + 1
        lines.append(f"| {c.text} | {c.ablation} ({chosen or '—'}) | {c.paper} | {ours} | {test} | **{verdict}** |")
    lines += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".", ""]
    lines += ["## Model cards", "",
              f"The Mamba and Mamba-R1 cards' claims, from the {len(bench_rows)} benchmark rows of `{bench}` only "
              f"(`moebench bench generate`, `bench memory`): each pair on one GPU model, each variant at its fastest "
              f"measured implementation. A claim with no rows is not listed.", ""]
    if cards:
        lines += ["| claim | ours | test | verdict |", "|---|---|---|---|"]
        lines += [f"| {c.claim} | {c.ours} | {c.test} | **{c.verdict}** |" for c in cards]
    else:
        lines.append("No benchmark rows yet.")
    lines.append("")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "claims.md"
    path.write_text("\n".join(lines))
    return path
