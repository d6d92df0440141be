"""results/runs.jsonl is append-only and atomic per record: a writer SIGKILLed at any moment leaves
whole lines only and the file only grows; two writers at once never interleave; a foreign fragment
is fenced off by the next append and skipped by load_records."""
import json
import random
import subprocess
import sys
import time

import pytest

from moebench.results import append_record, load_frame, load_records

# appends records with a fixed-length line until killed (n < 0) or n records are written; waits for
# the file `go` first unless go is "-"
WRITER = r"""
import os, sys, time
from moebench.results import append_record
path, pad, tag, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
while go != "-" and not os.path.exists(go):
    time.sleep(0.001)
i = 0
while n < 0 or i < n:
    append_record(path, {"writer": tag, "i": f"{i:08d}", "pad": tag * pad})
    i += 1
"""


def line_of(tag: str, i: int, pad: int) -> bytes:
    return (json.dumps({"writer": tag, "i": f"{i:08d}", "pad": tag * pad}, sort_keys=True) + "\n").encode()


def writer(path, pad, tag, n=-1, go="-", env=None):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(pad), tag, str(n), str(go)], env=env)


def check_whole_lines(data: bytes, pad: int, context: str) -> list[dict]:
    tail = len(data) - data.rfind(b"\n") - 1
    assert tail == 0, f"{context}: the file ends in a partial line ({tail:,} bytes after the last newline)"
    rows = []
    for k, line in enumerate(data.split(b"\n")[:-1]):
        try:
            row = json.loads(line)
        except ValueError:
            pytest.fail(f"{context}: line {k} ({len(line):,} bytes) does not parse: {line[:60]!r}...{line[-30:]!r}")
        assert row["pad"] == row["writer"] * pad, f"{context}: line {k} has a damaged payload"
        rows.append(row)
    return rows


def test_killed_writer_leaves_whole_lines_and_the_file_only_grows(tmp_path, sub_env):
    """Kill a writer of 1 MB records three times, each time after a random delay and, when we can
    see one, in the middle of a record's write(2): the moment a non-atomic append would tear."""
    path, pad = tmp_path / "runs.jsonl", 1_000_000
    line_len = len(line_of("k", 0, pad))
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for trial in range(3):
        before = path.read_bytes() if path.exists() else b""
        context = f"trial {trial} (seed {seed})"
        p = writer(path, pad, "k", env=sub_env)
        try:
            sizes, t0 = [], time.monotonic()
            while (size := path.stat().st_size if path.exists() else 0) == len(before):
                assert p.poll() is None and time.monotonic() - t0 < 30, f"{context}: the writer never wrote"
                time.sleep(0.001)
            t_kill = time.monotonic() + rng.uniform(0.02, 0.3)
            while time.monotonic() < t_kill:
                sizes.append(path.stat().st_size)
                time.sleep(0.0005)
            t_give_up = time.monotonic() + 0.5           # then wait for a record half written, if one shows
            while (size := path.stat().st_size) and (size - len(before)) % line_len == 0 \
                    and time.monotonic() < t_give_up:
                sizes.append(size)
            sizes.append(size)
        finally:
            p.kill()
            p.wait()
        data = path.read_bytes()
        sizes.append(len(data))
        assert sizes == sorted(sizes), f"{context}: the file shrank while being appended to"
        assert data[:len(before)] == before, f"{context}: bytes written before this writer started changed"
        rows = check_whole_lines(data, pad, context)
        assert len(rows) > trial, f"{context}: expected every killed writer to have written a record first"
        assert load_records(path) == rows


def test_concurrent_writers_never_interleave(tmp_path, sub_env):
    path, pad, n = tmp_path / "runs.jsonl", 100_000, 30
    go = tmp_path / "go"
    procs = [writer(path, pad, tag, n, go, sub_env) for tag in "ab"]
    time.sleep(0.3)                                      # both interpreters up and waiting
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0
    rows = check_whole_lines(path.read_bytes(), pad, "two writers")
    assert len(rows) == 2 * n
    for tag in "ab":
        assert [r["i"] for r in rows if r["writer"] == tag] == [f"{i:08d}" for i in range(n)]


def test_append_fences_off_a_foreign_fragment_and_load_skips_it(tmp_path):
    path = tmp_path / "sub" / "runs.jsonl"
    append_record(path, {"run_id": "one", "metrics": {"tokens": 1}})     # creates the folder too
    with open(path, "ab") as f:
        f.write(b'{"run_id": "torn", "metr')                           # another tool died mid-line
    append_record(path, {"run_id": "two", "metrics": {"tokens": 2}})
    lines = path.read_bytes().split(b"\n")
    assert lines[1] == b'{"run_id": "torn", "metr' and json.loads(lines[2])["run_id"] == "two"
    assert [r["run_id"] for r in load_records(path)] == ["one", "two"]
    frame = load_frame(path)
    assert list(frame["metrics.tokens"]) == [1, 2]


def test_records_are_one_sorted_json_line_each(tmp_path):
    path = tmp_path / "runs.jsonl"
    assert load_records(path) == [] and load_frame(path).empty
    rec = {"z": 1, "a": {"y": [1, 2], "b": None}, "text": "line\nbreak", "path": tmp_path}
    append_record(path, rec)
    append_record(path, rec)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].index('"a"') < lines[0].index('"z"')                  # sort_keys: stable diffs
    assert load_records(path)[0] == {**rec, "path": str(tmp_path)}         # non-JSON values as str
