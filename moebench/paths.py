"""Where rows and reports live by default, relative to the working directory (the checkout).

The published rows (measured on the lent GPUs, tracked by git) are reference data: commands write
there only when asked (`results import`, `--out results/published`). What a user runs on their own
machine goes to ignored folders, so that the checkout stays clean and the published rows never mix
with theirs. No torch or pandas here: the CLI reads these defaults before it loads anything heavy."""
from __future__ import annotations

from pathlib import Path

LOCAL_RESULTS = "results/local"            # the user's runs, sweeps and benchmarks (.gitignore)
PUBLISHED_RESULTS = "results/published"    # the published rows (tracked)
LOCAL_REPORTS = "reports/local"            # reports of the user's rows (.gitignore)


def published_hint(results: str | Path) -> str:
    """The pointer a report adds when it finds no rows: where the published ones are, unless it was
    reading them already."""
    folder = Path(results)
    if folder.suffix == ".jsonl":
        folder = folder.parent
    if folder.resolve() == Path(PUBLISHED_RESULTS).resolve():
        return ""
    return f"; the published rows: --results {PUBLISHED_RESULTS}"
