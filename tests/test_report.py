"""`moebench report` from a fixture results folder (tests/fixtures/experts_gpu-small, written by
tests/fixtures/make_fixture.py), Kendall's tau, and the paper's numbers as data."""
import json
import shutil
from pathlib import Path

import pytest

from moebench import paper
from moebench.ablations import load_specs
from moebench.registry import VARIANTS, get
from moebench.report.ablation import build_report
from moebench.report.compare import VariantResult, compute_paired, ranking_scores
from moebench.report.stats import fmt_paired, kendall_tau, paired_difference, t975

FIXTURE = Path(__file__).parent / "fixtures" / "experts_gpu-small"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



# --- Kendall tau ---------------------------------------------------------------------------------
@pytest.mark.parametrize("x, y, tau", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),                         # one swapped pair of 6
    ([1, 2, 3], [2, 1, 3], 1 / 3),
    # tau-b with ties in y only: 13 concordant, 2 pairs tied in y: 13 / sqrt(13 * 15)
    ([4.205, 4.245, 4.195, 4.165, 4.135, 4.11], [3.72, 3.75, 3.72, 3.70, 3.67, 3.67], 13 / (13 * 15) ** 0.5),
    # ties in both: pairs (a,b) tied in x, (c,d) tied in y, (a,b) vs (c,d) concordant 4 -> 4 / sqrt(5 * 5)
    ([1, 1, 2, 3], [1, 2, 3, 3], 4 / 5),
])
def test_kendall_tau_known_cases(x, y, tau):
    assert kendall_tau(x, y) == pytest.approx(tau)


def test_kendall_tau_degenerate():
    assert kendall_tau([1.0], [2.0]) is None
    assert kendall_tau([1, 2, 3], [5, 5, 5]) is None
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 12)
        x = [rng.randint(0, 5) for _ in range(n)]
        y = [rng.randint(0, 5) for _ in range(n)]
        ref = stats.kendalltau(x, y).statistic
        ours = kendall_tau(x, y)
        assert (ours is None and ref != ref) or ours == pytest.approx(ref)


# --- the paper's numbers ----------------------------------------------------------------------------
def test_paper_tables_name_registered_variants_of_their_ablation():
    by_table = {s.ablation.table: s for s in load_specs().values()}
    for table, rows in paper.TABLES.items():
        spec = by_table[table]
        names = {v for p in spec.ablation.presets for v in spec.variants(p)}
        for r in rows:
            assert r.variant in VARIANTS, r
            assert r.variant in names, f"{r.variant} of {table} is not in ablation {spec.name}"
    assert paper.paper_rows("table 4")["MoE-Mamba_25M-e32"].loss == 3.67
    assert paper.paper_rows("table 1")["MoE-Mamba_100M"].speedup == 2.35
    assert paper.paper_rows("table 7")["ParMoE-Mamba_25M-e8"].loss == 3.72
    assert paper.paper_rows("table 3")["InnerMoE_25M-gate+out-every2"].loss == 3.88
    assert len(paper.TABLE_3) == 16 and len(paper.TABLE_7) == 13


# --- the report ---------------------------------------------------------------------------------------
def test_report_from_fixture(tmp_path):
    rep = build_report("experts", FIXTURE / "runs.jsonl", tmp_path)
    assert rep.preset == "gpu-small"
    md = rep.markdown.read_text()
    assert rep.markdown == tmp_path / "experts.md"
    header = next(line for line in md.splitlines() if line.startswith("| variant |"))
    for col in ("params", "active", "final smoothed loss", "Δ loss vs Mamba_25M [95% CI]", "val ppl", "tokens",
                "speedup over Mamba_25M", "paper params", "paper loss", "paper speedup"):
        assert f"| {col} |" in header
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines() if line.startswith("| MoE-Mamba")}
    # two seeds: mean ± std; e32's seed 1 failed, so one seed
    assert row["MoE-Mamba_25M-e16"][3] == "4.135 ± 0.007"
    assert row["MoE-Mamba_25M-e32"][3] == "4.110" and row["MoE-Mamba_25M-e32"][7] == "1"
    # the paired difference to Mamba_25M seed by seed: every seed shifts both by 0.01, so no spread
    assert row["MoE-Mamba_25M-e16"][4] == "-0.070 [-0.070, -0.070] (2 seeds)"
    assert row["MoE-Mamba_25M-e32"][4] == "-0.090 (1 seed)"
    # speedups from the curves: (1 + 4.20 - final)^2 for seed 0, e.g. e32 1.09^2; of the seed-mean
    # curves with the per-seed range where there are two seeds
    assert row["MoE-Mamba_25M-e32"][8] == "1.19"
    assert row["MoE-Mamba_25M-e16"][8] == "1.14 (seeds 1.14–1.14, 2 of 2)"
    assert row["MoE-Mamba_25M-e1"][8].startswith("— (never reaches")
    assert row["MoE-Mamba_25M-e32"][10:14] == ["416M", "26M", "3.67", "1.23 |"]
    assert "τ = 0.931" in md and "Per seed: τ = 0.940 ± 0.013 over 2 seeds" in md
    assert "rows mix torch: 2.12.0+cu128, 2.13.0+cu128" in md
    assert "MoE-Mamba_25M-e32 seed 1: non-finite loss nan at step 200" in md
    assert "NVIDIA H100 80GB HBM3" in md and "not C4" in md
    assert any("rows mix torch" in w for w in rep.warnings)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted(p.name for p in rep.pngs)
    assert names == ["experts_final.png", "experts_loss.png", "experts_speedup.png", "experts_speedup_curve.png"]
    for png in rep.pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        img = plt.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
        assert f"![{png.stem}]({png.name})" in md


def test_report_finds_curves_when_the_results_folder_moved(tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(FIXTURE, moved)
    rep = build_report("experts", moved, tmp_path / "reports")       # a folder is accepted too
    assert not any("no curve.csv" in w for w in rep.warnings)


def test_runs_are_shared_between_ablations_by_config_hash(tmp_path):
    # table 7's sequential column is table 4's MoE-Mamba_25M-eN; table 2's 3:3 is the 32-expert model
    md = build_report("parallel", FIXTURE / "runs.jsonl", tmp_path).markdown.read_text()
    assert "| # of experts | Sequential (ours) | Sequential (paper) | Parallel (ours) | Parallel (paper) |" in md
    assert "| 32 | 4.110 | 3.66 | — | 3.69 |" in md
    assert "| ParMoE-Mamba_25M-e2 | — | — | not run |" in md
    md = build_report("ratios", FIXTURE / "runs.jsonl", tmp_path).markdown.read_text()
    assert "| MoE-Mamba_25M-ratio3to3 | 416M |" in md and "rank 3" in md
    assert "542M total parameters" in md and "about 416M" in md


def test_a_run_with_a_checkpoint_and_no_row_shows_as_interrupted(tmp_path):
    """train() writes checkpoint.json beside each checkpoint (tests/test_train.py checks its fields);
    a variant whose run has one and no finished row was interrupted, not "not run"."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    run = results / "runs" / "ParMoE-Mamba_25M-e2_s0_0123abcd"
    run.mkdir(parents=True)
    (run / "checkpoint.json").write_text(json.dumps({
        "run_id": run.name, "variant": "ParMoE-Mamba_25M-e2", "seed": 0, "step": 200, "steps": 610,
        "variant_hash": get("ParMoE-Mamba_25M-e2").config_hash(), "train": {"lr_source": "default"},
        "ablation": "parallel", "preset": "gpu-small", "ablation_variant": "ParMoE-Mamba_25M-e2"}))
    md = build_report("parallel", results, tmp_path / "reports").markdown.read_text()
    assert "| ParMoE-Mamba_25M-e2 | — | — | interrupted at step 200/610 (seed 0) |" in md
    assert "| ParMoE-Mamba_25M-e4 | — | — | not run |" in md
    # a run that failed (NaN) keeps its last good checkpoint: it is reported as failed, not interrupted
    failed = {"kind": "train", "status": "failed", "reason": "non-finite loss nan at step 201", "preset": "gpu-small",
              "run_id": run.name, "variant": "ParMoE-Mamba_25M-e2", "seed": 0, "ablation_variant": "ParMoE-Mamba_25M-e2",
              "variant_hash": get("ParMoE-Mamba_25M-e2").config_hash(), "train": {"lr_source": "default"}}
    with open(results / "runs.jsonl", "a") as f:
        f.write(json.dumps(failed) + "\n")
    md = build_report("parallel", results, tmp_path / "reports").markdown.read_text()
    assert "interrupted" not in md and "ParMoE-Mamba_25M-e2 seed 0: non-finite loss nan at step 201" in md
    (results / "runs.jsonl").write_text((FIXTURE / "runs.jsonl").read_text())
    # another preset's checkpoint says nothing about this report's runs
    (run / "checkpoint.json").write_text(json.dumps({**json.loads((run / "checkpoint.json").read_text()),
                                                     "preset": "cpu-tiny"}))
    md = build_report("parallel", results, tmp_path / "reports").markdown.read_text()
    assert "| ParMoE-Mamba_25M-e2 | — | — | not run |" in md


def test_report_without_results_says_so(tmp_path, cli_main):
    code, out, err = cli_main(["report", "experts", "--results", str(tmp_path / "runs.jsonl"),
                               "--out", str(tmp_path / "reports")])
    assert code == 2
    assert "no results for ablation 'experts'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "reports" / "experts.md").exists()


def test_report_cli(tmp_path, cli_main):
    from typer.testing import CliRunner
    from moebench.cli import app
    res = CliRunner().invoke(app, ["report", "experts", "--results", str(FIXTURE / "runs.jsonl"),
                                   "--out", str(tmp_path), "--preset", "gpu-small"])
    assert res.exit_code == 0, res.output
    assert "experts.md" in res.output and "Kendall tau vs the paper 0.931" in res.output
    code, _, err = cli_main(["report", "experts", "--results", str(FIXTURE / "runs.jsonl"), "--preset", "gpu-smal"])
    assert code == 2 and "did you mean gpu-small" in err


# --- paired statistics ----------------------------------------------------------------------------
def test_t_quantiles_and_paired_interval():
    assert t975(1) == 12.706 and t975(2) == 4.303 and t975(30) == 2.042
    assert t975(31) == pytest.approx(2.0395, abs=2e-4) and t975(120) == pytest.approx(1.9799, abs=2e-4)
    p = paired_difference({0: 4.1, 1: 4.3, 2: 4.2, 9: 1.0}, {0: 4.0, 1: 4.0, 2: 4.0})   # seed 9: no pair
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, half-width t(2) * 0.1 / sqrt(3)
    assert p.n == 3 and p.mean == pytest.approx(0.2)
    assert (p.hi - p.mean) == pytest.approx(4.303 * 0.1 / 3**0.5) and (p.mean - p.lo) == pytest.approx(p.hi - p.mean)
    assert fmt_paired(p) == "+0.200 [-0.048, +0.448] (3 seeds)"
    assert fmt_paired(paired_difference({0: 3.9}, {0: 4.0})) == "-0.100 (1 seed)"
    assert paired_difference({1: 3.9}, {0: 4.0}) is None and fmt_paired(None) == "—"


def test_ranking_uses_paired_differences():
    """A's only seed is one where the baseline did badly too: its mean loss looks worse than B's,
    but seed by seed A gains 0.10 on the baseline and B only 0.05."""
    def result(name, finals):
        v = VariantResult(name, get("Mamba_25M"))
        v.rows = [{"seed": s, "metrics": {"final_smoothed_loss": x}} for s, x in finals.items()]
        return v
    base, a, b = result("base", {0: 4.1, 1: 3.8}), result("A", {0: 4.0}), result("B", {0: 4.05, 1: 3.75})
    res = {"base": base, "A": a, "B": b}
    compute_paired(res, "base")
    assert a.loss[0] > b.loss[0]
    scores = ranking_scores(list(res.values()), base)
    assert scores["A"] == pytest.approx(-0.10) and scores["B"] == pytest.approx(-0.05) and scores["base"] == 0


# --- which rows a report reads --------------------------------------------------------------------
def test_report_names_its_rows_file_and_how_many_rows(tmp_path):
    md = build_report("experts", FIXTURE, tmp_path).markdown.read_text()
    assert (f"Generated by `moebench report experts` from `{FIXTURE / 'runs.jsonl'}` only (11 of its 12 rows: the "
            "latest finished run of each variant and seed); do not edit.") in md


def test_report_without_your_rows_points_to_the_published_ones(tmp_path, monkeypatch, cli_main):
    """The default is your own results folder; with nothing there the report says so in one line and
    names the published rows, instead of reading them behind your back."""
    monkeypatch.chdir(tmp_path)
    for what in (["experts"], ["trend"], ["claims"], ["bench"]):
        code, out, err = cli_main(["report", *what])
        assert code == 2, (what, out, err)
        line = " ".join(err.split())                        # Rich wraps long lines at the terminal's width
        assert "results/local/" in line and line.endswith("the published rows: --results results/published"), line
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "results").exists()
    # reading the published rows already: no pointer to themselves
    code, out, err = cli_main(["report", "experts", "--results", "results/published"])
    assert code == 2 and "no results for ablation 'experts'" in err and "the published rows" not in err


def test_report_refuses_rows_of_two_devices(tmp_path, cli_main):
    res = tmp_path / "results"
    shutil.copytree(FIXTURE, res)
    rows = [json.loads(x) for x in (res / "runs.jsonl").read_text().splitlines()]
    rows[3]["env"]["device_name"] = "cpu (x86_64, 2 threads)"
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli_main(["report", "experts", "--results", str(res), "--out", str(tmp_path / "rep")])
    line = " ".join(err.split())
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("the finished runs of 'experts' at preset gpu-small in " in line
            and "mix devices: NVIDIA H100 80GB HBM3 (10 rows), cpu (1 row)" in line and "--device" in line), line
    assert not (tmp_path / "rep").exists()
    code, out, err = cli_main(["report", "experts", "--results", str(res), "--out", str(tmp_path / "rep"),
                               "--device", "H100"])
    assert code == 0, err
    md = (tmp_path / "rep" / "experts.md").read_text()
    assert "(10 of its 12 rows: the latest finished run" in md and "cpu (x86_64" not in md
    code, out, err = cli_main(["report", "experts", "--results", str(res), "--device", "H200"])
    assert code == 2 and "no rows on a device matching 'H200'" in err


def test_report_refuses_rows_of_two_presets_unless_one_is_chosen(tmp_path, cli_main):
    res = tmp_path / "results"
    shutil.copytree(FIXTURE, res)
    rows = [json.loads(x) for x in (res / "runs.jsonl").read_text().splitlines()]
    for r in rows[9:]:
        r["preset"] = "gpu-medium"                 # the same shapes, another budget
    (res / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = cli_main(["report", "experts", "--results", str(res), "--out", str(tmp_path / "rep")])
    line = " ".join(err.split())
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "mix presets: gpu-small (9 rows), gpu-medium (3 rows)" in line and "--preset gpu-small" in line, line
    assert not (tmp_path / "rep").exists()
    rep = build_report("experts", res, tmp_path / "rep", preset="gpu-medium")
    assert rep.preset == "gpu-medium" and any("also has rows of this ablation at preset(s) gpu-small" in w
                                              for w in rep.warnings)
