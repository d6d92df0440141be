"""What the command modules share: the consoles (tables and results on stdout, progress, warnings
and errors on stderr, so that `moebench ... > file` keeps only the answer), the progress bar, and
the parsing of comma-separated option values."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

out = Console()
if not out.is_terminal:           # piped or in a log: wide tables instead of wrapped names
    out = Console(width=max(out.width, 180))
err = Console(stderr=True)


def progress_bar(disable: bool = False) -> Progress:
    """A bar per task with a free-text `stats` field (loss, tokens/s), on stderr."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=err,
                    transient=False, disable=disable)


def split_list(text: str | None) -> list[str] | None:
    """Comma-separated names: "a, b,c" -> ["a", "b", "c"]; None for an empty or absent option."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None
