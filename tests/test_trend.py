"""`moebench report trend`: a pair's paired difference and speedup against the training budget, from
rows and curves alone (synthetic, with known answers)."""
from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.errors import UserError
from moebench.registry import get
from moebench.report.trend import build_trend, collect_budgets
from moebench.results import append_record, load_records


def write_run(res, name, tokens, seed, final, preset="gpu-small", device=None):
    """A finished row and a curve L(t) = final + (t / T)^-0.5 - 1 that ends at `final`."""
    cfg = get(name)
    run_id = f"{name}_{tokens}_s{seed}"
    (res / "runs" / run_id).mkdir(parents=True)
    points = [(tokens * k / 20, final + (k / 20) ** -0.5 - 1) for k in range(1, 21)]
    (res / "runs" / run_id / "curve.csv").write_text("tokens,smoothed\n" + "".join(f"{t},{y}\n" for t, y in points))
    append_record(res / "runs.jsonl", {
        "schema": 2, "kind": "train", "status": "done", "run_id": run_id, "variant": name,
        "variant_hash": cfg.config_hash(), "seed": seed, "preset": preset, "data_id": "small:1+1",
        "train": {"batch": 32, "ctx": 1024, "lr_source": "sweep"},
        "metrics": {"tokens": tokens, "final_smoothed_loss": final},
        "curve": f"runs/{run_id}/curve.csv", "finished": f"2026-01-0{seed + 1}",
        **({"env": {"device_name": device}} if device else {})})


def test_trend_gives_paired_differences_and_speedups_per_budget(tmp_path):
    res = tmp_path / "results"
    # 20M tokens: MoE-Mamba behind by 0.05, 0.03, 0.04 over seeds; 96M: ahead by 0.02 on both seeds
    for seed, (m, mm) in enumerate([(4.00, 4.05), (4.02, 4.05), (4.01, 4.05)]):
        write_run(res, "Mamba_25M", 20_000_000, seed, m)
        write_run(res, "MoE-Mamba_25M", 20_000_000, seed, mm)
    for seed in (0, 1):
        write_run(res, "Mamba_25M", 96_000_000, seed, 3.60 + 0.01 * seed, preset="gpu-medium")
        write_run(res, "MoE-Mamba_25M", 96_000_000, seed, 3.58 + 0.01 * seed, preset="gpu-medium")
    write_run(res, "MoE-Mamba_25M", 50_000_000, 0, 3.9)                   # no Mamba at this budget: left out
    budgets = collect_budgets(load_records(res / "runs.jsonl"), "MoE-Mamba_25M", "Mamba_25M", res)
    assert [b.tokens for b in budgets] == [20_000_000, 96_000_000]
    small, medium = budgets
    assert small.paired.n == 3 and small.paired.mean == pytest.approx(0.04)
    assert small.paired.hi - small.paired.mean == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert medium.paired.mean == pytest.approx(-0.02) and medium.paired.lo == pytest.approx(-0.02)
    # the curves are the same shape shifted: ahead by 0.02 means (1 + 0.02)^2 times fewer tokens
    assert medium.speedup == pytest.approx(1.02**2, rel=1e-3) and small.speedup is None
    md = build_trend(res, tmp_path / "rep").read_text()
    assert "| 20M | gpu-small | 32 × 1024 | small:1+1 | sweep | 3 | +0.040 [+0.015, +0.065] (3 seeds) | — |" in md
    assert "| 96M | gpu-medium |" in md and "(2 seeds) | 1.04 |" in md
    assert (tmp_path / "rep" / "trend_delta.png").exists() and (tmp_path / "rep" / "trend_speedup.png").exists()
    r = CliRunner().invoke(app, ["report", "trend", "--results", str(res), "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0 and (tmp_path / "cli" / "trend.md").exists()
    with pytest.raises(UserError, match="no budget"):
        build_trend(res, tmp_path / "rep", ("Transformer-MoE_25M", "Transformer_25M"))


def test_trend_refuses_a_budget_whose_pair_ran_on_two_devices(tmp_path, cli_main):
    """Across budgets the device is a column (cpu-tiny runs on a CPU, gpu-small on a GPU); within one
    budget the paired difference would measure the devices too, so it is refused."""
    res, h100, h200 = tmp_path / "results", "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    for seed in (0, 1):
        write_run(res, "Mamba_25M", 20_000_000, seed, 4.0, device=h100)
        write_run(res, "MoE-Mamba_25M", 20_000_000, seed, 3.9, device=h100)
        write_run(res, "Mamba_25M", 96_000_000, seed, 3.6, preset="gpu-medium", device=h200)
        write_run(res, "MoE-Mamba_25M", 96_000_000, seed, 3.5, preset="gpu-medium", device=h100)
    code, out, err = cli_main(["report", "trend", "--results", str(res), "--out", str(tmp_path / "rep")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = " ".join(err.split())
    assert "the rows of MoE-Mamba_25M and Mamba_25M at 96M tokens (gpu-medium)" in line
    assert f"mix devices: {h100} (2 rows), {h200} (2 rows)" in line and "--device" in line
    md = build_trend(res, tmp_path / "rep", device="H100").read_text()
    assert f"| 20M | gpu-small | 32 × 1024 | small:1+1 | sweep | 2 | " in md and md.rstrip().count("\n| 96M") == 0
    assert md.count(f"| {h100} |") == 1
    assert f"from `{res / 'runs.jsonl'}` only (4 of its 8 rows: " in md
