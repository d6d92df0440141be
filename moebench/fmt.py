"""Human-readable numbers, one place for the CLI and the reports: token counts in; sizes, rates,
sequence lengths and durations out."""
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


def per_s(x: float | None) -> str:
    """A rate (tokens/s) in a table: 321.5k, 1.23M; '-' for None."""
    if x is None:
        return "-"
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


def length(n: int) -> str:
    """A sequence length: 8k for 8192, 1000 as is."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


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


def parse_ckpt_every(text: str) -> tuple[int, float]:
    """`--ckpt-every`: '200' -> every 200 steps; '30s', '2m', '1.5h' -> every so many minutes.
    Returns (steps, minutes): the other one is 0 steps (never by steps) or inf minutes."""
    t = text.strip().lower()
    unit = {"s": 1 / 60, "m": 1, "min": 1, "h": 60}
    suffix = next((u for u in sorted(unit, key=len, reverse=True) if t.endswith(u)), "")
    try:
        value = float(t[:len(t) - len(suffix)]) if suffix else int(t)
    except ValueError:
        raise UserError(f"bad --ckpt-every '{text}': use steps (200) or a duration (30s, 2m, 1h)") from None
    if not 0 < value < float("inf"):
        raise UserError(f"--ckpt-every must be positive and finite, got '{text}'")
    return (0, value * unit[suffix]) if suffix else (int(value), float("inf"))
