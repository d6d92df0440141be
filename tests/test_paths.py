"""The user's rows and the published ones never mix: the default folders of everything a user runs
are ignored by git, the published rows (tracked) are where reports and imports expect them, and
`results import` brings rows into the published folder unless told otherwise."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS, PUBLISHED_RESULTS
from moebench.report.compare import read_curve
from moebench.results import SCHEMA, append_record, load_records

REPO = Path(__file__).resolve().parents[1]


def ignored(paths: list[str]) -> set[str]:
    """The paths that the checkout's .gitignore ignores (by its patterns alone, tracked or not)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    p = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(paths),
                       capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr                   # 1: none of them ignored
    return set(p.stdout.split())


def test_the_users_folders_are_ignored_and_the_published_ones_are_not():
    mine = [f"{LOCAL_RESULTS}/runs.jsonl", f"{LOCAL_RESULTS}/runs/Mamba_25M@tiny_s0_0123abcd/curve.csv",
            f"{LOCAL_RESULTS}/bench.jsonl", f"{LOCAL_RESULTS}/sweeps/runs/x/curve.csv", f"{LOCAL_REPORTS}/experts.md",
            f"{LOCAL_REPORTS}/experts_loss.png", "data/prose/manifest.json"]
    published = [f"{PUBLISHED_RESULTS}/runs.jsonl", f"{PUBLISHED_RESULTS}/bench.jsonl",
                 f"{PUBLISHED_RESULTS}/runs/Mamba_25M_s0_166e613d/curve.csv", "reports/experts.md"]
    got = ignored(mine + published + [f"{PUBLISHED_RESULTS}/runs/x/ckpt.pt"])
    assert got == set(mine) | {f"{PUBLISHED_RESULTS}/runs/x/ckpt.pt"}


def test_published_rows_find_their_curves():
    """The published rows moved with their run folders: each finished run's curve is found from its
    folder (report/compare.read_curve), as the reports read them."""
    root = REPO / PUBLISHED_RESULTS
    rows = [r for r in load_records(root / "runs.jsonl") if r.get("status") == "done"]
    assert len(rows) >= 6
    for r in rows:
        curve = read_curve(r, root)
        assert curve is not None and len(curve[0]) > 10, r["run_id"]
    assert not (REPO / "results" / "runs.jsonl").exists(), "the published rows live in results/published/"


def test_import_goes_to_the_published_rows_unless_told(tmp_path, monkeypatch, cli_main):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "gpu.jsonl"
    append_record(src, {"schema": SCHEMA, "kind": "train", "run_id": "r1"})
    code, out, err = cli_main(["results", "import", str(src)])
    assert code == 0, err
    assert load_records(tmp_path / PUBLISHED_RESULTS / "runs.jsonl") == [{"schema": SCHEMA, "kind": "train",
                                                                          "run_id": "r1"}]
    assert f"1 to {Path(PUBLISHED_RESULTS) / 'runs.jsonl'}" in out
    assert not (tmp_path / LOCAL_RESULTS).exists()
    code, out, err = cli_main(["results", "import", str(src), "--into", "elsewhere"])
    assert code == 0 and json.loads((tmp_path / "elsewhere" / "runs.jsonl").read_text())["run_id"] == "r1"


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


def test_quick_start_leaves_the_checkout_clean(tmp_path, monkeypatch, cli_main, text_data):
    """The README's quick start (`moebench run architectures --preset cpu-tiny && moebench report
    architectures`), shortened to one variant and two steps, in a repository that holds only this
    checkout's .gitignore: with the default folders, everything it writes is ignored and lies under
    results/local/ or reports/local/."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    git(repo, "init", "-q")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-qm", "ignore rules")
    monkeypatch.chdir(repo)
    code, out, err = cli_main(["run", "architectures", "--preset", "cpu-tiny", "--only", "Mamba_25M", "--tokens", "2k",
                               "--seeds", "1", "--data", text_data, "--device", "cpu"])
    assert code == 0, err
    code, out, err = cli_main(["report", "architectures"])
    assert code == 0, err
    assert len(load_records(repo / LOCAL_RESULTS / "runs.jsonl")) == 1
    md = (repo / LOCAL_REPORTS / "architectures.md").read_text()
    assert f"from `{LOCAL_RESULTS}/runs.jsonl` only (1 of its 1 rows" in md
    written = {p.relative_to(repo).parts[:2] for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert written == {(".gitignore",), tuple(LOCAL_RESULTS.split("/")), tuple(LOCAL_REPORTS.split("/"))}
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
