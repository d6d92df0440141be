"""`moebench results migrate|import`: bring rows into the published results, from the old benchmark
records or from another machine (a lent GPU machine's bench.jsonl or runs.jsonl). Rows that come
home this way are the published ones, so both write to results/published/ unless told otherwise;
the user's own runs never pass through here."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moebench.cli.common import out
from moebench.paths import PUBLISHED_RESULTS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help=f"Bring rows into {PUBLISHED_RESULTS}/: old benchmark records, rows from another machine.")
IntoOpt = Annotated[str, typer.Option("--into", "--out", help="results folder the rows go to")]


@app.command("migrate")
def migrate_cmd(
    folder: Annotated[str, typer.Argument(help="folder of the old records (*.json, one per invocation)")] = "results/bench",
    results: IntoOpt = PUBLISHED_RESULTS,
):
    """Old benchmark records (FOLDER/*.json) -> one row per point: the latest of each point in
    INTO/bench.jsonl, the points it supersedes in INTO/archive/bench.jsonl. Rows already in either
    file are skipped; the old files are left in place.

    Example: moebench results migrate results/bench && git rm results/bench/*.json
    """
    from moebench.results import migrate_legacy     # pandas: loaded by the commands that use it
    n = migrate_legacy(folder, results)
    out.print(f"{n['points']} points of {n['files']} records: {n['current']} appended to {Path(results) / 'bench.jsonl'}, "
              f"{n['archived']} to {Path(results) / 'archive' / 'bench.jsonl'}, {n['skipped']} there already; "
              f"{folder}/*.json can go", highlight=False, soft_wrap=True)


@app.command("import")
def import_cmd(
    files: Annotated[list[str], typer.Argument(help="files of rows (JSON lines), e.g. a GPU machine's bench.jsonl")],
    results: IntoOpt = PUBLISHED_RESULTS,
):
    """Append rows to the file of INTO their kind belongs in (train -> runs.jsonl, lr_sweep ->
    lr_sweeps.jsonl, bench-* -> bench.jsonl), skipping rows already there (identical JSON).

    Example: moebench results import /tmp/gpu-out/bench.jsonl && moebench report bench --results results/published
    """
    from moebench.results import import_rows
    n = import_rows(files, results)
    added = ", ".join(f"{v} to {Path(results) / k}" for k, v in n.items() if k != "skipped") or "nothing"
    out.print(f"appended {added}; {n['skipped']} rows there already", highlight=False, soft_wrap=True)
