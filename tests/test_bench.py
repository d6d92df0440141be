"""Benchmarks on CPU with tiny configs: each benchmark appends one self-describing row per point as
soon as it is measured, MoE variants get their dense-equivalent and loop baselines (ratios computed
within a session), out-of-memory is recorded as a result, and the report renders the latest row of
each point into tables and figures named by what they show."""
from __future__ import annotations

import json
import re
import runpy
import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from moebench.bench import common, memory, train_step
from moebench.bench.generate import bench_generate
from moebench.bench.memory import bench_memory
from moebench.bench.train_step import bench_train
from moebench.errors import UserError
from moebench.registry import get
from moebench.report.bench import (by_session, group_tables, moe_ratios, render_bench_report, summary_rows, table,
                                   train_ratios)
from moebench.results import SCHEMA, append_record, bench_row, load_records

ROW_KEYS = {"schema", "kind", "session", "created", "device", "env", "config", "result"}
ENV_KEYS = {"git_sha", "git_dirty", "torch", "device", "device_name"}


pytestmark = pytest.mark.usefixtures("one_thread")


def small(name: str):
    """A tiny twin with a 256-token vocabulary: the head and AdamW stay cheap on CPU."""
    return replace(get(name + "@tiny"), vocab_size=256)


def check_rows(rows: list[dict], kind: str):
    """Rows of one session: self-describing, one schema, JSON as they are."""
    assert rows and {r["session"] for r in rows} == {rows[0]["session"]}
    for r in rows:
        assert r.keys() == ROW_KEYS and r["kind"] == kind and r["schema"] == SCHEMA
        assert ENV_KEYS <= r["env"].keys() and r["device"] == r["env"]["device_name"]
        assert r["config"] == rows[0]["config"]
        json.dumps(r)


def test_bench_train_with_baselines(tmp_path):
    rows = bench_train([small("MoE-Mamba_25M"), small("Mamba_25M")], batch=1, ctx=16, dtype="fp32",
                       steps=2, warmup=1, device="cpu", results=tmp_path)
    check_rows(rows, "bench-train")
    assert load_records(tmp_path / "bench.jsonl") == rows
    by = {r["result"]["variant"]: r for r in rows}
    assert list(by) == ["MoE-Mamba_25M@tiny", "MoE-Mamba_25M@tiny[dense-eq]", "MoE-Mamba_25M@tiny[loop]",
                        "Mamba_25M@tiny"]
    main, dense, loop = (by[f"MoE-Mamba_25M@tiny{s}"]["result"] for s in ("", "[dense-eq]", "[loop]"))
    assert all(r["result"]["status"] == "ok" for r in rows)
    assert dense["model"]["ffn"] == "dense" and dense["baseline"] == "dense-equivalent" and dense["of"] == main["variant"]
    assert loop["impl"]["moe"] == "loop" and loop["baseline"] == "loop" and loop["of"] == main["variant"]
    assert main["impl"]["mixer"] == "ref" and main["impl"]["compile"] is False and main["of"] is None
    assert dense["params"]["active"] < main["params"]["total"]
    for r in rows:
        assert len(r["result"]["step_s"]["all"]) == 2 and r["result"]["tokens_per_s"] > 0 and r["result"]["mfu"] is None
        assert "ratios" not in r["result"], "derived from several points: computed by the report"
    ratios = train_ratios(by["MoE-Mamba_25M@tiny"], by_session(rows))
    assert ratios == {"vs_dense_equivalent": pytest.approx(main["tokens_per_s"] / dense["tokens_per_s"]),
                      "vs_loop": pytest.approx(main["tokens_per_s"] / loop["tokens_per_s"])}
    assert train_ratios(by["Mamba_25M@tiny"], by_session(rows)) == {}


def test_bench_train_records_oom(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(train_step, "time_train_step", oom)
    rows = bench_train([small("Transformer-MoE_25M")], batch=1, ctx=8, dtype="fp32", steps=1, warmup=0, device="cpu")
    assert [r["result"]["status"] for r in rows] == ["oom"] * 3
    assert "simulated" in rows[0]["result"]["error"]
    assert train_ratios(rows[0], by_session(rows)) == {"vs_dense_equivalent": None, "vs_loop": None}

    def other(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access")
    monkeypatch.setattr(train_step, "time_train_step", other)
    with pytest.raises(RuntimeError, match="illegal memory access"):       # only out-of-memory is a result
        bench_train([small("Mamba_25M")], batch=1, ctx=8, dtype="fp32", steps=1, warmup=0, device="cpu")


def test_bench_memory_appends_each_point_as_measured_and_records_oom(monkeypatch, tmp_path):
    real = memory.memory_train_step

    def fake(model, idx_BL, tgt_BL, amp, loss_chunk):
        if idx_BL.shape[1] >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real(model, idx_BL, tgt_BL, amp, loss_chunk)
    monkeypatch.setattr(memory, "memory_train_step", fake)
    on_disk = []
    rows = bench_memory([small("Transformer-MoE_25M")], lengths=[64, 8, 32, 16], dtype="fp32", device="cpu",
                        repeats=1, warmup=0, results=tmp_path,
                        on_point=lambda row: on_disk.append(len(load_records(tmp_path / "bench.jsonl"))))
    check_rows(rows, "bench-memory")
    assert on_disk == list(range(1, 9)), "each point is in bench.jsonl before the next one is measured"
    got = {(r["result"]["mode"], r["result"]["length"]): r["result"] for r in rows}
    assert [got["train", n]["status"] for n in (8, 16, 32, 64)] == ["ok", "ok", "oom", "oom"]
    assert "simulated" in got["train", 32]["error"] and got["train", 64]["skipped"] is True
    assert all(got["prefill", n]["status"] == "ok" for n in (8, 16, 32, 64))
    assert got["prefill", 64]["tokens"] == 64 and got["prefill", 64]["time_s"]["n"] == 1


def test_memory_prefill_uses_last_position_logits():
    torch.manual_seed(0)
    model = common.build(small("Mamba_25M"), "ref", "auto", torch.device("cpu")).eval()
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    logits = memory.memory_prefill_step(model, torch.randint(0, 256, (2, 12)), common.amp_context("fp32", None))
    assert logits.shape == (2, 256) and seen == [(2, model.cfg.d_model)]


def test_bench_generate_state_and_kv():
    rows = bench_generate([small("MoE-Mamba_25M"), small("Transformer-MoE_25M")], prompt_lens=[8, 32],
                          gen_len=3, batch=2, dtype="fp32", device="cpu")
    check_rows(rows, "bench-generate")
    res = {(r["result"]["variant"], r["result"]["prompt_len"]): r["result"] for r in rows}
    assert all(r["status"] == "ok" and r["decode_tokens_per_s"] > 0 for r in res.values())
    mm8, mm32 = res["MoE-Mamba_25M@tiny", 8], res["MoE-Mamba_25M@tiny", 32]
    assert mm8["state_bytes"] == mm32["state_bytes"] and "kv_bytes_per_step" not in mm8
    tm8, tm32 = res["Transformer-MoE_25M@tiny", 8], res["Transformer-MoE_25M@tiny", 32]
    assert tm8["kv_bytes_per_step"] < tm32["kv_bytes_per_step"]
    # 2 layers x (K and V) x batch 2 x 64 channels x 33.5 positions on average x 4 bytes
    assert tm32["kv_bytes_per_step"] == 2 * 2 * 2 * 64 * (32 + 2) * 4
    assert mm8["bandwidth"]["used_bytes_s"] is None                     # CPU: no bound, and no guess
    assert mm32["prompt_logits_gib"] == pytest.approx(2 * 32 * 256 * 4 / 2**30)
    # on a CPU the decode steps take the MoE's training path, not the Triton decode kernels
    assert mm8["impl"]["decode"] is False and tm8["impl"]["decode"] is False


# ---- report: built from rows ------------------------------------------------------------------

ENV = {"git_sha": "abc1234", "git_dirty": False, "torch": "2.13.0", "mamba_ssm": "2.3.2", "device": "cuda",
       "device_name": "NVIDIA H100 80GB HBM3"}
H100 = "NVIDIA H100 80GB HBM3"


def train_row(session, created, variant, tok_s, *, baseline=None, of=None, device=H100, status="ok", **config):
    cfg = {"batch": 32, "ctx": 1024, "dtype": "bf16", "compile": False, "impl": "fast", "moe_impl": "auto",
           "adamw": "fused", "steps": 20, "warmup": 5, **config}
    res = {"variant": variant, "baseline": baseline, "of": of, "status": status, "tokens_per_s": tok_s,
           "step_s": {"median": 32768 / tok_s}, "tflops": 1.0, "mfu": 0.1, "peak_mem_gib": 1.0,
           "impl": {"mixer": "fast", "moe": "grouped" if "MoE" in variant else None}}
    return bench_row("bench-train", session, cfg, res, env=ENV, device=device, created=created)


def moe_session(session, created, ms: dict):
    cfg = {"tokens": 64, "d": 16, "hidden": 32, "experts": 4, "top_k": 1, "capacity_factor": 1.0, "dtype": "bf16"}
    return [bench_row("bench-moe", session, cfg, {"name": n, "status": "ok", "fwd_ms": {"median": v / 3},
                                                   "fwd_bwd_ms": {"median": v}, "tflops_fwd_bwd": 1.0},
                      env=ENV, device=H100, created=created) for n, v in ms.items()]


def test_ratios_come_from_the_rows_of_one_session():
    a = "20260101T000000Z-aaaaaa"
    b = "20260102T000000Z-bbbbbb"
    rows = [train_row(a, "2026-01-01T00:00:00+00:00", "MoE", 300e3),
            train_row(a, "2026-01-01T00:01:00+00:00", "MoE[dense-eq]", 400e3, baseline="dense-equivalent", of="MoE"),
            train_row(a, "2026-01-01T00:02:00+00:00", "MoE[loop]", 100e3, baseline="loop", of="MoE"),
            train_row(b, "2026-01-02T00:00:00+00:00", "MoE", 360e3),      # measured again, alone
            train_row(b, "2026-01-02T00:01:00+00:00", "MoE[loop]", 90e3, baseline="loop", of="MoE", status="oom")]
    sessions = by_session(rows)
    assert train_ratios(rows[0], sessions) == {"vs_dense_equivalent": 0.75, "vs_loop": 3.0}
    assert train_ratios(rows[3], sessions) == {"vs_loop": None}, "never against another session's baseline"
    [t] = group_tables(rows)
    # the newest session's points in its order, then the older sessions' others
    assert [r["result"]["variant"] for r in t.rows] == ["MoE", "MoE[loop]", "MoE[dense-eq]"]
    assert [r["session"] for r in t.rows] == [b, b, a] and t.sessions == [b, a]
    title, cols, body = table(t, sessions)
    assert cols[-1] == "session" and [line[-1] for line in body] == ["[1]", "[1]", "[2]"]
    assert body[0][:1] + body[0][-3:] == ["MoE", "-", "-", "[1]"] and body[1][2] == "OOM"
    moe = moe_session(a, "2026-01-01T00:00:00+00:00", {"dense": 1.0, "grouped": 2.5, "loop": 10.0})
    moe += moe_session(b, "2026-01-02T00:00:00+00:00", {"grouped": 2.0})
    assert moe_ratios(by_session(moe)[a]) == {"grouped_over_dense": 2.5, "loop_over_grouped": 4.0}
    assert moe_ratios(by_session(moe)[b]) == {}
    summary = {line[0]: line[1] for line in summary_rows(group_tables(rows + moe), by_session(rows + moe))}
    assert summary["train eager MoE"].startswith("360.0k") and summary["↳ MoE vs loop"] == "-"
    assert summary["MoE layer fwd+bwd (ms)"] == "grouped 2.00, dense 1.00, loop 10.00"


def test_report_names_figures_by_content_and_links_every_png(tmp_path):
    res, rep = tmp_path / "results", tmp_path / "reports"
    rows = [train_row("20260101T000000Z-aaaaaa", "2026-01-01T00:00:00+00:00", "Mamba_25M", 3e5),
            train_row("20260102T000000Z-bbbbbb", "2026-01-02T00:00:00+00:00", "Mamba_25M", 3e5,
                      adamw="triton"),
            train_row("20260103T000000Z-cccccc", "2026-01-03T00:00:00+00:00", "Mamba_25M", 4e5, compile=True),
            train_row("20260103T000000Z-dddddd", "2026-01-03T00:00:00+00:00", "Mamba_25M", 1e3,
                      device="cpu (x86_64, 2 threads)", dtype="fp32")]
    for r in rows:
        append_record(res / "bench.jsonl", r)
    rep.mkdir()
    (rep / "bench_train_2.png").write_bytes(b"an old figure")                     # a counter: removed
    (rep / "experts_loss.png").write_bytes(b"the ablation report's")               # not ours: kept
    # an H100 and a CPU in one file: one report would read as one machine's numbers, so it is refused
    with pytest.raises(UserError, match=r"mix devices: NVIDIA H100 80GB HBM3 \(3 rows\), cpu \(1 row\); .*--device"):
        render_bench_report(res, rep)
    assert not (rep / "bench.md").exists() and (rep / "bench_train_2.png").exists()
    md = render_bench_report(res, rep, device="h100").read_text()
    pngs = sorted(p.name for p in rep.glob("*.png"))
    # the H100 tables differ in compile and optimizer, so both are named
    assert pngs == ["bench_train_compiled_32x1024_fused-adamw_h100.png", "bench_train_eager_32x1024_fused-adamw_h100.png",
                    "bench_train_eager_32x1024_triton-adamw_h100.png", "experts_loss.png"]
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(linked) == [p for p in pngs if p.startswith("bench_")]
    assert md.count("## training steps") == 3 and "session 20260102T000000Z-bbbbbb" in md
    assert f"from 3 row(s) (those on a device matching 'h100', of 4) of 3 session(s) in `{res / 'bench.jsonl'}`" in md
    # the CPU's table needs neither compile nor optimizer in its name; the H100 figures are stale there
    md = render_bench_report(res, rep, device="cpu").read_text()
    assert sorted(p.name for p in rep.glob("bench_*.png")) == ["bench_train_eager_32x1024_cpu.png"]
    assert md.count("## training steps") == 1
    with pytest.raises(UserError, match="no rows on a device matching 'H200' .* \\(devices there: NVIDIA H100 80GB HBM3, cpu\\)"):
        render_bench_report(res, rep, device="H200")
    with pytest.raises(UserError, match="no benchmark rows in .*missing/bench.jsonl: run `moebench bench"):
        render_bench_report(tmp_path / "missing", rep)


# ---- CLI ------------------------------------------------------------------------------------------


def _run(args):
    from moebench.cli import app
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_cli_bench_commands_and_report(tmp_path):
    res, rep = tmp_path / "results", tmp_path / "reports"
    r = _run(["bench", "train", "Transformer-MoE_25M@tiny", "--batch", "1", "--ctx", "16", "--steps", "1",
              "--warmup", "0", "--dtype", "fp32", "--device", "cpu", "--format", "json", "--out", str(res)])
    rows = json.loads(r.stdout)
    check_rows(rows, "bench-train")
    assert rows == load_records(res / "bench.jsonl")
    assert [x["result"]["variant"] for x in rows][1:] == ["Transformer-MoE_25M@tiny[dense-eq]",
                                                           "Transformer-MoE_25M@tiny[loop]"]
    r = _run(["bench", "moe", "--tokens", "64", "--d", "16", "--hidden", "32", "--experts", "4", "--steps", "1",
              "--warmup", "0", "--dtype", "fp32", "--device", "cpu", "--no-loop", "--out", str(res)])
    assert "grouped" in r.stdout and "dense" in r.stdout and "ratios: grouped_over_dense" in r.stdout
    moe = [x for x in load_records(res / "bench.jsonl") if x["kind"] == "bench-moe"]
    check_rows(moe, "bench-moe")
    assert {x["result"]["name"] for x in moe} >= {"dense", "grouped"}
    assert all(x["result"]["kernel_ms_fwd_bwd"] is None for x in moe)          # GPU kernels: CUDA only
    _run(["bench", "memory", "--variants", "Mamba_25M@tiny", "--lengths", "8,16", "--repeats", "1",
          "--dtype", "fp32", "--device", "cpu", "--out", str(res), "--plots", str(tmp_path / "p")])
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["bench_memory_b1_cpu.png"]
    r = _run(["bench", "generate", "--variants", "Mamba_25M@tiny,Transformer_25M@tiny", "--prompt-len", "8,16",
              "--gen-len", "2", "--batch", "2", "--dtype", "fp32", "--device", "cpu", "--out", str(res)])
    assert "Transformer_25M@tiny" in r.stdout
    assert {x["kind"] for x in load_records(res / "bench.jsonl")} == {"bench-generate", "bench-memory", "bench-moe",
                                                                     "bench-train"}
    _run(["report", "bench", "--results", str(res), "--out", str(rep)])
    md = (rep / "bench.md").read_text()
    assert "Transformer-MoE_25M@tiny[dense-eq]" in md and "## Summary" in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == ["bench_generate_eager_b2_cpu.png", "bench_memory_b1_cpu.png", "bench_train_eager_1x16_cpu.png"]
    assert all(f"]({p})" in md for p in pngs)


def test_cli_bench_bad_input_is_a_user_error(tmp_path):
    from moebench.cli import app
    (tmp_path / "file").write_text("")
    for args in (["bench", "train", "NoSuchModel"], ["bench", "memory", "--lengths", "a,b"],
                 ["bench", "train", "Mamba_25M@tiny", "--format", "xml"],
                 ["bench", "memory", "--variants", "Mamba_25M@tiny", "--device", "cpu", "--out", str(tmp_path / "file")],
                 ["report", "bench", "--results", str(tmp_path / "missing")]):
        r = CliRunner().invoke(app, args)
        assert isinstance(r.exception, UserError), (args, r.output)


def test_multi_gpu_summary_writes_a_row_that_renders(tmp_path, monkeypatch):
    """scripts/multi_gpu_summary.py: the 1- and N-GPU runs of a model -> one bench-multi-gpu row."""
    runs = tmp_path / "runs"
    for world, tok_s, mem in (("1", 77e3, 48.8), ("2", 127e3, 58.2)):
        d = runs / f"MoE-Mamba_100M-w{world}"
        (d / "runs").mkdir(parents=True)
        curve = d / "curve.csv"
        curve.write_text("step,tokens,loss,tok_s\n1,32768,7.0,{0}\n40,1310720,6.4,{0}\n".format(tok_s))
        append_record(d / "runs.jsonl", {"schema": 1, "kind": "train", "curve": str(curve),
                                         "metrics": {"tokens_per_s": tok_s, "val_loss": 6.43, "peak_mem_gib": mem},
                                         "train": {"lr": 5e-4}, "env": {"git_sha": "abc"}, "params": {}})
    monkeypatch.setattr(sys, "argv", ["multi_gpu_summary.py", str(runs), "2", str(tmp_path / "out")])
    runpy.run_path("scripts/multi_gpu_summary.py", run_name="__main__")
    [row] = load_records(tmp_path / "out" / "bench.jsonl")
    assert row["kind"] == "bench-multi-gpu" and row["schema"] == SCHEMA and row["config"]["n_gpus"] == 2
    assert row["result"]["scaling_efficiency"] == pytest.approx(127 / 154)
    [t] = group_tables([row])
    title, cols, body = table(t, by_session([row]))
    assert "1 vs 2 GPUs" in title and body[0][6] == "82%" and body[0][9] == "6.4300 / 6.4300"
    assert any("2 GPUs MoE-Mamba_100M" in r[0] and "scaling 82%" in r[1] for r in summary_rows([t], by_session([row])))
