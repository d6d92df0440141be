"""Which rows a report reads: the file behind --results, the --device filter, and the refusal to put
rows of different devices in one comparison. A loss or a speed measured on an H100 is not one
measured on a CPU (bf16 against fp32, other kernels), so a table that mixed them would read as one
result and be none; the user picks a device instead."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from moebench.errors import UserError
from moebench.paths import published_hint

UNRECORDED = "unrecorded"


def rows_file(results: str | Path, name: str) -> Path:
    """`results` is a results folder (then its file `name`) or a rows file."""
    path = Path(results)
    return path / name if path.is_dir() or not path.suffix else path


def device_of(row: dict) -> str | None:
    """The device a row was measured on: a benchmark row's own field, a training row's env."""
    return row.get("device") or (row.get("env") or {}).get("device_name")


def device_class(name: str | None) -> str:
    """What counts as one device: the GPU model, or "cpu" whatever its thread count (the name of a
    CPU device records its threads: env.device_name)."""
    if not name:
        return UNRECORDED
    return "cpu" if name.startswith("cpu") else name


def on_device(rows: list[dict], device: str | None, source: Path, required: bool = True) -> list[dict]:
    """The rows whose device name contains `device` (case-insensitive); all of them when None. When
    `required`, rows none of which match are a UserError naming the devices there."""
    if device is None:
        return rows
    kept = [r for r in rows if device.lower() in (device_of(r) or "").lower()]
    if required and rows and not kept:
        there = ", ".join(sorted({device_class(device_of(r)) for r in rows}))
        raise UserError(f"no rows on a device matching '{device}' in {source} (devices there: {there})")
    return kept


def one_device(rows: list[dict], what: str, source: Path) -> str | None:
    """The one device of `rows` (None when there are none). Rows of several devices are refused with
    a UserError that names them and how to choose."""
    counts = Counter(device_class(device_of(r)) for r in rows)
    if len(counts) <= 1:
        return next(iter(counts), None)
    listed = ", ".join(f"{d} ({n} row{'s' if n > 1 else ''})" for d, n in counts.most_common())
    first = counts.most_common(1)[0][0]
    example = first if first != UNRECORDED else next(d for d in counts if d != UNRECORDED)
    raise UserError(f"{what} in {source} mix devices: {listed}; a report compares rows of one device, "
                    f"choose it with --device (e.g. --device '{example}')")


def no_rows(message: str, source: str | Path) -> UserError:
    """The error of a report that found nothing to report: `message` and, unless the published rows
    were read already, where they are (never a silent fallback to them)."""
    return UserError(message + published_hint(source))
