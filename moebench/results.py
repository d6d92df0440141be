"""results/runs.jsonl: one JSON line per finished run, appended atomically, never rewritten."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

SCHEMA = 1


def append_record(path: str | Path, record: dict) -> None:
    """Append one line with a single write(2) on an O_APPEND descriptor under an exclusive lock:
    a writer killed at any moment leaves either the whole line or nothing, and concurrent writers
    never interleave. The file is only ever appended to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a previous writer that died mid-line (another tool, a full disk) must not glue its
        # fragment to our record: start on a fresh line
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
