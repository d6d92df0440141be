"""Human-readable numbers, one place for the CLI and the reports: token counts in, sizes and
durations out."""
from __future__ import annotations

from moebench.errors import UserError


def human(n: float | None) -> str:
    """12.3M, 540M, 2.4B, 950: three significant digits and a unit (k, M, B); '—' for None."""
    if n is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def parse_tokens(text: str) -> int:
    """'50M', '1B', '2.5e6', '20000' -> int tokens."""
    t = text.strip().upper().replace("_", "")
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise UserError(f"bad token count '{text}': use e.g. 20000, 50M or 1B") from None
    if not 0 < value < float("inf"):      # also NaN and inf ('inf', '1e400')
        raise UserError(f"token count must be positive and finite, got '{text}'")
    return int(value)


def duration(seconds: float | None) -> str:
    """45s, 12min, 3.5h, 2.1d; '?' for None."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
