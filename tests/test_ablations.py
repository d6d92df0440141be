"""Ablation specs, planning, `moebench run` end to end on the hidden `test` preset (3 steps of the
CPU twins on a small prepared corpus), resume, failures, LR sweeps and the CLI's exit codes."""
import json
import math
import os
import signal
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from moebench import ablations, estimate
from moebench.ablations import Hooks, ensure_data, execute, get_ablation, load_specs, make_plan
from moebench.cli import app
from moebench.errors import UserError
from moebench.presets import PUBLIC_PRESETS, ema_alpha_for
from moebench.registry import VARIANTS
from moebench.results import SCHEMA

TABLES = {"architectures": "table 1", "experts": "table 4", "ratios": "table 2", "inner": "table 3",
          "parallel": "table 7"}
runner = CliRunner()



@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """~30K tokens of English in 300 documents, prepared once per session."""
    from moebench.data import prepare
    root = tmp_path_factory.mktemp("corpus")
    words = ("the state space model reads every token once and keeps a summary of what it has seen while "
             "a mixture of experts sends each token to one of many small networks chosen by a router").split()
    docs = []
    for i in range(300):
        docs.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60 + i % 40)) + ".")
    (root / "text.txt").write_text("\n<|endoftext|>\n".join(docs))
    return prepare(input=root / "text.txt", out=root / "prepared", progress=False)["dir"]


def rows_of(out):
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- specs ----------------------------------------------------------------------------------------
def test_specs_cover_the_papers_tables():
    specs = load_specs()
    assert set(TABLES) <= set(specs)
    for name, table in TABLES.items():
        spec = specs[name]
        a = spec.ablation
        assert a.table == table
        assert len(set(a.variants)) == len(a.variants), f"{name}: duplicate variants"
        assert set(a.variants) <= set(VARIANTS), f"{name}: unregistered {set(a.variants) - set(VARIANTS)}"
        assert a.baseline in a.variants
        assert set(PUBLIC_PRESETS) - {"paper-100m"} <= set(a.presets)
        assert a.question and set(a.extra_seeds) <= set(a.variants), f"{name}: extra seeds of no variant"
        for preset in a.presets:
            assert spec.baseline(preset) in spec.variants(preset)
            assert set(spec.variants(preset)) <= set(VARIANTS)
    assert len(get_ablation("inner").variants) == 16
    assert len(get_ablation("parallel").variants) == 13
    assert get_spec_variants("architectures", "paper-100m") == ("Mamba_100M", "MoE-Mamba_100M", "Transformer-MoE_100M")
    assert "paper-100m" not in get_ablation("experts").presets
    assert get_ablation("experts").presets["paper"].tokens == 1_000_000_000


def get_spec_variants(name, preset):
    return ablations.get_spec(name).variants(preset)


def test_paper_budgets():
    arch = get_ablation("architectures").presets
    assert arch["paper"].tokens // (arch["paper"].batch * arch["paper"].ctx) == 150_000
    p100 = arch["paper-100m"]
    assert (p100.tokens // (p100.batch * p100.ctx), p100.batch, p100.batch % p100.micro_batch) == (30_000, 1024, 0)
    small = arch["gpu-small"]
    assert (small.batch, small.ctx, small.tokens // (small.batch * small.ctx)) == (32, 1024, 610)


def test_ema_rule():
    assert ema_alpha_for("paper", 150_000) == 0.001
    assert ema_alpha_for("paper-100m", 30_000) == 0.001
    assert ema_alpha_for("gpu-small", 610) == pytest.approx(50 / 610)
    assert ema_alpha_for("cpu-tiny", 3) == 0.5
    assert ema_alpha_for("gpu-medium", 10**6) == 0.001


def test_unknown_ablation_exits_2(cli_main):
    code, _, err = cli_main(["run", "expert"])
    assert code == 2
    assert "unknown ablation 'expert'" in err and "did you mean experts" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_variant_and_preset(tmp_path):
    with pytest.raises(UserError, match="did you mean MoE-Mamba_25M-e16"):
        make_plan("experts", "cpu-tiny", only=["MoE-Mamba_25M-e161"], out=tmp_path)
    with pytest.raises(UserError, match="has no preset 'paper-100m'"):
        make_plan("experts", "paper-100m", out=tmp_path)


def test_dry_run_prints_the_plan(tmp_path):
    res = runner.invoke(app, ["run", "architectures", "--dry-run", "--out", str(tmp_path), "--device", "cpu"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name in ("Mamba_25M", "MoE-Mamba_25M", "Transformer_25M", "Transformer-MoE_25M", "Mamba-MLP_25M"):
        assert name in res.output
    assert "est. time" in res.output and "the preset's rate for all" in res.output
    assert "15 of 15 runs to do" in res.output
    assert not (tmp_path / "runs.jsonl").exists()          # a dry run trains nothing
    res = runner.invoke(app, ["run", "architectures", "--dry-run", "--preset", "paper-100m", "--out", str(tmp_path),
                              "--device", "cpu"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "MoE-Mamba_100M" in res.output and "micro 16" in res.output


def test_seeds_per_preset_and_variant(tmp_path):
    """GPU presets run two seeds of every variant and three of the headline pair; cpu-tiny three of each;
    --seeds N overrides both. Every variant of a seed reads the same batches (same seed, same data)."""
    def seeds(plan):
        out = {}
        for r in plan.runs:
            out.setdefault(r.variant, []).append(r.tcfg.seed)
        return out
    got = seeds(make_plan("architectures", "gpu-small", out=tmp_path, lr_source="default"))
    assert got["Mamba_25M"] == [0, 1, 2] and got["MoE-Mamba_25M"] == [0, 1, 2]
    assert got["Transformer_25M"] == [0, 1] and got["Mamba-MLP_25M"] == [0, 1]
    assert seeds(make_plan("experts", "gpu-medium", out=tmp_path, lr_source="default"))["MoE-Mamba_25M-e32"] == [0, 1, 2]
    assert set(map(tuple, seeds(make_plan("architectures", "cpu-tiny", out=tmp_path)).values())) == {(0, 1, 2)}
    assert set(map(tuple, seeds(make_plan("architectures", "gpu-small", seeds=1, out=tmp_path, lr_source="default")).values())) == {(0,)}


def test_refuses_repeating_data(data_dir, tmp_path):
    plan = make_plan("experts", "gpu-medium", only=["Mamba_25M"], out=tmp_path, data_dir=data_dir, lr_source="default")
    with pytest.raises(UserError, match="--allow-repeat"):
        ensure_data(plan)
    plan = make_plan("experts", "gpu-medium", only=["Mamba_25M"], out=tmp_path, data_dir=data_dir, allow_repeat=True,
                     lr_source="default")
    assert ensure_data(plan).epochs > 1


# --- running ----------------------------------------------------------------------------------------
def test_run_end_to_end_and_skip_done(data_dir, tmp_path):
    out = tmp_path / "results"
    args = ["run", "experts", "--preset", "test", "--only", "Mamba_25M,MoE-Mamba_25M-e4", "--data", data_dir,
            "--out", str(out), "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = rows_of(out)
    assert [(r["variant"], r["status"]) for r in rows] == [("Mamba_25M@tiny", "done"), ("MoE-Mamba_25M-e4@tiny", "done")]
    for r in rows:
        assert (r["ablation"], r["preset"], r["train"]["lr_source"]) == ("experts", "test", "default")
        assert r["metrics"]["epochs"] > 0 and math.isfinite(r["metrics"]["final_smoothed_loss"])
        assert r["train"]["ema_alpha"] == 0.5 and r["ema_rule"]
        assert (out / "runs" / r["run_id"] / "curve.csv").exists()
    # everything is done: a second run trains nothing
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(rows_of(out)) == 2
    # the report reads these rows (a run shared by config hash, not by ablation)
    from moebench.report.ablation import build_report
    rep = build_report("experts", out / "runs.jsonl", tmp_path / "reports", preset="test")
    text = rep.markdown.read_text()
    assert "| MoE-Mamba_25M-e4 (@tiny) |" in text and "not run" in text


def test_interrupted_ablation_resumes_only_whats_missing(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "results"
    only = ["Mamba_25M", "MoE-Mamba_25M-e1", "MoE-Mamba_25M-e4"]
    plan = ensure_data(make_plan("experts", "test", only=only, out=out, data_dir=data_dir))
    assert [r.status for r in plan.runs] == ["todo"] * 3

    def interrupt_second(run, progress):
        # as Ctrl-C would: train() finishes the step, saves a checkpoint and stops
        if run.variant == "MoE-Mamba_25M-e1" and progress.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        execute(plan, device="cpu", hooks=Hooks(on_progress=interrupt_second))
    assert [r["variant"] for r in rows_of(out)] == ["Mamba_25M@tiny"]

    plan = make_plan("experts", "test", only=only, out=out, data_dir=data_dir)
    assert [r.status for r in plan.runs] == ["done", "resume", "todo"]
    # without --resume the interrupted run is left alone (reported), the others run
    trained, real_train = [], ablations.train

    def spy(cfg, tcfg, out_dir, **kw):
        trained.append((cfg.name, kw["resume"]))
        return real_train(cfg, tcfg, out_dir, **kw)
    monkeypatch.setattr(ablations, "train", spy)
    outcomes = execute(plan, device="cpu")
    assert [o.status for o in outcomes] == ["skipped", "interrupted", "done"]
    assert trained == [("MoE-Mamba_25M-e4@tiny", False)]
    trained.clear()
    outcomes = execute(make_plan("experts", "test", only=only, out=out, data_dir=data_dir), device="cpu", resume=True)
    assert [o.status for o in outcomes] == ["skipped", "done", "skipped"]
    assert trained == [("MoE-Mamba_25M-e1@tiny", True)]
    resumed = [r for r in rows_of(out) if r["variant"] == "MoE-Mamba_25M-e1@tiny"]
    assert len(resumed) == 1 and resumed[0]["metrics"]["steps"] == 3


def test_a_run_another_process_trains_is_skipped_not_failed(data_dir, tmp_path):
    from moebench.results import run_lock
    out = tmp_path / "results"
    plan = ensure_data(make_plan("experts", "test", only=["Mamba_25M", "MoE-Mamba_25M-e1"], out=out,
                                 data_dir=data_dir))
    busy = plan.runs[0]
    with run_lock(out / "runs" / busy.run_id):
        outcomes = execute(plan, device="cpu")
    assert [o.status for o in outcomes] == ["skipped", "done"]
    assert "another process" in outcomes[0].error
    assert [r["variant"] for r in rows_of(out)] == ["MoE-Mamba_25M-e1@tiny"]     # no failure row


def test_a_failing_variant_does_not_stop_the_others(data_dir, tmp_path, monkeypatch):
    real_train = ablations.train

    def flaky(cfg, tcfg, out_dir, **kw):
        if cfg.name == "MoE-Mamba_25M-e1@tiny":
            raise RuntimeError("boom")
        return real_train(cfg, tcfg, out_dir, **kw)
    monkeypatch.setattr(ablations, "train", flaky)
    out = tmp_path / "results"
    res = runner.invoke(app, ["run", "experts", "--preset", "test", "--only", "MoE-Mamba_25M-e1,MoE-Mamba_25M-e4",
                              "--data", data_dir, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1
    assert "boom" in res.output
    rows = rows_of(out)
    assert [(r["variant"], r["status"]) for r in rows] == [("MoE-Mamba_25M-e1@tiny", "failed"),
                                                           ("MoE-Mamba_25M-e4@tiny", "done")]
    assert "RuntimeError: boom" in rows[0]["reason"] and rows[0]["preset"] == "test"


def test_lr_sweep_then_run_with_swept_rates(data_dir, tmp_path, monkeypatch):
    import moebench.sweep as sweep
    from moebench.report.ablation import build_report
    out = tmp_path / "results"
    with pytest.raises(UserError, match="moebench sweep lr --ablation experts --preset test"):
        make_plan("experts", "test", only=["Mamba_25M"], out=out, data_dir=data_dir, lr_source="sweep")
    monkeypatch.setattr(sweep, "MAX_EXTENSIONS", 1)
    rows = sweep.sweep_lr(["Mamba_25M"], "test", [1e-3, 3e-3], out=out, data_dir=data_dir, device="cpu")
    assert len(rows) == 1
    row = rows[0]
    lrs = [pt["lr"] for pt in row["points"]]
    # the best of the grid lay on an edge: one rate beyond it (x2 or /2) was added and trained
    assert row["extensions"] == 1 and len(lrs) == 3 and lrs == sorted(lrs) and row["grid"] == lrs
    assert lrs in ([5e-4, 1e-3, 3e-3], [1e-3, 3e-3, 6e-3])
    assert all(pt["status"] == "done" for pt in row["points"])
    done = [pt for pt in row["points"]]
    assert row["best_lr"] == min(done, key=lambda pt: pt["final_smoothed_loss"])["lr"]   # the paper's metric
    assert row["metric"] == "final_smoothed_loss" and row["best_val_loss"] is not None and row["family"] == "Mamba"
    assert row["schema"] == SCHEMA and all(pt["impl"]["mixer"] == "ref" for pt in row["points"])   # what ran
    assert json.loads((out / "lr_sweeps.jsonl").read_text().splitlines()[0])["variant"] == "Mamba_25M"
    assert not (out / "runs.jsonl").exists()                # sweep runs live in sweeps/, apart
    # the same sweep again reuses every point already trained
    again = sweep.sweep_lr(["Mamba_25M"], "test", [1e-3, 3e-3], out=out, data_dir=data_dir, device="cpu")
    assert [pt["run_id"] for pt in again[0]["points"]] == [pt["run_id"] for pt in row["points"]]
    assert len((out / "sweeps" / "runs.jsonl").read_text().splitlines()) == 3
    # seed 0 at the chosen rate is the sweep's run: recorded from it, not trained again; seed 1 trains
    plan = ensure_data(make_plan("experts", "test", only=["Mamba_25M"], seeds=2, out=out, data_dir=data_dir,
                                 lr_source="sweep"))
    assert [(r.tcfg.lr, r.tcfg.lr_source, r.status) for r in plan.runs] == \
        [(row["best_lr"], "sweep", "reuse"), (row["best_lr"], "sweep", "todo")]
    outcomes = execute(plan, device="cpu")
    assert [o.status for o in outcomes] == ["reused", "done"]
    reused = rows_of(out)[0]
    assert reused["reused_from"]["run_id"] == row["best_run_id"] and reused["train"]["lr_source"] == "sweep"
    assert reused["metrics"]["final_smoothed_loss"] == row["best_loss"] and reused["ablation"] == "experts"
    assert [r.status for r in ensure_data(make_plan("experts", "test", only=["Mamba_25M"], seeds=2, out=out,
                                                    data_dir=data_dir, lr_source="sweep")).runs] == ["done", "done"]
    default = make_plan("experts", "test", only=["Mamba_25M"], out=out, data_dir=data_dir)
    assert default.lr_source == "default" and default.runs[0].run_key != plan.runs[0].run_key
    # both kinds of rows in one results file: the report takes one source when asked, and finds the
    # reused run's curve in sweeps/
    execute(ensure_data(default), device="cpu")
    for source, rate in (("default", 1e-3), ("sweep", row["best_lr"])):
        md = build_report("experts", out, tmp_path / "rep", preset="test", lr_source=source).markdown.read_text()
        assert f"| {rate:g} ({source}) |" in md and "no curve.csv" not in md
    assert "## Learning rates" in md and f"**{row['best_lr']:g}**: {row['best_loss']:.3f}" in md


def test_a_variant_takes_its_familys_swept_rate(data_dir, tmp_path, monkeypatch):
    import moebench.sweep as sweep
    out = tmp_path / "results"
    monkeypatch.setattr(sweep, "MAX_EXTENSIONS", 0)
    rows = sweep.sweep_families(["MoE-Mamba_25M-e1", "MoE-Mamba_25M-e4"], "test", [2e-3], out=out,
                                data_dir=data_dir, device="cpu")
    assert [r["variant"] for r in rows] == ["MoE-Mamba_25M"]          # one sweep for the family
    plan = make_plan("experts", "test", only=["MoE-Mamba_25M-e1"], out=out, data_dir=data_dir, lr_source="sweep")
    assert plan.runs[0].tcfg.lr == 2e-3 and plan.runs[0].lr_note.startswith("MoE-Mamba family sweep")
    with pytest.raises(UserError, match="or their families"):     # Mamba_25M's family has no sweep
        make_plan("experts", "test", only=["Mamba_25M"], out=out, data_dir=data_dir, lr_source="sweep")
    with pytest.raises(UserError, match="no learning-rate sweep"):   # the GPU presets sweep by default
        make_plan("experts", "gpu-small", out=out)


def test_time_estimates(tmp_path):
    from moebench.estimate import estimate_seconds
    plan = make_plan("experts", "gpu-small", only=["Mamba_25M"], out=tmp_path, lr_source="default")
    run = plan.runs[0]
    secs, how = estimate_seconds(run, "NVIDIA H100 80GB HBM3", True, [], 3e8)
    assert secs == pytest.approx(run.tcfg.tokens * 3e8 / (989e12 * estimate.ASSUMED_GPU_MFU)) and "assumed" in how
    assert estimate_seconds(run, "Some Future GPU", True, [], 3e8) == (None, "unknown GPU")
    measured = {"variant_hash": run.cfg.config_hash(), "status": "done", "env": {"device_name": "gpu0"},
                "train": {"batch": 32, "ctx": 1024}, "metrics": {"tokens": 10_000_000, "wall_s": 50.0}}
    assert estimate_seconds(run, "gpu0", True, [measured], 3e8) == (pytest.approx(run.tcfg.tokens / 2e5), "measured here")
    tiny = make_plan("architectures", "cpu-tiny", only=["Mamba_25M"], out=tmp_path).runs[0]
    secs, how = estimate_seconds(tiny, "cpu", False, [], 2e7)
    assert 10 < secs < 60 and "measured" in how          # 131k tokens at 6.7k tokens/s


def test_ablations_command_lists_the_tables():
    res = runner.invoke(app, ["ablations"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for name, table in TABLES.items():
        assert name in res.output and table in res.output
    assert "test " not in res.output                     # the hidden preset stays hidden


def test_wheel_packages_cover_every_package_and_the_specs():
    """pyproject lists the packages explicitly (to map experiments/ to moebench._experiments in a
    wheel): every package folder under moebench/ must be in that list."""
    import tomllib
    from moebench.ablations import REPO_ROOT
    cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(REPO_ROOT).parts) for p in (REPO_ROOT / "moebench").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert cfg["package-dir"]["moebench._experiments"] == "experiments"
    assert {p.stem for p in (REPO_ROOT / "experiments").glob("*.py")} >= {"architectures", "experts", "ratios"}


def test_a_preset_with_a_learned_vocab_plans_its_models_for_it(monkeypatch, tmp_path):
    """A preset whose rule learns a vocabulary trains on data/<corpus>-bpe<N> with models that embed N tokens."""
    monkeypatch.setenv("MOEBENCH_DATA", str(tmp_path / "data"))
    rule = ablations.rule_of("cpu-tiny")
    monkeypatch.setattr(ablations, "rule_of", lambda preset: replace(rule, vocab=4000))
    plan = make_plan("architectures", "cpu-tiny", out=tmp_path / "res")
    assert plan.data_dir.name.endswith("-bpe4000")
    assert {r.cfg.vocab_size for r in plan.runs} == {4032}
