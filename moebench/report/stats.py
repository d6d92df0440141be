"""Statistics of the reports: rank agreement with the paper (Kendall's tau-b) and mean ± std over
seeds. Plain Python: no numpy, pandas or matplotlib."""
from __future__ import annotations

import math
import statistics


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
