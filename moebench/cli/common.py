"""What the command modules share: the consoles (tables and results on stdout, progress, warnings
and errors on stderr, so that `moebench ... > file` keeps only the answer), the --ckpt-every option, and
the parsing of comma-separated option values."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

out = Console()
if not out.is_terminal:           # piped or in a log: wide tables instead of wrapped names
    out = Console(width=max(out.width, 180))
err = Console(stderr=True)


# every training command: bounds the work a kill, a crash or a lost machine costs to about this much
CkptEveryOpt = Annotated[str, typer.Option(
    "--ckpt-every", help="checkpoint every N steps (200) or every so long (30s, 2m, 1h): what a kill or a crash "
                         "can cost; saved at the next curve point, and spaced out where saving takes over ~5% of the time")]
CKPT_EVERY = "2m"


def split_list(text: str | None) -> list[str] | None:
    """Comma-separated names: "a, b,c" -> ["a", "b", "c"]; None for an empty or absent option."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
