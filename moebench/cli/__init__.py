"""Typer CLI: each command parses its options and calls one library function. Tables go to
stdout; progress and messages go to stderr. One module per group of commands (Typer's "one file
per command"): models (list, env, train, data prepare, generate), ablation (ablations, run, report,
sweep lr), bench (bench train|moe|memory|generate), results (results migrate|import)."""
from __future__ import annotations

import sys

import typer

from moebench.cli import ablation, bench, models, results
from moebench.cli.common import err
from moebench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="moebench: MoE-Mamba and baselines: models, training, ablations, benchmarks.")
app.add_typer(models.app)           # without a name: their commands join the main app's
app.add_typer(ablation.app)
app.add_typer(bench.app, name="bench")
app.add_typer(results.app, name="results")


def main():
    """The `moebench` entry point: a UserError is one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
