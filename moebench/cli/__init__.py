"""Typer CLI: each command parses its options and calls one library function. Tables go to
stdout; progress and messages go to stderr. One module per group of commands (Typer's "one file
per command"): models (list, env, train, data prepare), ablation (ablations, run, report, sweep lr),
bench (bench ..., generate, report-bench)."""
from __future__ import annotations

import sys

import typer

from moebench.cli import ablation, bench, models
from moebench.cli.common import err
from moebench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="moebench: MoE-Mamba and baselines: models, training, ablations, benchmarks.")
app.add_typer(models.app)           # without a name: their commands join the main app's
app.add_typer(ablation.app)
# bench.py adds its commands to the app it is given; given one of its own, they come after the
# others in --help, as the groups above do
bench_app = typer.Typer()
bench.register(bench_app)
app.add_typer(bench_app)


def main():
    """The `moebench` entry point: a UserError is one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
