"""Comparing an ablation's variants from their rows: per-variant results over seeds, the paper's
speedup (per seed pair and of the mean curves), paired differences to the baseline, the ranking
they give, and its rank agreement with the paper."""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moebench.config import ModelConfig
from moebench.metrics import speedup
from moebench.report.stats import Paired, kendall_tau, mean_std, paired_difference


@dataclass
class VariantResult:
    name: str
    cfg: ModelConfig                              # what was trained at this preset (the @tiny twin at tiny scale)
    rows: list[dict] = field(default_factory=list)   # one per seed
    curves: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)  # seed -> (tokens, smoothed)
    speedups: dict[int, float | None] = field(default_factory=dict)   # per seed pair
    speedup_reason: str = ""
    speedup_of_means: float | None = None         # speedup of the seed-mean curves
    paired: Paired | None = None                  # final loss minus the baseline's, over common seeds
    interrupted: list[dict] = field(default_factory=list)   # checkpoint.json of seeds stopped before the end

    def metric(self, key: str) -> list[float]:
        return [r["metrics"].get(key) for r in self.rows if r["metrics"].get(key) is not None]

    @property
    def loss(self) -> tuple[float | None, float | None]:
        return mean_std(self.metric("final_smoothed_loss"))

    @property
    def final_by_seed(self) -> dict[int, float]:
        return {r.get("seed", 0): r["metrics"]["final_smoothed_loss"] for r in self.rows
                if r["metrics"].get("final_smoothed_loss") is not None}


def compute_speedups(results: dict[str, VariantResult], baseline: str) -> None:
    """speedup(variant over baseline) on the smoothed curves (the paper's tables): per seed, pairing
    seeds where the baseline has the same seed, else using the baseline's first seed; and of the
    mean curves over the seeds both have, the number the report gives, with the per-seed values as
    its range."""
    base = results.get(baseline)
    if base is None or not base.curves:
        return
    first = min(base.curves)
    for v in results.values():
        for seed, (t, y) in v.curves.items():
            bt, by = base.curves.get(seed, base.curves[first])
            s = speedup(t, y, bt, by)
            v.speedups[seed] = s.value
            if s.value is None:
                v.speedup_reason = s.reason
        if v.curves:       # the mean curves over the seeds both have: the same data orders
            seeds = sorted(v.curves.keys() & base.curves.keys()) or None
            v.speedup_of_means = speedup(*mean_curve(v.curves, seeds), *mean_curve(base.curves, seeds)).value


def mean_curve(curves: dict[int, tuple[list[float], list[float]]], seeds: list[int] | None = None
                ) -> tuple[list[float], list[float]]:
    """The smoothed curves of `seeds` (default: all) averaged on the first one's token grid, up to
    where every one reaches (runs of one config log at the same tokens: an average point by point)."""
    seeds = seeds or sorted(curves)
    grid = [t for t in curves[seeds[0]][0] if all(t <= curves[s][0][-1] for s in seeds)]
    mean = [statistics.fmean(float(np.interp(t, *curves[s])) for s in seeds) for t in grid]
    return grid, mean


def compute_paired(results: dict[str, VariantResult], baseline: str) -> None:
    """Each variant's final smoothed loss minus the baseline's, seed by seed (same data order)."""
    base = results.get(baseline)
    if base is None:
        return
    for v in results.values():
        v.paired = paired_difference(v.final_by_seed, base.final_by_seed)


def ranking_scores(present: list[VariantResult], base: VariantResult | None) -> dict[str, float]:
    """What the report ranks by, lower is better: the mean paired difference to the baseline where
    the two share a seed, else the difference of the means (else the mean loss, without a baseline)."""
    base_mean = base.loss[0] if base is not None and base.rows else None
    scores = {}
    for v in present:
        if v.paired is not None:
            scores[v.name] = v.paired.mean
        elif v.loss[0] is not None:
            scores[v.name] = v.loss[0] - (base_mean or 0.0)
    return scores


def rank_agreement(present: list[VariantResult], theirs: dict[str, float], ours: dict[str, float]
                    ) -> tuple[float | None, list[float | None], list[str]]:
    """(tau of our ranking scores against the paper's order, tau per seed when there are several
    seeds, the variants compared: those with both our result and a paper number)."""
    common = [n for n in theirs if ours.get(n) is not None]
    tau = kendall_tau([ours[n] for n in common], [theirs[n] for n in common]) if len(common) >= 2 else None
    seed_taus = []
    seeds = sorted({r.get("seed", 0) for v in present for r in v.rows})
    if len(seeds) > 1:
        for s in seeds:
            per = {v.name: r["metrics"]["final_smoothed_loss"] for v in present for r in v.rows
                   if r.get("seed", 0) == s and r["metrics"].get("final_smoothed_loss") is not None}
            names = [n for n in common if n in per]
            if len(names) >= 2:
                seed_taus.append(kendall_tau([per[n] for n in names], [theirs[n] for n in names]))
    return tau, seed_taus, common


def speedup_cell(v: VariantResult, baseline: str) -> str:
    """The seed-mean curves' speedup, with the range of the per-seed ones when there are several."""
    if v.speedup_of_means is None:
        return f"— (never reaches {baseline}'s final loss)" if v.speedup_reason else "—"
    per_seed = [x for x in v.speedups.values() if x is not None]
    if len(v.speedups) < 2:
        return f"{v.speedup_of_means:.2f}"
    spread = f"{min(per_seed):.2f}–{max(per_seed):.2f}" if per_seed else "none reached"
    return f"{v.speedup_of_means:.2f} (seeds {spread}, {len(per_seed)} of {len(v.speedups)})"


def read_curve(row: dict, results_dir: Path) -> tuple[list[float], list[float]] | None:
    """(tokens, smoothed loss) of a run's curve.csv: where the row says (relative to the results
    folder), else RESULTS/runs/<run_id>/; None when there is none."""
    candidates = []
    if row.get("curve"):
        c = Path(row["curve"])
        candidates += [c] if c.is_absolute() else [results_dir / c]
    candidates.append(results_dir / "runs" / str(row.get("run_id")) / "curve.csv")
    for path in candidates:
        if path.is_file():
            tokens, smoothed = [], []
            with open(path, newline="") as f:
                for rec in csv.DictReader(f):
                    try:
                        t, s = float(rec["tokens"]), float(rec["smoothed"])
                    except (KeyError, TypeError, ValueError):
                        continue
                    if math.isfinite(s):
                        tokens.append(t)
                        smoothed.append(s)
            return (tokens, smoothed) if tokens else None
    return None
