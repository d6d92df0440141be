"""Statistics of the reports: rank agreement with the paper (Kendall's tau-b), mean ± std over seeds,
and paired differences between variants trained on the same seeds (the same data order) with their
95% t-intervals. Plain Python: no numpy, pandas or matplotlib."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b between two score lists (ties allowed, as in the paper's tables):
    (concordant - discordant) / sqrt((pairs not tied in x) * (pairs not tied in y)).
    None for fewer than 2 items or when one list is constant."""
    if len(x) != len(y):
        raise ValueError("kendall_tau needs two lists of the same length")
    conc = disc = only_x = only_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                only_x += 1
            elif dy == 0:
                only_y += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + only_x) * (conc + disc + only_y))
    return (conc - disc) / denom if denom else None


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values; std is None for fewer than two."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_ms(mean: float | None, std: float | None, digits: int = 3) -> str:
    """A table cell: "mean ± std", the mean alone for one seed, "—" without a value."""
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


# two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30 (any statistics table)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """t_{0.975}(df): the table up to 30, then the Cornish-Fisher expansion around z = 1.95996
    (within 2e-4 of the exact quantile from df = 31 on)."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Paired:
    """mean of the paired differences and its 95% t-interval (None for one pair), over n pairs."""
    mean: float
    lo: float | None
    hi: float | None
    n: int


def paired_difference(a: dict, b: dict) -> Paired | None:
    """a - b over the keys (seeds) both have finite values for: the paired difference, whose spread
    is the seed-to-seed noise of the difference, not of each variant's loss. None without a pair."""
    diffs = [a[k] - b[k] for k in sorted(a.keys() & b.keys())
             if a[k] is not None and b[k] is not None and math.isfinite(a[k] - b[k])]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return Paired(mean, None, None, 1)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(mean, mean - half, mean + half, len(diffs))


def fmt_paired(p: Paired | None, digits: int = 3) -> str:
    """A table cell: "+0.012 [-0.003, +0.027] (3 seeds)", "+0.012 (1 seed)", "—" without a pair."""
    if p is None:
        return "—"
    if p.lo is None:
        return f"{p.mean:+.{digits}f} (1 seed)"
    return f"{p.mean:+.{digits}f} [{p.lo:+.{digits}f}, {p.hi:+.{digits}f}] ({p.n} seeds)"
