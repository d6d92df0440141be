"""`moebench bench check`: the comparison of a baseline's rows with a rerun's (a pure function, tested
on synthetic rows), the refusal of a baseline from another machine, the loading of a baseline, and
the rerun itself on CPU: every point of a tiny baseline of each benchmark kind is measured again and
matched, and the command exits 0, 1 or 2 as it should."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moebench.bench import check
from moebench.bench.check import check_env, compare, configurations, load_baseline, rerun, verdict
from moebench.errors import UserError
from moebench.registry import get
from moebench.results import append_record, bench_row, load_records

H100 = "NVIDIA H100 80GB HBM3"
ENV = {"git_sha": "abc1234", "git_dirty": False, "torch": "2.11.0+cu130", "mamba_ssm": "2.3.2.post1",
       "device": "cuda", "device_name": H100}
TRAIN = {"variants": ["MoE-Mamba_25M", "Mamba_25M"], "batch": 32, "ctx": 1024, "dtype": "bf16", "compile": False,
         "steps": 20, "warmup": 5, "impl": "fast", "moe_impl": "auto", "loss_chunk": 8192, "baselines": True,
         "adamw": "triton", "grad_clip": 0.5}
MOE = {"tokens": 32768, "d": 512, "hidden": 1536, "experts": 32, "top_k": 1, "capacity_factor": 1.0,
       "dtype": "bf16", "steps": 20, "warmup": 5}


def train_session(session: str, tok_s: dict, *, status: dict | None = None, env=ENV, device=H100) -> list[dict]:
    """A bench-train session: tok_s maps each measured variant (baselines as "X[dense-eq]", "X[loop]") to tokens/s."""
    rows = []
    for name, t in tok_s.items():
        base, _, rest = name.partition("[")
        baseline = {"dense-eq]": "dense-equivalent", "loop]": "loop"}.get(rest)
        res = {"variant": name, "of": base if baseline else None, "baseline": baseline,
               "status": (status or {}).get(name, "ok"), "tokens_per_s": t, "step_s": {"median": 32768 / t}}
        rows.append(bench_row("bench-train", session, TRAIN, res, env=env, device=device,
                              created="2026-12-01T00:00:00+00:00"))
    return rows


def moe_session(session: str, ms: dict) -> list[dict]:
    return [bench_row("bench-moe", session, MOE, {"name": n, "status": "ok", "fwd_ms": {"median": v / 3},
                                                   "fwd_bwd_ms": {"median": v}}, env=ENV, device=H100,
                      created="2026-12-01T00:00:00+00:00") for n, v in ms.items()]


BASE_TOK = {"MoE-Mamba_25M": 300e3, "MoE-Mamba_25M[dense-eq]": 330e3, "MoE-Mamba_25M[loop]": 120e3,
            "Mamba_25M": 400e3}


def scaled(factors: dict) -> dict:
    return {k: v * factors.get(k, 1.0) for k, v in BASE_TOK.items()}


def verdicts(findings) -> dict[tuple[str, str], str]:
    return {(f.point.split(" (")[0], f.metric): f.verdict for f in findings}


# ---- the comparison ---------------------------------------------------------------------------


def test_a_20_percent_regression_is_caught():
    base = train_session("b", BASE_TOK)
    now = train_session("n", scaled({"MoE-Mamba_25M": 0.8}))
    v = verdicts(compare(base, now))
    assert v == {("train MoE-Mamba_25M", "tokens/s"): "worse", ("train MoE-Mamba_25M", "vs dense-eq"): "worse",
                 ("train MoE-Mamba_25M", "vs loop"): "worse", ("train MoE-Mamba_25M[dense-eq]", "tokens/s"): "ok",
                 ("train MoE-Mamba_25M[loop]", "tokens/s"): "ok", ("train Mamba_25M", "tokens/s"): "ok"}
    worse = next(f for f in compare(base, now) if f.metric == "tokens/s" and f.verdict == "worse")
    assert worse.bad and worse.change == pytest.approx(-0.2) and worse.baseline == 300e3


def test_a_ratio_regression_is_caught_when_every_tokens_per_s_is_within_the_threshold():
    # the MoE 8% slower and its dense equivalent 8% faster: each within 10%, their ratio 15% worse
    now = train_session("n", scaled({"MoE-Mamba_25M": 0.92, "MoE-Mamba_25M[dense-eq]": 1.08}))
    v = verdicts(compare(train_session("b", BASE_TOK), now))
    assert v[("train MoE-Mamba_25M", "tokens/s")] == "ok" and v[("train MoE-Mamba_25M[dense-eq]", "tokens/s")] == "ok"
    assert v[("train MoE-Mamba_25M", "vs dense-eq")] == "worse"


def test_noise_within_the_threshold_passes():
    now = train_session("n", scaled({"MoE-Mamba_25M": 0.95, "MoE-Mamba_25M[dense-eq]": 1.04,
                                     "MoE-Mamba_25M[loop]": 0.97, "Mamba_25M": 0.91}))
    findings = compare(train_session("b", BASE_TOK), now)
    assert len(findings) == 6 and all(f.verdict == "ok" and not f.bad for f in findings)


def test_the_median_of_repeated_runs_counts_on_both_sides():
    base = train_session("b1", BASE_TOK) + train_session("b2", scaled({"Mamba_25M": 1.02}))
    # one slow rerun of three (a neighbour's job): the median is the typical one
    now = (train_session("n1", scaled({"Mamba_25M": 0.5})) + train_session("n2", BASE_TOK)
           + train_session("n3", scaled({"Mamba_25M": 0.98})))
    findings = compare(base, now)
    assert len(findings) == 6 and all(f.verdict == "ok" for f in findings)
    mamba = next(f for f in findings if f.point.startswith("train Mamba_25M"))
    assert mamba.baseline == pytest.approx(404e3) and mamba.current == pytest.approx(392e3)
    slow = train_session("n4", scaled({"Mamba_25M": 0.5})) + train_session("n5", scaled({"Mamba_25M": 0.6}))
    assert verdicts(compare(base, slow + train_session("n6", BASE_TOK)))[("train Mamba_25M", "tokens/s")] == "worse"


def test_a_missing_benchmark_is_reported_not_ignored():
    now = train_session("n", {k: v for k, v in BASE_TOK.items() if k not in ("Mamba_25M", "MoE-Mamba_25M[loop]")})
    findings = compare(train_session("b", BASE_TOK), now)
    v = verdicts(findings)
    assert v[("train Mamba_25M", "-")] == "missing" and v[("train MoE-Mamba_25M[loop]", "-")] == "missing"
    assert v[("train MoE-Mamba_25M", "vs loop")] == "missing"        # its ratio has nothing to divide by
    assert v[("train MoE-Mamba_25M", "vs dense-eq")] == "ok"
    assert sum(f.bad for f in findings) == 3


def test_a_point_that_fails_now_is_reported_and_a_failed_baseline_point_is_not_a_regression():
    now = train_session("n", BASE_TOK, status={"Mamba_25M": "oom"})
    v = verdicts(compare(train_session("b", BASE_TOK), now))
    assert v[("train Mamba_25M", "status oom")] == "failed"
    base = train_session("b", BASE_TOK, status={"Mamba_25M": "oom"})
    findings = compare(base, train_session("n", BASE_TOK))
    assert verdicts(findings)[("train Mamba_25M", "-")] == "no baseline" and not any(f.bad for f in findings)


def test_moe_layer_ratios_know_which_way_is_worse():
    base = moe_session("b", {"dense": 1.0, "grouped": 2.0, "loop": 10.0, "grouped_gemm_only": 1.5})
    now = moe_session("n", {"dense": 1.0, "grouped": 2.4, "loop": 10.0, "grouped_gemm_only": 1.5})  # grouped 20% slower
    v = verdicts(compare(base, now))
    assert v[("moe layer grouped", "fwd+bwd tokens/s")] == "worse"
    assert v[("moe layer ratios", "grouped_over_dense")] == "worse"          # 1.2x higher: worse
    assert v[("moe layer ratios", "loop_over_grouped")] == "worse"           # 1/1.2 lower: worse
    assert v[("moe layer dense", "fwd+bwd tokens/s")] == "ok"
    faster = moe_session("n", {"dense": 1.0, "grouped": 1.6, "loop": 10.0, "grouped_gemm_only": 1.5})
    assert verdicts(compare(base, faster))[("moe layer ratios", "grouped_over_dense")] == "better"


def test_verdict_threshold_edges():
    assert verdict(100, 90.5, True, 0.1) == "ok" and verdict(100, 89.5, True, 0.1) == "worse"
    assert verdict(100, 109.5, False, 0.1) == "ok" and verdict(100, 110.5, False, 0.1) == "worse"
    assert verdict(100, 111, True, 0.1) == "better" and verdict(100, None, True, 0.1) == "missing"


def test_points_of_another_configuration_do_not_match():
    now = [{**r, "config": {**r["config"], "batch": 16}} for r in train_session("n", BASE_TOK)]
    assert {f.verdict for f in compare(train_session("b", BASE_TOK), now)} == {"missing"}


# ---- the machine --------------------------------------------------------------------------------


def test_a_different_gpu_torch_or_mamba_ssm_is_refused_unless_forced():
    base = train_session("b", BASE_TOK)
    assert check_env(base, H100, ENV) == []
    for device, env, what in [("NVIDIA A100-SXM4-80GB", ENV, "device"), (H100, {**ENV, "torch": "2.12.0"}, "torch"),
                              (H100, {**ENV, "mamba_ssm": "2.3.3"}, "mamba-ssm")]:
        with pytest.raises(UserError, match=f"{what}: baseline") as e:
            check_env(base, device, env)
        assert "\n" not in str(e.value) and "--force" in str(e.value)
    assert check_env(base, "NVIDIA A100-SXM4-80GB", ENV, force=True) == [
        f"device: baseline {H100}, here NVIDIA A100-SXM4-80GB"]


def test_load_baseline_from_a_file_or_session_ids(tmp_path):
    rows = train_session("20261201T000000Z-aaaaaa", BASE_TOK) + moe_session("20261201T000100Z-bbbbbb", {"dense": 1.0})
    for r in rows:
        append_record(tmp_path / "bench.jsonl", r)
    assert load_baseline(str(tmp_path / "bench.jsonl")) == load_records(tmp_path / "bench.jsonl")
    assert load_baseline("20261201T000100Z-bbbbbb", tmp_path) == rows[-1:]
    assert len(load_baseline("20261201T000000Z-aaaaaa, 20261201T000100Z-bbbbbb", tmp_path)) == len(rows)
    with pytest.raises(UserError, match="no session 20261201T000000Z-cccccc"):
        load_baseline("20261201T000000Z-cccccc", tmp_path)
    with pytest.raises(UserError, match="no baseline file"):
        load_baseline(str(tmp_path / "nope.jsonl"), tmp_path)
    multi = bench_row("bench-multi-gpu", "m", {"n_gpus": 2}, {"variant": "Mamba_100M"}, env=ENV, device=H100)
    append_record(tmp_path / "multi.jsonl", multi)
    with pytest.raises(UserError, match="bench-multi-gpu"):
        load_baseline(str(tmp_path / "multi.jsonl"))
    (tmp_path / "runs.jsonl").write_text(json.dumps({"schema": 2, "kind": "train"}) + "\n")
    with pytest.raises(UserError, match="holds no benchmark rows"):
        load_baseline(str(tmp_path / "runs.jsonl"))


def test_sessions_of_one_configuration_are_rerun_once_per_repeat(monkeypatch):
    calls = []
    monkeypatch.setattr(check, "_rerun_one", lambda kind, config, rows, *a: calls.append((kind, len(rows))) or [])
    base = train_session("b1", BASE_TOK) + train_session("b2", BASE_TOK) + moe_session("m", {"dense": 1.0})
    assert [(k, len(rows)) for k, _, rows in configurations(base)] == [("bench-train", 8), ("bench-moe", 1)]
    rerun(base, repeats=2)
    assert calls == [("bench-train", 8), ("bench-moe", 1)] * 2


def test_the_models_to_rerun_come_from_the_rows():
    tiny = replace(get("MoE-Mamba_25M@tiny"), vocab_size=256)
    rows = train_session("b", BASE_TOK)
    for r in rows:
        if r["result"]["variant"] != "MoE-Mamba_25M[dense-eq]":
            r["result"]["model"] = (tiny if "MoE" in r["result"]["variant"] else get("Mamba_25M")).to_dict()
    assert check._models(rows[::-1], TRAIN["variants"]) == [tiny, get("Mamba_25M")]     # the invocation's order
    # a session that kept only the loop row: it records its MoE's model
    assert check._models(rows[2:3], TRAIN["variants"]) == [tiny]
    # only the dense equivalent: the MoE comes from the registry
    assert check._models(rows[1:2], TRAIN["variants"]) == [get("MoE-Mamba_25M")]


# ---- the rerun, on CPU --------------------------------------------------------------------------


def small(name: str):
    return replace(get(name + "@tiny"), vocab_size=256)


@pytest.mark.usefixtures("one_thread")
def test_every_point_of_a_tiny_cpu_baseline_is_rerun_and_matched():
    from moebench.bench.generate import bench_generate
    from moebench.bench.memory import bench_memory
    from moebench.bench.moe_layer import bench_moe
    from moebench.bench.train_step import bench_train
    moe, mamba = small("MoE-Mamba_25M"), small("Mamba_25M")
    base = (bench_train([moe, mamba], batch=1, ctx=16, dtype="fp32", steps=2, warmup=1, device="cpu")
            + bench_moe(tokens=64, d=16, hidden=32, experts=4, dtype="fp32", steps=2, warmup=1, device="cpu")
            + bench_generate([moe], prompt_lens=[8, 16], gen_len=2, batch=2, dtype="fp32", device="cpu")
            + bench_memory([mamba], lengths=[8, 16], dtype="fp32", device="cpu", repeats=1, warmup=0))
    # a prompt length the baseline dropped is not measured again
    base = [r for r in base if r["result"].get("prompt_len") != 16]
    current = rerun(base, device="cpu")
    assert len(current) == len(base)
    # the rerun built the baseline's models (256-token vocabulary), not the registry's @tiny ones
    assert {r["result"]["model"]["vocab_size"] for r in current if "model" in r["result"]} == {256}
    findings = compare(base, current, threshold=0.99)
    assert {f.verdict for f in findings} <= {"ok", "better"}, [f for f in findings if f.bad]
    points = {f.point.split(" (")[0] for f in findings}
    assert len(points) == 4 + 5 + 1 + 4      # train points, MoE paths + ratios, one decode point, memory points


@pytest.mark.usefixtures("one_thread")
def test_cli_bench_check_exit_codes(cli_main, tmp_path):
    code, _, _ = cli_main(["bench", "train", "MoE-Mamba_25M@tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "1",
                           "--ctx", "16", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "base")])
    assert code == 0
    baseline = tmp_path / "base" / "bench.jsonl"
    # the same machine and versions: a wide threshold passes whatever the neighbours run meanwhile
    code, out, err = cli_main(["bench", "check", "--baseline", str(baseline), "--threshold", "0.9", "--repeats", "1"])
    assert code == 0, out + err
    assert "MoE-Mamba_25M@tiny[dense-eq]" in out and "vs dense-eq" in out and "no regression" in out

    rows = load_records(baseline)
    doctored = tmp_path / "doctored.jsonl"
    for r in rows:
        if r["result"]["variant"] == "MoE-Mamba_25M@tiny":
            r["result"]["tokens_per_s"] *= 100
        append_record(doctored, r)
    code, out, err = cli_main(["bench", "check", "--baseline", str(doctored), "--threshold", "0.9", "--repeats", "1"])
    assert code == 1 and "3 worse" in out, out + err
    regressions = out[out.index("regressions"):]
    assert regressions.count("│ worse") == 3 and "vs dense-eq" in regressions and "[dense-eq]" not in regressions

    elsewhere = tmp_path / "elsewhere.jsonl"
    for r in load_records(baseline):
        append_record(elsewhere, {**r, "device": "cpu (x86_64, 64 threads)"})
    code, out, err = cli_main(["bench", "check", "--baseline", str(elsewhere)])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--force" in err
    code, out, err = cli_main(["bench", "check", "--baseline", str(elsewhere), "--threshold", "0.9", "--force",
                               "--repeats", "2", "--out", str(tmp_path / "rerun")])
    assert code == 0 and "--force: device" in err and "rerun here (2 times)" in out, out + err
    assert len(load_records(tmp_path / "rerun" / "bench.jsonl")) == 2 * 3
    code, _, err = cli_main(["bench", "check", "--baseline", str(baseline), "--threshold", "10"])
    assert code == 2 and "between 0 and 1" in err
