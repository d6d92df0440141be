"""The CLI: --help, `list --format json`, `env`, token budgets, and bad inputs through the real entry
point (`main()`: a UserError is one line on stderr and exit code 2) that never overwrite results or
checkpoints."""
import json
import platform
import re
import shutil

import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.fmt import parse_ckpt_every, parse_tokens
from moebench.config import TrainConfig
from moebench.errors import UserError
from moebench.presets import CPU_TINY_BATCH, CPU_TINY_CTX, CPU_TINY_TOKENS, ema_alpha_for
from moebench.registry import VARIANTS, get
from moebench.train import run_id_for

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def assert_one_line_error(code, stdout, stderr, *needles):
    lines = stderr.strip("\n").splitlines()
    assert code == 2, f"exit {code}; stderr: {stderr!r}"
    assert stderr.startswith("error: "), f"the error must be the first thing on stderr: {stderr!r}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {lines}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "Traceback" not in stderr and stdout == "", stdout


# --- help, list, env ------------------------------------------------------------------------------
def test_help(run_moebench, sub_env):
    r = run_moebench(["--help"], sub_env)
    assert r.returncode == 0, r.stderr
    for command in ("train", "list", "env", "data"):
        assert command in r.stdout
    r = runner.invoke(app, ["train", "--help"])
    assert r.exit_code == 0 and "--tokens" in r.stdout and "--resume" in r.stdout


def test_list_json_describes_every_variant():
    r = runner.invoke(app, ["list", "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == list(VARIANTS)
    for row in rows:
        for key in ("total_params", "active_params", "flops_per_token"):
            assert isinstance(row[key], (int, float)) and row[key] > 0, (row["name"], key, row[key])
        assert row["active_params"] <= row["total_params"], row["name"]
        if get(row["name"]).ffn == "moe" and get(row["name"]).n_expert > 1:
            assert row["active_params"] < row["total_params"], row["name"]
    by_name = {row["name"]: row for row in rows}
    assert 20e6 < by_name["Mamba_25M"]["active_params"] < 30e6


def test_list_rejects_an_unknown_format(cli_main):
    assert_one_line_error(*cli_main(["list", "--format", "yaml"]), "yaml")


def test_env_prints_json(run_moebench, sub_env):
    r = run_moebench(["env"], sub_env)
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    assert {"git_sha", "git_dirty", "python", "torch", "device", "device_name"} <= env.keys()
    assert env["python"] == platform.python_version()
    import torch
    assert env["torch"] == torch.__version__


# --- token budgets --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, tokens", [("20000", 20_000), ("50M", 50_000_000), ("1B", 1_000_000_000),
                                          ("2.5e6", 2_500_000), ("1.5k", 1500), ("20_000", 20_000),
                                          (" 3G ", 3_000_000_000)])
def test_parse_tokens(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["lots", "M", "", "0", "-5", "nan", "inf", "1e400"])
def test_parse_tokens_rejects_with_a_user_error(text):
    with pytest.raises(UserError):
        parse_tokens(text)


@pytest.mark.parametrize("text, every", [("200", (200, float("inf"))), ("2m", (0, 2.0)), ("30s", (0, 0.5)),
                                         ("1h", (0, 60.0)), (" 10min ", (0, 10.0))])
def test_parse_ckpt_every(text, every):
    assert parse_ckpt_every(text) == every


# --- bad inputs: one line on stderr, exit 2, nothing written --------------------------------------
@pytest.fixture
def results(finished_run, tmp_path):
    """A results folder that already holds a run: its row and its (valid) checkpoint."""
    row, src, *_ = finished_run
    out = tmp_path / "results"
    (out / "runs" / row["run_id"]).mkdir(parents=True)
    shutil.copy(src / "runs.jsonl", out / "runs.jsonl")
    shutil.copy(src / "runs" / row["run_id"] / "ckpt.pt", out / "runs" / row["run_id"] / "ckpt.pt")
    return out


def train_args(data, out, tokens=30 * 4 * 32, extra=()):
    return ["train", "MoE-Mamba_25M@tiny", "--tokens", str(tokens), "--batch", "4", "--ctx", "32",
            "--lr", "3e-3", "--device", "cpu", "--data", str(data), "--out", str(out), *extra]


def test_unknown_variant_suggests_close_matches(run_moebench, sub_env, results, digest):
    before = digest(results)
    r = run_moebench(["train", "MoE-Mamba_25", "--out", str(results)], sub_env)
    assert_one_line_error(r.returncode, r.stdout, r.stderr, "unknown variant 'MoE-Mamba_25'", "MoE-Mamba_25M")
    assert digest(results) == before


def test_missing_data_dir_with_train_defaults_or_a_sweep(tmp_path, cli_main):
    # the same error, alone, when train picks the budget itself (said once training is under way)
    # and from a sweep (once, not at every rate)
    for argv in (["train", "Mamba_25M@tiny"], ["sweep", "lr", "Mamba_25M"]):
        code, out, err = cli_main([*argv, "--data", str(tmp_path / "no-such-data"), "--device", "cpu",
                                   "--out", str(tmp_path / "results")])
        assert_one_line_error(code, out, err, "no prepared data", "moebench data prepare --input YOUR_TEXT_FOLDER")


def test_missing_data_dir(results, tmp_path, digest, cli_main):
    before = digest(results)
    code, out, err = cli_main(train_args(tmp_path / "no-such-data", results))
    # the command to type, not a Python function
    assert_one_line_error(code, out, err, "no prepared data", "no-such-data",
                          f"moebench data prepare --input YOUR_TEXT_FOLDER --out {tmp_path / 'no-such-data'}")
    assert "moebench.data" not in err
    assert digest(results) == before


def test_budget_smaller_than_one_step(results, text_data, digest, cli_main):
    before = digest(results)
    code, out, err = cli_main(train_args(text_data, results, tokens=100))
    assert_one_line_error(code, out, err, "smaller than one step", "128")
    assert digest(results) == before


def test_bad_token_count(results, text_data, digest, cli_main):
    before = digest(results)
    code, out, err = cli_main(train_args(text_data, results, tokens="lots"))
    assert_one_line_error(code, out, err, "bad token count 'lots'")
    assert digest(results) == before


def test_resume_without_a_checkpoint(results, text_data, digest, cli_main):
    before = digest(results)
    code, out, err = cli_main(train_args(text_data, results, tokens=20 * 4 * 32, extra=["--resume"]))
    assert_one_line_error(code, out, err, "nothing to resume")
    assert digest(results) == before


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_resume_from_a_corrupt_checkpoint(keep, finished_run, results, text_data, digest, cli_main):
    row, src, cfg, *_ = finished_run
    # the checkpoint of the run the command below names, cut short from a real one
    tcfg = TrainConfig(tokens=30 * 4 * 32, batch=4, ctx=32, lr=3e-3, lr_source="user", data_dir=text_data,
                       ema_alpha=ema_alpha_for("cpu-tiny", 30))
    ckpt = results / "runs" / run_id_for(cfg, tcfg) / "ckpt.pt"
    ckpt.parent.mkdir(parents=True)
    data = (src / "runs" / row["run_id"] / "ckpt.pt").read_bytes()
    ckpt.write_bytes(data[: int(len(data) * keep)])
    before = digest(results)
    code, out, err = cli_main(train_args(text_data, results, extra=["--resume"]))
    assert_one_line_error(code, out, err, "corrupt or truncated", str(ckpt))
    assert digest(results) == before


def test_a_checkpoint_error_keeps_its_reason_whole(tmp_path):
    """torch's refusal of a pickled object is 160 characters of advice before the reason; the error
    names the object and never cuts a word."""
    import fractions

    import torch

    from moebench import checkpoint
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "step": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert "Unsupported global: GLOBAL fractions.Fraction was not an allowed global by default" in msg, msg
    assert "\x1b[" not in msg and "\n" not in msg and str(path) in msg


def test_list_at_80_columns_keeps_every_name_whole(run_moebench, sub_env):
    # a terminal of 80 columns (TTY_COMPATIBLE: Rich takes the pipe for one)
    r = run_moebench(["list", "--tiny"], {**sub_env, "COLUMNS": "80", "TTY_COMPATIBLE": "1"})
    assert r.returncode == 0, r.stderr
    lines = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout).splitlines()        # no styles
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    for name in VARIANTS:
        assert any(line.split()[:1] == [f"{name}@tiny"] for line in lines), name
    assert "…" not in r.stdout and "FLOPs/tok" in r.stdout and "left out" in r.stderr
    from moebench.cli.models import LIST_COLUMNS, variants_table
    from moebench.models.lm import describe
    wide = variants_table([describe(get(name)) for name in VARIANTS], 200)
    assert tuple(c.header for c in wide.columns) == LIST_COLUMNS


def test_list_csv_has_one_row_per_variant():
    import csv
    import io
    r = runner.invoke(app, ["list", "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["name"] for row in rows] == list(VARIANTS)
    assert int(rows[0]["total_params"]) > 20e6 and "active_params" in rows[0]


# --- train's defaults fit the variant and the device -----------------------------------------------
@pytest.fixture
def trained(monkeypatch):
    """Replaces training: the TrainConfig and device `moebench train` would train with, and a row."""
    import moebench.train
    seen = {}

    def fake_train(cfg, tcfg, on_progress=None, **kwargs):
        seen.update(cfg=cfg, tcfg=tcfg, **kwargs)
        steps = tcfg.tokens // (tcfg.batch * tcfg.ctx)
        on_progress(fake_progress(steps, steps))
        return {"metrics": {"tokens": tcfg.tokens, "final_smoothed_loss": 5.0, "val_loss": 5.0, "val_ppl": 148.4,
                            "tokens_per_s": 1.0}}
    monkeypatch.setattr(moebench.train, "train", fake_train)
    return seen


def pretend_cuda(monkeypatch):
    import torch

    import moebench.env
    real = moebench.env.resolve_device
    monkeypatch.setattr(moebench.env, "resolve_device",
                        lambda device, *a: torch.device("cuda") if device in ("auto", "cuda") else real(device, *a))


@pytest.mark.parametrize("variant, cuda, preset", [("Mamba_25M@tiny", False, "cpu-tiny"),
                                                   ("Mamba_25M@tiny", True, "cpu-tiny"),
                                                   ("Mamba_25M", False, "cpu-tiny"),
                                                   ("Mamba_25M", True, "gpu-small")])
def test_train_defaults_come_from_the_preset_that_fits(variant, cuda, preset, trained, monkeypatch, cli_main,
                                                       tmp_path):
    if cuda:
        pretend_cuda(monkeypatch)
    code, stdout, stderr = cli_main(["train", variant, "--out", str(tmp_path)])
    assert code == 0, stderr
    tcfg = trained["tcfg"]
    want = {"cpu-tiny": (CPU_TINY_TOKENS, CPU_TINY_BATCH, CPU_TINY_CTX), "gpu-small": (20_000_000, 32, 1024)}[preset]
    assert (tcfg.tokens, tcfg.batch, tcfg.ctx) == want
    steps = tcfg.tokens // (tcfg.batch * tcfg.ctx)
    assert steps == {"cpu-tiny": 128, "gpu-small": 610}[preset]
    assert tcfg.ema_alpha == pytest.approx(50 / steps)          # run's rule, not the paper's 0.001
    assert f"{tcfg.tokens:,} tokens = {steps:,} steps of {tcfg.batch} x {tcfg.ctx}" in stderr
    assert f"(tokens, batch, ctx from preset {preset})" in stderr and "alpha" in stderr


def test_train_keeps_what_is_given_and_smooths_by_the_run_rule(trained, cli_main, tmp_path):
    code, _, stderr = cli_main(["train", "Mamba_25M@tiny", "--tokens", "20k", "--ctx", "64", "--out", str(tmp_path)])
    assert code == 0, stderr
    tcfg = trained["tcfg"]
    assert (tcfg.tokens, tcfg.batch, tcfg.ctx) == (20_000, CPU_TINY_BATCH, 64)
    assert tcfg.ema_alpha == 0.5                                # 39 steps: 50 / 39 clamped to 0.5
    assert "(batch from preset cpu-tiny)" in stderr
    code, _, stderr = cli_main(["train", "Mamba_25M@tiny", "--tokens", "20k", "--batch", "4", "--ctx", "64",
                                "--ema-alpha", "0.01", "--out", str(tmp_path)])
    assert code == 0 and trained["tcfg"].ema_alpha == 0.01 and "preset" not in stderr
    code, _, stderr = cli_main(["train", "Mamba_25M@tiny", "--tokens", "20k", "--batch", "4", "--ctx", "64",
                                "--out", str(tmp_path)])
    assert code == 0 and trained["tcfg"].ema_alpha == 0.5 and "preset" not in stderr


# --- progress off a terminal: plain lines ----------------------------------------------------------
def fake_progress(step, steps=100, tok_s=1000.0):
    from types import SimpleNamespace
    return SimpleNamespace(step=step, steps=steps, tokens=step * 100, total_tokens=steps * 100, loss=5.0,
                           smoothed=5.5, tok_s=tok_s, val_loss=None)


def test_progress_is_a_plain_line_every_few_seconds_off_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    import moebench.cli.progress as progress
    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    buf = io.StringIO()
    shown = progress.TrainingProgress(console=Console(file=buf, width=200))
    shown.start("Mamba_25M@tiny", 10_000)
    for step, t in ((10, 0.0), (20, 5.0), (30, 10.5), (40, 12.0), (100, 13.0)):   # the last step always shows
        clock["t"] = t
        shown.update(fake_progress(step))
    shown.end("done, smoothed loss 5.500")
    shown.close()
    lines = buf.getvalue().splitlines()
    assert lines == ["Mamba_25M@tiny: step 10/100 (10%), loss 5.000, smoothed 5.500, 1,000 tok/s, ETA 9s",
                     "Mamba_25M@tiny: step 30/100 (30%), loss 5.000, smoothed 5.500, 1,000 tok/s, ETA 7s",
                     "Mamba_25M@tiny: step 100/100 (100%), loss 5.000, smoothed 5.500, 1,000 tok/s, ETA 0s",
                     "Mamba_25M@tiny: done, smoothed loss 5.500"], lines


def test_progress_on_a_terminal_is_a_bar_without_plain_lines():
    import io

    from rich.console import Console

    from moebench.cli.progress import TrainingProgress
    buf = io.StringIO()
    with TrainingProgress("architectures (1 runs)", 10_000,
                          console=Console(file=buf, width=200, force_terminal=True)) as shown:
        shown.start("Mamba_25M@tiny", 10_000)
        for step in (10, 100):
            shown.update(fake_progress(step))
        shown.end("done", 10_000)
    text = buf.getvalue()
    assert "Mamba_25M@tiny" in text and "architectures (1 runs)" in text and "━" in text
    assert "ETA" not in text and "step 10/100" not in text


def test_run_and_sweep_print_progress_lines_when_piped(text_data, tmp_path, cli_main):
    """cli_main's stderr is not a terminal, as under `2>&1 | cat`: every training says where it is."""
    base = ["--data", text_data, "--out", str(tmp_path), "--device", "cpu"]
    code, _, stderr = cli_main(["run", "architectures", "--preset", "test", "--only", "Mamba_25M", *base])
    assert code == 0, stderr
    assert re.search(r"^Mamba_25M s0 \(1 of 1\): step 3/3 \(100%\), loss [\d.]+, smoothed [\d.]+, val [\d.]+, "
                     r"[\d,]+ tok/s, ETA 0s$", stderr, re.M), stderr
    assert re.search(r"^Mamba_25M s0 \(1 of 1\): done, smoothed loss [\d.]+$", stderr, re.M), stderr
    # a run passed over (it has a checkpoint, and no --resume) is named by its own label
    from moebench.ablations import make_plan
    plan = make_plan("architectures", "test", only=["Transformer_25M"], out=tmp_path, data_dir=text_data)
    (tmp_path / "runs" / plan.runs[0].run_id).mkdir(parents=True)
    (tmp_path / "runs" / plan.runs[0].run_id / "ckpt.pt").write_bytes(b"")
    code, _, stderr = cli_main(["run", "architectures", "--preset", "test", "--only", "Mamba_25M,Transformer_25M",
                                *base])
    assert code == 1 and re.search(r"^Transformer_25M s0 \(1 of 1\): interrupted$", stderr, re.M), stderr
    code, _, stderr = cli_main(["sweep", "lr", "Mamba_25M", "--preset", "test", "--grid", "0.001", *base])
    assert code == 0, stderr
    assert re.search(r"^Mamba_25M lr 0\.001: step 3/3 \(100%\), loss [\d.]+, .* tok/s, ETA 0s$", stderr, re.M), stderr
    assert re.search(r"^Mamba_25M lr 0\.001: done, smoothed loss [\d.]+$", stderr, re.M), stderr
