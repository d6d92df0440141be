"""results/runs.jsonl: one JSON line per finished run, appended atomically, never rewritten."""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from moebench.errors import RunBusy

SCHEMA = 1


def append_record(path: str | Path, record: dict) -> None:
    """Append one line: under an exclusive lock on a side file, write the old content plus the line
    to a temporary file and rename it over the original. A writer killed at any moment (SIGKILL can
    cut a large write(2) short) leaves the old file or the new one, never a torn line; the file only
    ever grows, and concurrent writers never interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    lock = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):      # a foreign fragment: start on a fresh line
            old += b"\n"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(old + data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)                     # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    finally:
        os.close(lock)                           # also releases the lock


def load_records(path: str | Path) -> list[dict]:
    """Every complete record; a line that does not parse (a foreign fragment) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def load_frame(path: str | Path):
    import pandas as pd
    rows = load_records(path)
    return pd.json_normalize(rows) if rows else pd.DataFrame()


@contextmanager
def run_lock(run_dir: str | Path, what: str = "this run"):
    """Exclusive, non-blocking lock of one run's folder for as long as a process trains it, so that
    two processes (two `moebench run`s of ablations that share a run, or a repeated `moebench
    train`) never write the same checkpoint. flock dies with its process, even under SIGKILL, so a
    killed run leaves no stale lock. Raises RunBusy when another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "train.lock", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{what} is being trained by another process (lock {run_dir / 'train.lock'})") from None
        yield
    finally:
        os.close(fd)          # closing the descriptor releases the lock
