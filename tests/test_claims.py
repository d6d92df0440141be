"""reports/claims.md: the verdict of each claim follows from the rows (tests/fixtures/experts_gpu-small:
every MoE-Mamba from 4 experts ends below Mamba_25M, two seeds) and turns when the rows do."""
import json
import shutil
from pathlib import Path

import pytest

from moebench.errors import UserError
from moebench.report.claims import (CONTRADICTED, NOT_AT_BUDGET, NOT_RUN, REPRODUCED, Paired, _below, _within,
                                    build_claims)

FIXTURE = Path(__file__).parent / "fixtures" / "experts_gpu-small"


@pytest.fixture
def results(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "res")
    return tmp_path / "res"


def verdicts(path: Path) -> dict[str, str]:
    """claim text -> verdict, from the markdown table."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[-1].startswith("**"):
            out[cells[0]] = cells[-1].strip("*")
    return out


def rewrite(results: Path, change) -> None:
    path = results / "runs.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in (change(r) for r in rows) if r is not None]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


T4_ORDER = "the loss falls monotonically with the number of experts (table 4)"
T4_BEATS = "from 4 experts on, MoE-Mamba beats Mamba (table 4)"


def test_fixture_reproduces_table_4_and_leaves_the_rest_not_run(results, tmp_path):
    v = verdicts(build_claims(results, tmp_path / "out"))
    assert v[T4_ORDER] == REPRODUCED and v[T4_BEATS] == REPRODUCED
    assert v["MoE-Mamba beats Mamba (speedup 1.76 at 25M)"] == NOT_RUN          # no MoE-Mamba_25M rows
    assert v["sequential MoE-Mamba is ahead of parallel (table 7)"] == NOT_RUN


def test_mamba_ahead_contradicts(results, tmp_path):
    def mamba_wins(r):
        if r["variant"] == "Mamba_25M":
            r["metrics"]["final_smoothed_loss"] -= 0.5
        return r
    rewrite(results, mamba_wins)
    assert verdicts(build_claims(results, tmp_path / "out"))[T4_BEATS] == CONTRADICTED


def test_one_seed_cannot_tell(results, tmp_path):
    rewrite(results, lambda r: r if r.get("seed", 0) == 0 else None)
    v = verdicts(build_claims(results, tmp_path / "out"))
    assert v[T4_BEATS] == NOT_AT_BUDGET


def test_reversed_expert_order_contradicts(results, tmp_path):
    def reverse(r):
        if r["variant"].startswith("MoE-Mamba_25M-e"):
            e = int(r["variant"].rsplit("e", 1)[1])
            r["metrics"]["final_smoothed_loss"] = 4.0 + 0.01 * e + 0.001 * r.get("seed", 0)
        return r
    rewrite(results, reverse)
    assert verdicts(build_claims(results, tmp_path / "out"))[T4_ORDER] == CONTRADICTED


def test_interval_rules():
    assert _below(Paired(-0.05, -0.08, -0.02, 3)) == REPRODUCED
    assert _below(Paired(0.05, 0.02, 0.08, 3)) == CONTRADICTED
    assert _below(Paired(-0.01, -0.03, 0.01, 3)) == NOT_AT_BUDGET
    assert _below(Paired(-0.05, None, None, 1)) == NOT_AT_BUDGET
    assert _below(None) == NOT_RUN
    assert _within(Paired(0.0, -0.01, 0.015, 3)) == REPRODUCED
    assert _within(Paired(0.05, 0.03, 0.07, 3)) == CONTRADICTED
    assert _within(Paired(0.01, -0.01, 0.03, 3)) == NOT_AT_BUDGET


def test_claims_name_their_rows_and_refuse_two_devices(results, tmp_path):
    md = build_claims(results, tmp_path / "out").read_text()
    assert f"from `{results / 'runs.jsonl'}` only" in md
    # runs are shared (Mamba_25M is in every ablation), so each ablation states its own
    assert "of the 12 rows in the file): architectures: 2 at gpu-small on NVIDIA H100 80GB HBM3;" in md
    assert "experts: 11 at gpu-small on NVIDIA H100 80GB HBM3;" in md

    def one_on_a_cpu(r):
        if r["variant"] == "MoE-Mamba_25M-e8" and r["seed"] == 1:
            r["env"]["device_name"] = "cpu (x86_64, 2 threads)"
        return r
    rewrite(results, one_on_a_cpu)
    with pytest.raises(UserError, match=r"'\w+' at preset gpu-small .* mix devices: NVIDIA H100 80GB HBM3 "
                                        r"\(10 rows\), cpu \(1 row\)"):
        build_claims(results, tmp_path / "out")
    md = build_claims(results, tmp_path / "out", device="H100").read_text()
    assert "experts: 10 at gpu-small on NVIDIA H100 80GB HBM3;" in md
    with pytest.raises(UserError, match="no finished runs of the paper's ablations .* the published rows"):
        build_claims(tmp_path / "empty", tmp_path / "out")
    # two presets of one ablation: one is chosen, or none
    rewrite(results, lambda r: {**r, "preset": "gpu-medium"} if r["variant"] == "MoE-Mamba_25M-e1" else r)
    with pytest.raises(UserError, match=r"mix presets: gpu-small \(\d+ rows\), gpu-medium \(2 rows\)"):
        build_claims(results, tmp_path / "out", device="H100")
    assert "experts: 8 at gpu-small" in build_claims(results, tmp_path / "out", "gpu-small", "H100").read_text()
