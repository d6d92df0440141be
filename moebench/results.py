"""Every record of a results folder (the user's results/local/, the published results/published/;
moebench.paths): one JSON line per row, appended atomically, never rewritten.

    runs.jsonl            kind "train": one row per training run (moebench.train)
    lr_sweeps.jsonl       kind "lr_sweep": one row per swept variant (moebench.sweep)
    bench.jsonl           kinds "bench-*": one row per measured benchmark point
    archive/bench.jsonl   benchmark points measured again later (kept, out of the report's way)

Every row carries "schema" (SCHEMA, one number for every kind) and "kind"; `load_records` upgrades
older rows in memory, so callers only ever see the current schema. A benchmark row is written as
soon as its point is measured:

    {"schema": 2, "kind": "bench-train", "session": "20261126T001157Z-3f9a0c",
     "created": "2026-11-26T00:12:31+00:00", "device": "NVIDIA H100 80GB HBM3",
     "env": {...env.collect()...}, "config": {...the invocation's options...}, "result": {...the point...}}

The points of one invocation share "session". Values derived from several points (a MoE's tokens/s
over its dense equivalent's) are not stored: the report computes them from the rows of one session.

Schema history: 1 = train and lr_sweep rows as now, benchmarks as one JSON file per invocation
(results/bench/*.json: a "results" list, rewritten after every point, with derived "ratios");
2 = benchmark rows per point in bench.jsonl (`migrate_legacy` converts the old files).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from moebench.errors import RunBusy, UserError
from moebench.paths import PUBLISHED_RESULTS

SCHEMA = 2
CKPT_INFO = "checkpoint.json"    # beside a run's ckpt.pt: its step and the run's identity, readable without torch
BENCH_KINDS = ("bench-train", "bench-moe", "bench-memory", "bench-generate", "bench-multi-gpu")
BENCH_FILE = "bench.jsonl"
FILES = {"train": "runs.jsonl", "lr_sweep": "lr_sweeps.jsonl", **{k: BENCH_FILE for k in BENCH_KINDS}}
ARCHIVE = Path("archive") / BENCH_FILE


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
    """Every complete record, upgraded to the current schema; a line that does not parse (a foreign
    fragment) is skipped."""
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
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.extend(upgrade(row))
    return rows


def load_frame(path: str | Path) -> pd.DataFrame:
    rows = load_records(path)
    return pd.json_normalize(rows) if rows else pd.DataFrame()


# ---- rows of the current schema -----------------------------------------------------------------


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_session(created: str | None = None, tag: str | None = None) -> str:
    """A session id: the UTC start time, sortable, and a tag (random for a new invocation)."""
    start = datetime.fromisoformat(created) if created else datetime.now(timezone.utc)
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    stamp = start.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{tag or secrets.token_hex(3)}"


def bench_row(kind: str, session: str, config: dict, result: dict, *, env: dict, device: str,
              created: str | None = None) -> dict:
    """One measured benchmark point, self-describing."""
    if kind not in BENCH_KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}")
    return {"schema": SCHEMA, "kind": kind, "session": session, "created": created or now(), "device": device,
            "env": env, "config": config, "result": result}


def upgrade(row) -> list[dict]:
    """The current-schema rows that one stored row stands for. A schema-1 benchmark record (a whole
    results/bench/*.json) becomes one row per point; other schema-1 rows change only the number.
    Rows without a schema or kind (not ours) and rows of a newer schema come back unchanged."""
    if not isinstance(row, dict) or not isinstance(row.get("schema"), int) or row["schema"] >= SCHEMA:
        return [row]
    if row.get("kind") in BENCH_KINDS and isinstance(row.get("results"), list):
        return legacy_bench_rows(row)
    return [{**row, "schema": SCHEMA}]


LEGACY_ADAMW = {"AdamW": "torch", "AdamW (fused)": "fused",
                "AdamW (fused; tensors >= 2^20 on the Triton step)": "triton"}


def legacy_bench_rows(rec: dict, tag: str | None = None) -> list[dict]:
    """The points of a schema-1 benchmark record as rows, numbers unchanged. Its derived "ratios"
    are dropped (the report recomputes them within the session); "complete" and "finished" go too
    (a row is written once its point is measured). `tag` names the session (the file's stem);
    without one it is a hash of the record, so that upgrading the same record twice gives equal rows."""
    kind, e = rec["kind"], rec.get("env") or {}
    config = dict(rec.get("config") or {})
    if kind == "bench-train" and "optimizer" in config:
        # schema 1 described the optimizer in words; schema 2 records the Impl's adamw choice
        # ("AdamW (fused on CUDA)", the first benchmarks' constant, was torch's fused step on CUDA)
        name = config.pop("optimizer")
        config["adamw"] = LEGACY_ADAMW.get(name, name) if name != "AdamW (fused on CUDA)" else \
            "fused" if e.get("device") == "cuda" else "torch"
    if "gpus" in rec:
        config["gpus"] = rec["gpus"]
    extra = {"bandwidth": rec["bandwidth"]} if "bandwidth" in rec else {}
    tag = tag or hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:6]
    created = rec.get("created") or "1970-01-01T00:00:00+00:00"
    session = new_session(created, tag)
    return [bench_row(kind, session, config, {**{k: v for k, v in point.items() if k != "ratios"}, **extra},
                      env=e, device=rec.get("device") or e.get("device_name") or "?", created=created)
            for point in rec["results"]]


# ---- which rows count -----------------------------------------------------------------------------


def _lr(result: dict):
    return (result.get("train_config") or [{}])[0].get("lr")


# What defines a benchmark point, per kind: the settings a table of points shares (from the
# invocation's config) and the point's place in that table (from its result). Rows with equal keys
# on the same device measure the same thing; the latest one counts.
TABLE_KEYS = {
    "bench-train": lambda c: (c["compile"], c["batch"], c["ctx"], c["dtype"], c.get("impl"), c.get("moe_impl"),
                              c.get("adamw")),
    "bench-moe": lambda c: (c["tokens"], c["d"], c["hidden"], c["experts"], c["top_k"], c["capacity_factor"],
                            c["dtype"]),
    "bench-memory": lambda c: (c["batch"], c["dtype"]),
    "bench-generate": lambda c: (c["cuda_graph"], c["batch"], c["gen_len"], c["dtype"]),
    "bench-multi-gpu": lambda c: (c["n_gpus"],),
}
ROW_KEYS = {
    "bench-train": lambda r: (r["variant"],),
    "bench-moe": lambda r: (r["name"],),
    "bench-memory": lambda r: (r["variant"], r["mode"], r["length"]),
    "bench-generate": lambda r: (r["variant"], r["prompt_len"]),
    "bench-multi-gpu": lambda r: (r["variant"], _lr(r), r.get("steps")),
}


def table_key(row: dict) -> tuple:
    return TABLE_KEYS[row["kind"]](row["config"])


def point_key(row: dict) -> tuple:
    return (row["kind"], row["device"], *table_key(row), *ROW_KEYS[row["kind"]](row["result"]))


def latest_points(rows: list[dict]) -> list[dict]:
    """The latest row of each (kind, point configuration, device): the later "created" wins, ties go
    to the later row. Ordered as the newest session lists its points, then older sessions' others."""
    start: dict[str, str] = {}
    for r in rows:
        start[r["session"]] = min(start.get(r["session"], r["created"]), r["created"])
    newest_first = sorted(rows, key=lambda r: start[r["session"]], reverse=True)    # stable: file order kept
    best: dict[tuple, dict] = {}
    for row in rows:
        k = point_key(row)
        if k not in best or row["created"] >= best[k]["created"]:
            best[k] = row
    return [best[k] for k in dict.fromkeys(point_key(r) for r in newest_first)]


# ---- migration and import -----------------------------------------------------------------------


def _line(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def _results_dir(results: str | Path) -> Path:
    root = Path(results)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file: pass the results folder (runs.jsonl, bench.jsonl)")
    return root


def migrate_legacy(legacy_dir: str | Path = "results/bench", results: str | Path = PUBLISHED_RESULTS) -> dict:
    """Every point of the schema-1 records legacy_dir/*.json as a row: the latest of each point
    configuration goes to RESULTS/bench.jsonl (unless a later row is there already), the points it
    supersedes to RESULTS/archive/bench.jsonl (RESULTS: the published rows unless given). Rows already in either file are skipped, so a second
    run adds nothing. The legacy files are left in place. Returns counts per destination."""
    src, root = Path(legacy_dir), _results_dir(results)
    if not src.is_dir():
        raise UserError(f"no folder {src}: pass the folder of the old benchmark records (results/bench)")
    files = sorted(src.glob("*.json"))
    if not files:
        raise UserError(f"no *.json benchmark records in {src}")
    legacy = []
    for p in files:                          # read them all before writing anything
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p} does not parse as JSON ({e}); move it out of {src} first") from None
        if not (isinstance(rec, dict) and rec.get("kind") in BENCH_KINDS and isinstance(rec.get("results"), list)):
            raise UserError(f"{p} is not a benchmark record (kind bench-*, a results list); move it out of {src}")
        legacy += legacy_bench_rows(rec, tag=p.stem)
    current, archive = root / BENCH_FILE, root / ARCHIVE
    kept = load_records(current)
    seen = {_line(r) for r in kept + load_records(archive)}
    new = [r for r in dict.fromkeys(map(_line, legacy)) if r not in seen]
    new_rows = [json.loads(r) for r in new]
    winners = {id(r) for r in latest_points(kept + new_rows)}
    counts = {"files": len(files), "points": len(legacy), "current": 0, "archived": 0, "skipped": len(legacy) - len(new)}
    for row in new_rows:
        to_current = id(row) in winners
        append_record(current if to_current else archive, row)
        counts["current" if to_current else "archived"] += 1
    return counts


def read_rows(path: str | Path) -> list[dict]:
    """The rows of one file for `moebench results import`, upgraded: JSON lines, or one schema-1
    benchmark record (results/bench/*.json). Anything else is a UserError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no file {p}" + (" (a folder: pass its .jsonl files)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p} ({e})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and whole.get("kind") in BENCH_KINDS and isinstance(whole.get("results"), list):
        raw = legacy_bench_rows(whole, tag=p.stem)           # named as `results migrate` names it
    else:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{p} line {n} is not a JSON row") from None
    rows = [row for r in raw for row in upgrade(r)]
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or row.get("kind") not in FILES:
            kind = row.get("kind") if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{p}: row {n} has kind {kind!r}; results import takes {', '.join(FILES)}")
    return rows


def import_rows(paths: list[str | Path], results: str | Path = PUBLISHED_RESULTS) -> dict[str, int]:
    """Append the rows of `paths` to the file of `results` their kind belongs in (train -> runs.jsonl,
    lr_sweep -> lr_sweeps.jsonl, bench-* -> bench.jsonl): by default the published rows, since rows
    from the lent GPU machines come home this way. Skips rows already there or in the
    archive (identical JSON). Every file is read and checked before anything is written.
    Returns the rows appended per file name, and "skipped"."""
    root = _results_dir(results)
    incoming = [row for p in paths for row in read_rows(p)]
    counts: dict[str, int] = {"skipped": 0}
    seen: dict[str, set[str]] = {}
    for row in incoming:
        name = FILES[row["kind"]]
        if name not in seen:
            old = load_records(root / name) + (load_records(root / ARCHIVE) if name == BENCH_FILE else [])
            seen[name] = {_line(r) for r in old}
        line = _line(row)
        if line in seen[name]:
            counts["skipped"] += 1
            continue
        append_record(root / name, row)
        seen[name].add(line)
        counts[name] = counts.get(name, 0) + 1
    return counts


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
