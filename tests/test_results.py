"""results/*.jsonl are append-only and atomic per record: a writer SIGKILLed at any moment leaves
whole lines only and the file only grows; two writers at once never interleave; a foreign fragment
is fenced off by the next append and skipped by load_records. Every kind is read at one schema
(older rows upgraded on load); the legacy benchmark records migrate point by point, each exactly
once; `results import` routes rows by kind and skips the ones already there."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebench.errors import UserError
from moebench.results import (ARCHIVE, BENCH_KINDS, SCHEMA, append_record, bench_row, import_rows, latest_points,
                              load_frame, load_records, migrate_legacy, point_key)

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


# ---- one schema, rows upgraded on load, legacy benchmark records migrated ----------------------

LEGACY = Path(__file__).parent / "fixtures" / "legacy_bench"
ENV = {"git_sha": "abc1234", "torch": "2.13.0", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
CONFIGS = {   # one invocation's config per kind, as the benchmarks write them
    "bench-train": {"batch": 32, "ctx": 1024, "dtype": "bf16", "compile": False, "impl": "fast",
                    "moe_impl": "auto", "adamw": "fused"},
    "bench-moe": {"tokens": 64, "d": 16, "hidden": 32, "experts": 4, "top_k": 1, "capacity_factor": 1.0,
                  "dtype": "bf16"},
    "bench-memory": {"batch": 1, "dtype": "bf16"},
    "bench-generate": {"batch": 64, "gen_len": 128, "dtype": "bf16", "cuda_graph": True},
    "bench-multi-gpu": {"n_gpus": 2},
}
RESULTS = {   # one point per kind
    "bench-train": {"variant": "Mamba_25M", "status": "ok", "tokens_per_s": 1.0},
    "bench-moe": {"name": "dense", "status": "ok"},
    "bench-memory": {"variant": "Mamba_25M", "mode": "train", "length": 512, "status": "ok"},
    "bench-generate": {"variant": "Mamba_25M", "prompt_len": 1024, "status": "ok"},
    "bench-multi-gpu": {"variant": "Mamba_100M", "status": "ok", "steps": 40, "train_config": [{"lr": 1e-3}]},
}


def row(kind="bench-train", session="s1", created="2026-01-01T00:00:00+00:00", device="NVIDIA H100 80GB HBM3",
        config=None, **result):
    return bench_row(kind, session, {**CONFIGS[kind], **(config or {})}, {**RESULTS[kind], **result}, env=ENV,
                     device=device, created=created)


def legacy_points() -> list[tuple[str, dict]]:
    """(file stem, point) of every point of the legacy fixture, as written by the old benchmarks."""
    return [(p.stem, point) for p in sorted(LEGACY.glob("*.json")) for point in json.loads(p.read_text())["results"]]


def test_every_kind_is_written_and_read_at_one_schema(tmp_path):
    assert SCHEMA == 2
    old_train = {"schema": 1, "kind": "train", "run_id": "r1", "metrics": {"tokens": 5}}
    old_sweep = {"schema": 1, "kind": "lr_sweep", "variant": "Mamba_25M", "best_lr": 1e-3}
    append_record(tmp_path / "runs.jsonl", old_train)
    append_record(tmp_path / "lr_sweeps.jsonl", old_sweep)
    for kind in BENCH_KINDS:
        append_record(tmp_path / "bench.jsonl", row(kind))
    loaded = {f: load_records(tmp_path / f) for f in ("runs.jsonl", "lr_sweeps.jsonl", "bench.jsonl")}
    assert {r["schema"] for rows in loaded.values() for r in rows} == {SCHEMA}
    assert sorted(r["kind"] for r in loaded["bench.jsonl"]) == sorted(BENCH_KINDS)
    assert loaded["runs.jsonl"] == [{**old_train, "schema": SCHEMA}]           # only the number changes
    with pytest.raises(ValueError):
        bench_row("bench-nope", "s", {}, {}, env={}, device="cpu")


def test_load_upgrades_a_legacy_record_into_rows(tmp_path):
    rec = json.loads((LEGACY / "h100_train_compile_v3.json").read_text())
    gen = json.loads((LEGACY / "h100_generate_graph_v6.json").read_text())
    multi = json.loads((LEGACY / "h100x2_multi_gpu.json").read_text())
    for r in (rec, gen, multi, {"no": "schema"}, {"schema": SCHEMA + 1, "kind": "bench-train", "results": []}):
        append_record(tmp_path / "old.jsonl", r)
    rows = load_records(tmp_path / "old.jsonl")
    assert len(rows) == len(rec["results"]) + len(gen["results"]) + len(multi["results"]) + 2
    assert rows[-2:] == [{"no": "schema"}, {"schema": SCHEMA + 1, "kind": "bench-train", "results": []}]
    train = rows[:3]
    assert {r["session"] for r in train} == {train[0]["session"]} and train[0]["session"].startswith("20261125T205643Z")
    for r, point in zip(train, rec["results"]):
        assert r.keys() == {"schema", "kind", "session", "created", "device", "env", "config", "result"}
        assert r["schema"] == SCHEMA and r["kind"] == "bench-train" and r["created"] == rec["created"]
        assert r["env"] == rec["env"] and r["device"] == rec["device"]
        assert r["result"] == {k: v for k, v in point.items() if k != "ratios"}    # derived: recomputed in reports
    # the optimizer in words (the first benchmarks' constant among them) becomes the Impl's adamw choice
    assert rec["config"]["optimizer"] == "AdamW (fused on CUDA)" and train[0]["config"]["adamw"] == "fused"
    assert "optimizer" not in train[0]["config"]
    assert all(r["result"]["bandwidth"] == gen["bandwidth"] for r in rows[3:5])
    assert rows[5]["config"]["gpus"] == multi["gpus"]
    assert load_records(tmp_path / "old.jsonl") == rows                          # the same rows every time


def test_latest_row_per_point_configuration():
    old = row(session="a", created="2026-01-01T00:00:00+00:00", tokens_per_s=1.0)
    new = row(session="b", created="2026-01-02T00:00:00+00:00", tokens_per_s=2.0)
    other_device = row(session="a", device="NVIDIA H200", created="2026-01-01T00:00:00+00:00")
    other_config = row(session="a", config={"batch": 64})
    other_variant = row(session="a", variant="Transformer_25M")
    tie = row(session="c", created="2026-01-02T00:00:00+00:00", tokens_per_s=3.0)
    rows = [old, other_variant, new, other_device, other_config]
    latest = latest_points(rows)
    assert new in latest and old not in latest and len(latest) == 4
    assert latest[0] is new, "the newest session's points come first"
    assert latest_points(rows + [tie])[0] is tie, "on equal times the later row wins"
    assert point_key(old) == point_key(new) != point_key(other_device)
    # the settings that do not define a point (steps, the variants list) do not split it
    assert point_key(row(config={"steps": 5, "variants": ["x"]})) == point_key(old)


def test_migrate_keeps_every_point_exactly_once(tmp_path):
    before = {p.name: p.read_bytes() for p in LEGACY.glob("*.json")}
    counts = migrate_legacy(LEGACY, tmp_path)
    current, archive = load_records(tmp_path / "bench.jsonl"), load_records(tmp_path / ARCHIVE)
    points = legacy_points()
    assert counts == {"files": 11, "points": len(points), "current": 18, "archived": 10, "skipped": 0}
    assert len(current) + len(archive) == len(points) == 28
    for stem, point in points:
        want = {k: v for k, v in point.items() if k != "ratios"}
        found = [r for r in current + archive if r["session"].endswith("-" + stem)
                 and {k: r["result"].get(k) for k in want} == want]
        assert len(found) == 1, f"{stem}: {point.get('variant') or point.get('name')} found {len(found)} times"
        assert set(found[0]["result"]) - set(want) <= {"bandwidth"}
    # the current file holds exactly the latest row of each point; each archived one has a newer twin
    assert latest_points(current + archive) == latest_points(current) and len(latest_points(current)) == len(current)
    newest = {point_key(r): r["created"] for r in current}
    assert all(r["created"] < newest[point_key(r)] for r in archive)
    sessions = {r["session"].split("-", 1)[1] for r in archive}
    assert sessions == {"h100_train_eager_v5", "h100_train_compile_v3", "h100_moe_v4", "h100_generate_graph_v4",
                        "h100x2_multi_gpu"}
    assert migrate_legacy(LEGACY, tmp_path)["skipped"] == 28                    # a second run adds nothing
    assert len(load_records(tmp_path / "bench.jsonl")) == 18
    assert {p.name: p.read_bytes() for p in LEGACY.glob("*.json")} == before     # the old files stay


def test_migrate_refuses_bad_folders_and_files(tmp_path):
    with pytest.raises(UserError, match="no folder"):
        migrate_legacy(tmp_path / "missing", tmp_path / "results")
    with pytest.raises(UserError, match="no \\*.json"):
        migrate_legacy(tmp_path, tmp_path / "results")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a.json").write_text((LEGACY / "h100_moe_v6.json").read_text())
    (tmp_path / "old" / "notes.json").write_text('{"kind": "something else"}')
    with pytest.raises(UserError, match="notes.json is not a benchmark record"):
        migrate_legacy(tmp_path / "old", tmp_path / "results")
    assert not (tmp_path / "results").exists(), "nothing is written before every file is read"
    (tmp_path / "results").write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        migrate_legacy(LEGACY, tmp_path / "results")


def test_import_routes_by_kind_and_skips_rows_already_there(tmp_path):
    res = tmp_path / "results"
    train = {"schema": SCHEMA, "kind": "train", "run_id": "r1"}
    sweep = {"schema": 1, "kind": "lr_sweep", "variant": "Mamba_25M"}
    bench = [row(kind) for kind in BENCH_KINDS]
    src = tmp_path / "gpu.jsonl"
    for r in [train, sweep, *bench, bench[0]]:                                 # one row twice
        append_record(src, r)
    append_record(res / "bench.jsonl", bench[1])                                # already home
    assert import_rows([src], res) == {"runs.jsonl": 1, "lr_sweeps.jsonl": 1, "bench.jsonl": 4, "skipped": 2}
    assert load_records(res / "runs.jsonl") == [train]
    assert load_records(res / "lr_sweeps.jsonl") == [{**sweep, "schema": SCHEMA}]
    assert sorted(r["kind"] for r in load_records(res / "bench.jsonl")) == sorted(BENCH_KINDS)
    assert import_rows([src], res) == {"skipped": 8}
    # a legacy record (one whole JSON file) imports as its points, in the session `results migrate` gives them
    assert import_rows([LEGACY / "h100_moe_v6.json"], res)["bench.jsonl"] == 4
    assert migrate_legacy(LEGACY, res)["skipped"] == 4


def test_import_refuses_bad_input_and_writes_nothing(tmp_path, digest):
    res = tmp_path / "results"
    append_record(res / "bench.jsonl", row())
    good, torn, alien = tmp_path / "good.jsonl", tmp_path / "torn.jsonl", tmp_path / "alien.jsonl"
    append_record(good, row(session="s2"))
    torn.write_text(json.dumps(row(session="s3")) + "\n" + '{"kind": "bench-tr')
    append_record(alien, {"schema": SCHEMA, "kind": "checkpoint"})
    before = digest(res)
    for paths, message in (([good, tmp_path / "missing.jsonl"], "no file"), ([good, torn], "line 2 is not a JSON row"),
                           ([good, alien], "kind 'checkpoint'"), ([tmp_path], "a folder")):
        with pytest.raises(UserError, match=message):
            import_rows(paths, res)
        assert digest(res) == before, f"{message}: nothing may be written when one file is bad"


def test_results_commands_exit_2_on_bad_paths(tmp_path, cli_main):
    code, out, err = cli_main(["results", "migrate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
    assert code == 2 and "no folder" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli_main(["results", "import", str(tmp_path / "nowhere.jsonl"), "--out", str(tmp_path / "r")])
    assert code == 2 and "no file" in err
    code, out, err = cli_main(["results", "migrate", str(LEGACY), "--out", str(tmp_path / "r")])
    assert code == 0 and "18 appended" in out and "10 to" in out
    assert len(load_records(tmp_path / "r" / "bench.jsonl")) == 18
