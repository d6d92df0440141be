"""Benchmarks on CPU with tiny configs: each command runs and writes a valid self-describing record,
MoE variants get their dense-equivalent and loop baselines, out-of-memory is recorded as a result,
and the report renders the records."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import moebench.bench as bench
from moebench.report.bench import load_bench_records, render_bench_report, summary_rows, table
from moebench.registry import get

RECORD_KEYS = {"schema", "kind", "created", "complete", "config", "results", "env", "device"}
ENV_KEYS = {"git_sha", "git_dirty", "torch", "device", "device_name"}


pytestmark = pytest.mark.usefixtures("one_thread")


def small(name: str):
    """A tiny twin with a 256-token vocabulary: the head and AdamW stay cheap on CPU."""
    return replace(get(name + "@tiny"), vocab_size=256)


def check_record(rec: dict, kind: str):
    assert RECORD_KEYS <= rec.keys(), RECORD_KEYS - rec.keys()
    assert rec["kind"] == kind and rec["schema"] == bench.SCHEMA and rec["complete"] is True
    assert ENV_KEYS <= rec["env"].keys()
    json.dumps(rec)                                        # serialisable as is


def test_bench_train_with_baselines():
    rec = bench.bench_train([small("MoE-Mamba_25M"), small("Mamba_25M")], batch=1, ctx=16, dtype="fp32",
                            steps=2, warmup=1, device="cpu")
    check_record(rec, "bench-train")
    by = {r["variant"]: r for r in rec["results"]}
    assert list(by) == ["MoE-Mamba_25M@tiny", "MoE-Mamba_25M@tiny[dense-eq]", "MoE-Mamba_25M@tiny[loop]",
                        "Mamba_25M@tiny"]
    main, dense, loop = by["MoE-Mamba_25M@tiny"], by["MoE-Mamba_25M@tiny[dense-eq]"], by["MoE-Mamba_25M@tiny[loop]"]
    assert all(r["status"] == "ok" for r in rec["results"])
    assert dense["model"]["ffn"] == "dense" and dense["baseline"] == "dense-equivalent" and dense["of"] == main["variant"]
    assert loop["impl"]["moe"] == "loop" and loop["baseline"] == "loop"
    assert main["impl"]["mixer"] == "ref" and main["impl"]["compile"] is False
    assert dense["params"]["active"] < main["params"]["total"]
    for r in rec["results"]:
        assert len(r["step_s"]["all"]) == 2 and r["tokens_per_s"] > 0 and r["mfu"] is None
    assert main["ratios"]["vs_dense_equivalent"] == pytest.approx(main["tokens_per_s"] / dense["tokens_per_s"])
    assert "ratios" not in by["Mamba_25M@tiny"]


def test_bench_train_records_oom(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(bench, "_train_one", oom)
    rec = bench.bench_train([small("Transformer-MoE_25M")], batch=1, ctx=8, dtype="fp32", steps=1, warmup=0,
                            device="cpu")
    assert [r["status"] for r in rec["results"]] == ["oom"] * 3
    assert rec["results"][0]["ratios"] == {"vs_dense_equivalent": None, "vs_loop": None}


def test_bench_memory_records_oom_as_a_result(monkeypatch):
    real = bench.memory_train_step

    def fake(model, idx_BL, tgt_BL, amp, loss_chunk):
        if idx_BL.shape[1] >= 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real(model, idx_BL, tgt_BL, amp, loss_chunk)
    monkeypatch.setattr(bench, "memory_train_step", fake)
    saved = []
    cfg = small("Transformer-MoE_25M")
    rec = bench.bench_memory([cfg], lengths=[64, 8, 32, 16], dtype="fp32", device="cpu", repeats=1, warmup=0,
                             on_update=lambda r: saved.append(len(r["results"])))
    check_record(rec, "bench-memory")
    got = {(r["mode"], r["length"]): r for r in rec["results"]}
    assert [got["train", n]["status"] for n in (8, 16, 32, 64)] == ["ok", "ok", "oom", "oom"]
    assert "simulated" in got["train", 32]["error"] and got["train", 64]["skipped"] is True
    assert all(got["prefill", n]["status"] == "ok" for n in (8, 16, 32, 64))
    assert got["prefill", 64]["tokens"] == 64 and got["prefill", 64]["time_s"]["n"] == 1
    assert saved == list(range(1, 9)) + [8], "the record is saved after every point, and once complete"


def test_memory_prefill_uses_last_position_logits():
    torch.manual_seed(0)
    model = bench.build(small("Mamba_25M"), "ref", "auto", torch.device("cpu")).eval()
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    logits = bench.memory_prefill_step(model, torch.randint(0, 256, (2, 12)), bench.amp_context("fp32", None))
    assert logits.shape == (2, 256) and seen == [(2, model.cfg.d_model)]


def test_bench_generate_state_and_kv():
    rec = bench.bench_generate([small("MoE-Mamba_25M"), small("Transformer-MoE_25M")], prompt_lens=[8, 32],
                               gen_len=3, batch=2, dtype="fp32", device="cpu")
    check_record(rec, "bench-generate")
    res = {(r["variant"], r["prompt_len"]): r for r in rec["results"]}
    assert all(r["status"] == "ok" and r["decode_tokens_per_s"] > 0 for r in res.values())
    mm8, mm32 = res["MoE-Mamba_25M@tiny", 8], res["MoE-Mamba_25M@tiny", 32]
    assert mm8["state_bytes"] == mm32["state_bytes"] and "kv_bytes_per_step" not in mm8
    tm8, tm32 = res["Transformer-MoE_25M@tiny", 8], res["Transformer-MoE_25M@tiny", 32]
    assert tm8["kv_bytes_per_step"] < tm32["kv_bytes_per_step"]
    # 2 layers x (K and V) x batch 2 x 64 channels x 33.5 positions on average x 4 bytes
    assert tm32["kv_bytes_per_step"] == 2 * 2 * 2 * 64 * (32 + 2) * 4
    assert rec["bandwidth"]["used_bytes_s"] is None          # CPU: no bound, and no guess
    assert mm32["prompt_logits_gib"] == pytest.approx(2 * 32 * 256 * 4 / 2**30)
    # on a CPU the decode steps take the MoE's training path, not the Triton decode kernels
    assert mm8["impl"]["decode"] is False and tm8["impl"]["decode"] is False


# ---- CLI + report -------------------------------------------------------------------------------


def _run(args):
    from moebench.cli import app
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_cli_bench_commands_and_report(tmp_path):
    res = tmp_path / "results"
    r = _run(["bench", "train", "Transformer-MoE_25M@tiny", "--batch", "1", "--ctx", "16", "--steps", "1",
              "--warmup", "0", "--dtype", "fp32", "--device", "cpu", "--format", "json",
              "--out", str(res / "train.json")])
    rec = json.loads(r.stdout)
    check_record(rec, "bench-train")
    assert rec == json.loads((res / "train.json").read_text())
    assert [x["variant"] for x in rec["results"]][1:] == ["Transformer-MoE_25M@tiny[dense-eq]",
                                                          "Transformer-MoE_25M@tiny[loop]"]
    r = _run(["bench", "moe", "--tokens", "64", "--d", "16", "--hidden", "32", "--experts", "4", "--steps", "1",
              "--warmup", "0", "--dtype", "fp32", "--device", "cpu", "--out", str(res / "moe.json")])
    assert "grouped" in r.stdout and "dense" in r.stdout
    moe = json.loads((res / "moe.json").read_text())
    check_record(moe, "bench-moe")
    assert {x["name"] for x in moe["results"]} >= {"dense", "grouped", "loop"}
    assert all(x["kernel_ms_fwd_bwd"] is None for x in moe["results"])      # GPU kernels: CUDA only
    _run(["bench", "memory", "--variants", "Mamba_25M@tiny", "--lengths", "8,16", "--repeats", "1",
          "--dtype", "fp32", "--device", "cpu", "--out", str(res / "memory.json"), "--plots", str(tmp_path / "p")])
    assert (tmp_path / "p" / "bench_memory.png").exists()
    r = _run(["bench", "generate", "--variants", "Mamba_25M@tiny,Transformer_25M@tiny", "--prompt-len", "8,16",
              "--gen-len", "2", "--batch", "2", "--dtype", "fp32", "--device", "cpu",
              "--out", str(res / "gen.json")])
    assert "Transformer_25M@tiny" in r.stdout

    records = load_bench_records(res)
    assert sorted(x["kind"] for x in records) == ["bench-generate", "bench-memory", "bench-moe", "bench-train"]
    for rec in records:
        title, cols, rows = table(rec)
        assert rows and all(len(row) == len(cols) for row in rows)
    assert summary_rows(records)
    _run(["report-bench", "--results", str(res), "--out", str(tmp_path / "rep")])
    md = (tmp_path / "rep" / "bench.md").read_text()
    assert "Transformer-MoE_25M@tiny[dense-eq]" in md and "## Summary" in md
    assert (tmp_path / "rep" / "bench_memory.png").exists() and (tmp_path / "rep" / "bench_generate_eager.png").exists()
    assert render_bench_report(res, tmp_path / "rep2", plots=False).name == "bench.md"


def test_cli_bench_bad_input_is_a_user_error():
    from moebench.cli import app
    from moebench.errors import UserError
    for args in (["bench", "train", "NoSuchModel"], ["bench", "memory", "--lengths", "a,b"],
                 ["bench", "train", "Mamba_25M@tiny", "--format", "xml"]):
        r = CliRunner().invoke(app, args)
        assert isinstance(r.exception, UserError), (args, r.output)


def test_multi_gpu_record_renders(tmp_path):
    """scripts/multi_gpu_summary.py's record (kind bench-multi-gpu) in the tables and the summary."""
    import json
    res = {"variant": "MoE-Mamba_100M", "world_sizes": [1, 2], "status": "ok", "steps": 40,
           "tokens_per_s": {"1": 77e3, "2": 127e3}, "tokens_per_s_per_gpu": {"1": 77e3, "2": 63.5e3},
           "scaling_efficiency": 127 / 154, "speedup": 127 / 77, "max_abs_loss_diff": 0.025,
           "final_val_loss": {"1": 6.4318, "2": 6.4249}, "peak_mem_gib_rank0": {"1": 48.8, "2": 58.2},
           "train_config": [{"lr": 5e-4}, {"lr": 5e-4}], "repeat_1gpu_max_abs_loss_diff": 0.5}
    rec = {"schema": 1, "kind": "bench-multi-gpu", "created": "2026-11-25T21:00:00+00:00", "complete": True,
           "config": {"n_gpus": 2, "parallelism": "DDP (NCCL)"}, "results": [res, {"variant": "X", "status": "missing"}],
           "env": {}, "device": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "m.json").write_text(json.dumps(rec))
    recs = load_bench_records(tmp_path)
    title, cols, rows = table(recs[0])
    assert "1 vs 2 GPUs" in title and rows[0][6] == "82%" and rows[0][9] == "6.4318 / 6.4249" and rows[0][8] == "0.500"
    assert rows[1][-1] == "MISSING"
    assert any("2 GPUs MoE-Mamba_100M" in r[0] and "scaling 82%" in r[1] for r in summary_rows(recs))
    assert "data parallel" in render_bench_report(tmp_path, tmp_path / "rep", plots=False).read_text()
