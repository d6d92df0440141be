"""train() on CPU with the tiny twins on real English: the loss falls, a SIGKILLed run resumes to the
same curve as an uninterrupted one, SIGTERM / Ctrl-C save a checkpoint and --resume finishes the
run, a NaN stops the run as "failed" and keeps the last good checkpoint, and a finished run writes
exactly one self-describing row."""
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pytest
import torch

import moebench.train as train_module
from moebench import checkpoint
from moebench.data import TokenData, val_batches
from moebench.errors import UserError
from moebench.registry import get
from moebench.results import CKPT_INFO, SCHEMA, load_frame, load_records
from moebench.train import TrainingFailed, compiled_on, run_id_for, train

pytestmark = pytest.mark.usefixtures("one_thread")

# curve columns that hold the run's math (tok_s and peak_mem_gib are timings)
TIMING_COLUMNS = {"tok_s", "peak_mem_gib"}


def run_dir(out, cfg, tcfg):
    return out / "runs" / run_id_for(cfg, tcfg)


def assert_same_curve(got: list[dict], want: list[dict], what: str, columns=None, atol=1e-6):
    assert [r["step"] for r in got] == [r["step"] for r in want], f"{what}: different curve points"
    columns = columns or sorted(set(want[0]) - TIMING_COLUMNS)
    assert set(columns) <= set(got[0]), f"{what}: missing columns {set(columns) - set(got[0])}"
    for g, w in zip(got, want):
        for c in columns:
            if w[c] in ("", None) or g[c] in ("", None):
                assert g[c] == w[c], f"{what}: step {w['step']} {c}: {g[c]!r} != {w[c]!r}"
                continue
            a, b = float(g[c]), float(w[c])
            assert abs(a - b) <= atol, f"{what}: step {w['step']} {c}: {a!r} != {b!r} (diff {abs(a - b):.3g})"


@pytest.fixture
def capture_model(monkeypatch):
    """holder["model"]: the model train() builds; each function in holder["on_build"] is called
    with it as soon as it is built (to hook it before the first step)."""
    holder = {"on_build": []}
    real = train_module.build_model

    def build(*args, **kwargs):
        holder["model"] = model = real(*args, **kwargs)
        for fn in holder["on_build"]:
            fn(model)
        return model
    monkeypatch.setattr(train_module, "build_model", build)
    return holder


def non_finite(state, prefix="") -> list[str]:
    """Names of the floating tensors in a (nested) state dict that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not torch.isfinite(state).all() else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in non_finite(v, f"{prefix}[{i}]")]
    return []


# --- 1. the loss falls on real text -----------------------------------------------------------------
def test_loss_falls_on_real_text(finished_run, curve_reader):
    row, out, cfg, tcfg, wall = finished_run
    curve = curve_reader(row["curve"])
    loss = [float(r["loss"]) for r in curve]
    val = [float(r["val_loss"]) for r in curve if r["val_loss"]]
    smoothed = [float(r["smoothed"]) for r in curve]
    assert len(curve) >= 8 and len(val) >= 5, curve
    assert loss[0] > math.log(50257) - 0.5, f"an untrained model should start near ln(vocab): {loss[0]:.3f}"
    late = sum(loss[-2:]) / 2
    assert late < loss[0] - 1.5, f"training loss did not fall: first {loss[0]:.3f}, last two {late:.3f}"
    assert val[-1] < val[0] - 1.0, f"validation loss did not fall: {val}"
    assert smoothed[-1] < smoothed[0] - 1.0, f"smoothed loss did not fall: {smoothed}"
    assert row["metrics"]["val_loss"] == pytest.approx(val[-1])
    # per source too: the overall loss is the mean of the sources' weighted by their windows
    by_source = row["metrics"]["val_loss_by_source"]
    data = TokenData(tcfg.data_dir)
    vb = val_batches(data, tcfg.eval_batches, tcfg.micro_batch or tcfg.batch, tcfg.ctx)
    windows = {s: sum(len(b.x) for b in vb if b.source == s) for s in by_source}
    assert set(by_source) == {b.source for b in vb} and by_source
    assert sum(by_source[s] * windows[s] for s in by_source) / sum(windows.values()) == pytest.approx(val[-1])
    assert float(curve[-1][f"val:{next(iter(by_source))}"]) == pytest.approx(next(iter(by_source.values())))
    # 30 tiny steps (about 7 s on 2 cores): the budget is fixed in steps, not asserted in seconds
    assert row["metrics"]["steps"] == 30


# --- 8. exactly one self-describing row per finished run --------------------------------------------
def test_finished_run_writes_one_row_with_the_schema(finished_run):
    row, out, cfg, tcfg, _ = finished_run
    rows = load_records(out / "runs.jsonl")
    assert len(rows) == 1 and len(out.joinpath("runs.jsonl").read_text().splitlines()) == 1
    rec = rows[0]
    assert rec == json.loads(json.dumps(row, sort_keys=True, default=str))     # what train() returned
    assert json.loads((out / "runs" / rec["run_id"] / "result.json").read_text()) == rec

    assert rec["schema"] == SCHEMA and rec["status"] == "done" and rec["kind"] == "train"
    assert rec["run_id"] == run_id_for(cfg, tcfg)
    assert rec["variant"] == "MoE-Mamba_25M@tiny" and rec["variant_hash"] == cfg.config_hash()
    assert rec["model"] == cfg.to_dict()
    assert rec["train"].items() >= {k: v for k, v in tcfg.to_dict().items() if k != "compile"}.items()
    assert tcfg.compile is None and rec["train"]["compile"] is False and rec["impl"]["compile"] is False  # auto: eager on a CPU
    assert rec["train"]["steps"] == 30 and rec["train"]["accum"] == 2 and rec["train"]["lr"] == 3e-3
    assert rec["seed"] == tcfg.seed == 0

    m = rec["metrics"]
    assert m["tokens"] == tcfg.tokens == 30 * 4 * 32 and m["steps"] == 30
    for key in ("final_smoothed_loss", "val_loss", "val_ppl", "tokens_per_s", "wall_s"):
        assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, (key, m[key])
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["final_smoothed_loss"] < math.log(50257)
    assert "mfu" in m and m["mfu"] is None, "MFU on CPU must be null, never a guess"
    assert "peak_mem_gib" in m and m["peak_mem_gib"] is None

    e = rec["env"]
    assert isinstance(e["device_name"], str) and e["device_name"].startswith("cpu")
    assert e["torch"] == torch.__version__ and e["python"] == platform.python_version()
    assert e["git_sha"] is None or (isinstance(e["git_sha"], str) and len(e["git_sha"]) == 40)
    assert e["git_dirty"] in (True, False, None)

    frame = load_frame(out / "runs.jsonl")       # the flattened columns reports read
    for col in ("schema", "run_id", "variant", "variant_hash", "seed", "status", "metrics.tokens",
                "metrics.final_smoothed_loss", "metrics.val_loss", "metrics.val_ppl", "metrics.tokens_per_s",
                "metrics.mfu", "metrics.peak_mem_gib", "metrics.wall_s", "env.device_name", "env.torch",
                "env.python", "env.git_sha", "env.git_dirty", "model.n_expert", "train.batch"):
        assert col in frame.columns, col


def test_compile_as_asked_else_the_devices_default(tiny_tcfg, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not compiled_on(tiny_tcfg(), cuda) and not compiled_on(tiny_tcfg(), cpu)    # eager until fixed
    monkeypatch.setattr(train_module, "COMPILE_BY_DEFAULT_ON_CUDA", True)
    assert compiled_on(tiny_tcfg(), cuda) and not compiled_on(tiny_tcfg(), cpu)
    assert not compiled_on(replace(tiny_tcfg(), compile=False), cuda)
    assert compiled_on(replace(tiny_tcfg(), compile=True), cpu)


def test_run_id_is_deterministic_and_separates_configs(tiny_tcfg):
    cfg, tcfg = get("MoE-Mamba_25M@tiny"), tiny_tcfg()
    rid = run_id_for(cfg, tcfg)
    assert rid == run_id_for(get("MoE-Mamba_25M@tiny"), tiny_tcfg())
    assert rid.startswith("MoE-Mamba_25M-tiny_s0_") and "/" not in rid
    others = {run_id_for(cfg, tiny_tcfg(seed=1)), run_id_for(cfg, tiny_tcfg(steps=41)),
              run_id_for(cfg, tcfg, tag="x"), run_id_for(get("Mamba_25M@tiny"), tcfg)}
    assert rid not in others and len(others) == 4


def test_refuses_to_overwrite_a_checkpoint_or_resume_nothing(finished_run, tmp_path):
    row, out, cfg, tcfg, _ = finished_run
    ckpt = out / "runs" / row["run_id"] / "ckpt.pt"
    before = (ckpt.stat().st_mtime_ns, ckpt.stat().st_size, out.joinpath("runs.jsonl").read_bytes())
    with pytest.raises(UserError, match="already has a checkpoint"):
        train(cfg, tcfg, out=out, device="cpu")
    assert (ckpt.stat().st_mtime_ns, ckpt.stat().st_size, out.joinpath("runs.jsonl").read_bytes()) == before
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg, tcfg, out=tmp_path, device="cpu", resume=True)
    assert not (tmp_path / "runs.jsonl").exists()


def test_a_run_trained_elsewhere_is_refused_without_touching_it(finished_run):
    """While another process holds the run's lock (here: this one, through a second descriptor),
    train() raises RunBusy before reading or writing anything; the lock goes with its holder."""
    from moebench.errors import RunBusy
    from moebench.results import run_lock
    row, out, cfg, tcfg, _ = finished_run
    run_dir = out / "runs" / row["run_id"]
    ckpt = run_dir / "ckpt.pt"
    before = (ckpt.stat().st_mtime_ns, out.joinpath("runs.jsonl").read_bytes())
    with run_lock(run_dir):
        with pytest.raises(RunBusy, match="being trained by another process"):
            train(cfg, tcfg, out=out, device="cpu", resume=True)
    assert (ckpt.stat().st_mtime_ns, out.joinpath("runs.jsonl").read_bytes()) == before
    with run_lock(run_dir):                  # released: free to take again
        pass


# --- 2. SIGKILL after the first checkpoint, resume: the same curve ----------------------------------
KILL_DRIVER = r"""
import json, sys, torch
torch.set_num_threads(1)
from moebench.config import TrainConfig
from moebench.data import TokenData, val_batches
from moebench.registry import get
from moebench.train import train
kw = json.loads(sys.argv[2])
kw["betas"] = tuple(kw["betas"])
train(get(sys.argv[1]), TrainConfig(**kw), out=sys.argv[3], device="cpu", ckpt_every_steps=int(sys.argv[4]))
"""


def kill_at_first_checkpoint(p: subprocess.Popen, log: Path, out: Path, saved: Callable[[], bool]) -> None:
    """SIGKILL the training process `p` as soon as `saved()` sees its first checkpoint (120 s at most);
    it must not have finished (no row in out/runs.jsonl), else nothing was tested."""
    try:
        t0 = time.monotonic()
        while not saved():
            assert p.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() - t0 < 120, "no checkpoint after 120 s"
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (out / "runs.jsonl").exists(), "the run finished before it was killed: nothing was tested"


def test_sigkill_then_resume_gives_the_uninterrupted_curve(finished_run, tmp_path, sub_env, curve_reader):
    ref_row, _, cfg, tcfg, _ = finished_run
    out = tmp_path / "killed"
    ckpt = run_dir(out, cfg, tcfg) / "ckpt.pt"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, cfg.name, json.dumps(tcfg.to_dict()), str(out), "10"],
                             env=sub_env, stdout=f, stderr=subprocess.STDOUT)
    kill_at_first_checkpoint(p, log, out, ckpt.exists)
    saved = checkpoint.load(ckpt)["step"]
    assert 10 <= saved < 30 and saved % 10 == 0

    row = train(cfg, tcfg, out=out, device="cpu", resume=True)
    assert row["status"] == "done" and row["run_id"] == ref_row["run_id"]
    assert_same_curve(curve_reader(row["curve"]), curve_reader(ref_row["curve"]),
                      f"resumed from step {saved} vs uninterrupted")
    for key in ("tokens", "steps", "final_smoothed_loss", "final_train_loss", "val_loss"):
        assert row["metrics"][key] == pytest.approx(ref_row["metrics"][key], abs=1e-6), key
    rows = load_records(out / "runs.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "done"


def test_cli_ckpt_every_sigkill_then_resume_gives_the_uninterrupted_curve(text_data, tmp_path, sub_env, curve_reader,
                                                                        cli_main):
    """`moebench train --ckpt-every 10` in its own process, killed once its first checkpoint is on disk;
    `--resume` (with another cadence: not part of the run's identity) finishes with the curve of an
    uninterrupted run."""
    args = ["train", "Mamba_25M@tiny", "--tokens", str(40 * 2 * 16), "--batch", "2", "--ctx", "16", "--lr", "3e-3",
            "--device", "cpu", "--data", text_data]
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "moebench", *args, "--out", str(out), "--ckpt-every", "10"],
                             cwd=Path(train_module.__file__).parents[1], env=sub_env, stdout=f,
                             stderr=subprocess.STDOUT)
    kill_at_first_checkpoint(p, log, out, lambda: bool(list(out.glob("runs/*/ckpt.pt"))))
    (ckpt,) = out.glob("runs/*/ckpt.pt")
    saved = checkpoint.load(ckpt)["step"]
    assert saved in (10, 20, 30), saved
    # its output went to a file, not a terminal: plain progress lines, not a bar drawn in place
    assert re.search(r"^Mamba_25M@tiny: step \d+/40 \(\d+%\), loss [\d.]+, smoothed [\d.]+, val [\d.]+, [\d,]+ tok/s, "
                     r"ETA \S+$", log.read_text(), re.M), log.read_text()[-2000:]

    code, _, stderr = cli_main([*args, "--out", str(out), "--resume", "--ckpt-every", "5m"])
    assert code == 0, stderr
    assert "Mamba_25M@tiny: step 40/40 (100%)" in stderr, stderr
    code, _, stderr = cli_main([*args, "--out", str(tmp_path / "whole")])
    assert code == 0, stderr
    (resumed,), (whole,) = load_records(out / "runs.jsonl"), load_records(tmp_path / "whole" / "runs.jsonl")
    assert resumed["run_id"] == whole["run_id"] and resumed["status"] == "done"
    assert_same_curve(curve_reader(resumed["curve"]), curve_reader(whole["curve"]),
                      f"moebench train killed after its step-{saved} checkpoint, resumed, vs uninterrupted")
    for key in ("tokens", "steps", "final_smoothed_loss", "final_train_loss", "val_loss"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], abs=1e-6), key


def test_ckpt_minutes_saves_at_the_next_curve_point(tiny_tcfg, tmp_path):
    """A checkpoint due by the clock (here at once: 0 minutes) is written at the next curve point
    (every 5 steps); the default, tcfg.ckpt_minutes (10), writes none in a run of seconds."""
    cfg, tcfg = get("Mamba_25M@tiny"), tiny_tcfg(steps=12)
    seen = {}
    for minutes in (0, None):
        ckpt = run_dir(tmp_path / str(minutes), cfg, tcfg) / "ckpt.pt"

        def on_progress(p, ckpt=ckpt, minutes=minutes):
            seen[(minutes, p.step)] = checkpoint.load(ckpt)["step"] if ckpt.exists() else None
        train(cfg, tcfg, out=tmp_path / str(minutes), device="cpu", on_progress=on_progress, ckpt_minutes=minutes)
    assert (seen[(0, 10)], seen[(None, 10)]) == (5, None), seen


def test_curve_csv_follows_the_run_before_any_checkpoint(tiny_tcfg, tmp_path, monkeypatch, curve_reader):
    """curve.csv is there from the first curve point on, long before the first checkpoint (10
    minutes): a user can watch it. With the interval at 0 it holds every point so far."""
    monkeypatch.setattr(train_module, "CURVE_EVERY_S", 0.0)
    cfg, tcfg = get("Mamba_25M@tiny"), tiny_tcfg(steps=10)
    folder = run_dir(tmp_path, cfg, tcfg)
    seen = {}

    def on_progress(p):
        seen[p.step] = ([int(r["step"]) for r in curve_reader(folder / "curve.csv")],
                        (folder / "ckpt.pt").exists())
    train(cfg, tcfg, out=tmp_path, device="cpu", on_progress=on_progress)
    points = sorted(seen)
    assert len(points) >= 2 and points[-1] == 10, points
    for step in points:
        assert seen[step] == ([p for p in points if p <= step], False), (step, seen[step])


@pytest.mark.parametrize("every, message", [("0", "must be positive"), ("2x", "bad --ckpt-every '2x'"),
                                            ("1.5", "bad --ckpt-every '1.5'")])
def test_a_bad_ckpt_every_is_one_line(every, message, cli_main, tmp_path):
    for command in (["train", "Mamba_25M@tiny"], ["run", "architectures"], ["sweep", "lr", "Mamba_25M"]):
        code, stdout, stderr = cli_main([*command, "--ckpt-every", every, "--out", str(tmp_path)])
        assert code == 2 and stderr.startswith("error: ") and message in stderr, (command, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stdout == "", (command, stderr)
    assert not any(tmp_path.iterdir())


# --- SIGTERM mid-step (in process): checkpoint, KeyboardInterrupt, resume ----------------------------
def test_sigterm_mid_step_saves_and_resume_matches_uninterrupted(finished_run, tmp_path, capture_model,
                                                                curve_reader):
    """SIGTERM arrives during step 12, an evaluation step (every 3 steps) between two logging steps
    (every 5): train() finishes the step, saves and raises KeyboardInterrupt; the resumed run's curve
    is the uninterrupted one, since step 12 is a curve point of both."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("train() installs its signal handlers only in the main thread")
    ref_row, _, cfg, tcfg, _ = finished_run
    out = tmp_path / "term"
    forwards = {"n": 0}

    def pre_hook(module, args):
        if module.training:
            forwards["n"] += 1
            if forwards["n"] == 23:                      # first micro-batch of step 12 (2 per step)
                os.kill(os.getpid(), signal.SIGTERM)
    capture_model["on_build"].append(lambda model: model.register_forward_pre_hook(pre_hook))

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 12;"):
        train(cfg, tcfg, out=out, device="cpu")
    assert signal.getsignal(signal.SIGTERM) is handler, "train() must restore the signal handlers"
    ckpt = run_dir(out, cfg, tcfg) / "ckpt.pt"
    assert checkpoint.load(ckpt)["step"] == 12
    assert not (out / "runs.jsonl").exists(), "an interrupted run appends no row"
    # what a report reads to show the run as interrupted (report/ablation.interrupted_runs)
    info = json.loads((ckpt.parent / CKPT_INFO).read_text())
    assert (info["step"], info["steps"], info["seed"]) == (12, 30, tcfg.seed)
    assert info["variant_hash"] == cfg.config_hash() and info["train"] == json.loads(json.dumps(tcfg.to_dict()))

    row = train(cfg, tcfg, out=out, device="cpu", resume=True)
    assert row["status"] == "done" and row["metrics"]["steps"] == ref_row["metrics"]["steps"]
    steps = [int(r["step"]) for r in curve_reader(row["curve"])]
    assert steps == sorted(set(steps)), f"curve steps repeat or go back: {steps}"
    assert_same_curve(curve_reader(row["curve"]), curve_reader(ref_row["curve"]), "SIGTERM at step 12, resumed")
    for key in ("tokens", "final_smoothed_loss", "final_train_loss", "val_loss"):
        assert row["metrics"][key] == pytest.approx(ref_row["metrics"][key], abs=1e-6), key
    assert len(load_records(out / "runs.jsonl")) == 1


# --- 7. Ctrl-C on the CLI: checkpoint, exit 130, --resume finishes -----------------------------------
# runs `moebench train` through the real entry point, touching a marker file at each curve point so
# that the test knows training is under way before it presses Ctrl-C
CLI_DRIVER = r"""
import sys, pathlib, torch
torch.set_num_threads(1)
import moebench.train as T
marker, real = pathlib.Path(sys.argv[1]), T.train
def train(*args, on_progress=None, **kwargs):
    def progress(p):
        on_progress(p)
        marker.write_text(str(p.step))
    return real(*args, on_progress=progress, **kwargs)
T.train = train
sys.argv = ["moebench", *sys.argv[2:]]
from moebench.cli import main
main()
"""



def test_ctrl_c_saves_exits_130_and_resume_finishes(text_data, tmp_path, sub_env, curve_reader, cli_main):
    out, marker = tmp_path / "results", tmp_path / "marker"
    # batch 2 x ctx 16: the CLI evaluates 8 batches about 10 times a run, so keep them small
    args = ["train", "Mamba_25M@tiny", "--tokens", str(24 * 2 * 16), "--batch", "2", "--ctx", "16",
            "--lr", "3e-3", "--device", "cpu", "--data", text_data, "--out", str(out)]
    with open(tmp_path / "stdout", "w") as fo, open(tmp_path / "stderr", "w") as fe:
        p = subprocess.Popen([sys.executable, "-c", CLI_DRIVER, str(marker), *args], env=sub_env, stdout=fo, stderr=fe)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert p.poll() is None, f"the run ended before its first curve point: " \
                                     f"{(tmp_path / 'stderr').read_text()[-2000:]}"
            assert time.monotonic() - t0 < 120, "no progress after 120 s"
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert p.returncode == 130, f"exit {p.returncode}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr and "--resume" in stderr, stderr[-2000:]
    ckpts = list(out.glob("runs/*/ckpt.pt"))
    assert len(ckpts) == 1, "Ctrl-C must leave a checkpoint"
    step = checkpoint.load(ckpts[0])["step"]
    assert 1 <= step < 24, step
    assert not (out / "runs.jsonl").exists() or load_records(out / "runs.jsonl") == []

    code, stdout, stderr = cli_main([*args, "--resume"])
    assert code == 0, stderr
    rows = load_records(out / "runs.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "done", rows
    assert rows[0]["metrics"]["tokens"] == 24 * 2 * 16 and rows[0]["metrics"]["steps"] == 24
    assert "row appended" in stdout
    steps = [int(r["step"]) for r in curve_reader(rows[0]["curve"])]
    assert steps == sorted(set(steps)) and steps[-1] == 24 and step in steps


# --- 6. a NaN stops the run: "failed" row, last good checkpoint kept ---------------------------------
def test_nan_weights_stop_the_run_and_keep_the_last_good_checkpoint(tiny_tcfg, tmp_path, capture_model):
    """The weights go NaN after step 6's update (a curve point, not a checkpoint): the next loss is
    NaN, the run is recorded as failed at step 6, and the step-4 checkpoint is left as it was."""
    cfg = get("MoE-Mamba_25M@tiny")
    tcfg = tiny_tcfg(steps=12, micro_batch=None, log_every=2, eval_every_tokens=4 * 4 * 32)
    out = tmp_path / "nan"
    ckpt = run_dir(out, cfg, tcfg) / "ckpt.pt"
    seen = {}

    def on_progress(p):
        if p.step == 6:
            seen["ckpt"] = ckpt.read_bytes()
            with torch.no_grad():
                next(capture_model["model"].parameters()).fill_(float("nan"))

    with pytest.raises(TrainingFailed, match="step 6;"):
        train(cfg, tcfg, out=out, device="cpu", on_progress=on_progress, ckpt_every_steps=4)
    rows = load_records(out / "runs.jsonl")
    assert len(rows) == 1, rows
    rec = rows[0]
    assert rec["status"] == "failed" and "non-finite loss" in rec["reason"]
    assert rec["metrics"]["steps"] == 6 and rec["metrics"]["tokens"] == 6 * 4 * 32
    assert json.loads((ckpt.parent / "result.json").read_text())["status"] == "failed"
    assert ckpt.read_bytes() == seen["ckpt"], "the failing run overwrote the last good checkpoint"
    state = checkpoint.load(ckpt)
    assert state["step"] == 4 and non_finite(state["model"]) == [] and non_finite(state["optimizer"]) == []

    # the kept checkpoint is usable: resuming it finishes the run
    row = train(cfg, tcfg, out=out, device="cpu", resume=True)
    assert row["status"] == "done" and row["metrics"]["steps"] == 12 and math.isfinite(row["metrics"]["val_loss"])
    assert [r["status"] for r in load_records(out / "runs.jsonl")] == ["failed", "done"]


def test_nan_gradient_never_reaches_the_kept_checkpoint(tiny_tcfg, tmp_path, capture_model):
    """The realistic NaN: step 10's loss is finite but its gradient is not (an overflow in backward),
    so the update makes every weight NaN and only step 11's loss shows it. The checkpoint left behind
    must still be a good one (step 5's), not step 10's NaN weights."""
    cfg = get("MoE-Mamba_25M@tiny")
    tcfg = tiny_tcfg(steps=12, micro_batch=None, log_every=1, eval_every_tokens=4 * 4 * 32)
    out = tmp_path / "nangrad"
    ckpt = run_dir(out, cfg, tcfg) / "ckpt.pt"
    state = {"nan": False}
    capture_model["on_build"].append(
        lambda model: next(model.parameters()).register_hook(lambda g: g * float("nan") if state["nan"] else g))

    def on_progress(p):
        if p.step == 9:
            state["nan"] = True                          # the backward of step 10 gives a NaN gradient

    with pytest.raises(TrainingFailed):
        train(cfg, tcfg, out=out, device="cpu", on_progress=on_progress, ckpt_every_steps=5)
    rows = load_records(out / "runs.jsonl")
    assert len(rows) == 1 and rows[0]["status"] == "failed", rows
    kept = checkpoint.load(ckpt)
    bad = non_finite(kept["model"]) + non_finite(kept["optimizer"])
    assert bad == [], f"the checkpoint kept after the failure (step {kept['step']}) holds NaN or inf in " \
                      f"{len(bad)} tensors ({', '.join(bad[:3])}, ...): it is not a good checkpoint"
    assert kept["step"] == 5
