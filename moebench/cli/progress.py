"""Training progress on stderr for `train`, `run` and `sweep lr`. On a terminal, Rich bars redrawn in
place. Elsewhere (a pipe, a log file, CI) a bar shows nothing until the run ends, so one plain line per
running training every PLAIN_EVERY_S seconds instead, which `tail -f` and a log both keep."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from moebench.cli.common import err
from moebench.fmt import duration

PLAIN_EVERY_S = 10.0


class TrainingProgress:
    """start(label, tokens) a training, update(p) at each curve point (p: moebench.train.Progress),
    end(text) when it stops; `overall` adds a bar over all of them (terminal only). The bars start at
    the first curve point, so that an error before it stays one line."""

    def __init__(self, overall: str = "", overall_tokens: int = 0, *, disable: bool = False,
                 console: Console | None = None):
        self.console = console or err
        self.disable = disable
        self.bar = None if disable or not self.console.is_terminal else Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(), console=self.console)
        self.overall = self.bar.add_task(overall, total=overall_tokens or 1, stats="") if self.bar and overall else None
        self.finished_tokens = 0
        self.task = None
        self.label = self.note = ""
        self.printed = -float("inf")

    def start(self, label: str, total_tokens: int, note: str = "") -> None:
        """`note` is said at the first curve point, once the run is under way: an error before it
        (bad data, nothing to resume) stays the only line."""
        self.label, self.printed, self.note = label, -float("inf"), note
        if self.bar:
            self.task = self.bar.add_task(label, total=total_tokens, stats="")

    def update(self, p) -> None:
        if self.disable:
            return
        if self.note:
            self.console.print(self.note, highlight=False, soft_wrap=True)
            self.note = ""
        val = f"val {p.val_loss:.3f}" if p.val_loss is not None else ""
        if self.bar:
            if not self.bar.live.is_started:
                self.bar.start()
            self.bar.update(self.task, completed=p.tokens, total=p.total_tokens,
                            stats=f"loss {p.loss:.3f} smoothed {p.smoothed:.3f} {val + ' ' if val else ''}"
                                  f"{p.tok_s:,.0f} tok/s")
            if self.overall is not None:
                self.bar.update(self.overall, completed=self.finished_tokens + p.tokens)
            return
        now = time.monotonic()
        if now - self.printed < PLAIN_EVERY_S and p.step < p.steps:
            return
        self.printed = now
        eta = (p.total_tokens - p.tokens) / p.tok_s if p.tok_s else None
        self.console.print(f"{self.label}: step {p.step:,}/{p.steps:,} ({p.tokens / p.total_tokens:.0%}), loss "
                           f"{p.loss:.3f}, smoothed {p.smoothed:.3f}, {val + ', ' if val else ''}"
                           f"{p.tok_s:,.0f} tok/s, ETA {duration(eta)}", highlight=False, soft_wrap=True)

    def end(self, text: str = "", tokens: int = 0, label: str = "") -> None:
        """A training stopped, or was passed over: `text` says how (after its bar, or as a plain line);
        its `tokens` count toward the overall bar. `label` names one that never started."""
        self.finished_tokens += tokens
        if self.disable:
            return
        label = label or self.label
        if self.bar:
            if self.task is not None and text:
                self.bar.update(self.task, stats=text)
            if self.overall is not None:
                self.bar.update(self.overall, completed=self.finished_tokens, stats=f"last: {label} {text}")
        elif text:
            self.console.print(f"{label}: {text}", highlight=False, soft_wrap=True)
        self.task, self.label = None, ""

    def close(self) -> None:
        if self.bar and self.bar.live.is_started:   # stopping one never started prints a blank line
            self.bar.stop()

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
