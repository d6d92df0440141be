"""Multi-process training on CPU: gloo, 2 ranks on 127.0.0.1, MoE-Mamba_25M@tiny, fp32, batch 4, ctx 32.

The equivalence under test (moebench/distributed.py): world 2 x micro batch 2 x accumulation 1 trains
on exactly the windows of world 1 x micro batch 2 x accumulation 2, in micro batches of the same size
(so with the same MoE capacity, computed over a micro batch's tokens), and sums the same gradients.
So its curve, validation losses, MoE statistics and weights equal the single-process run's, and a
checkpoint resumes at either world size onto the same curve.

One module fixture trains every run once: the single-process reference and an interrupted
single-process run here; in two spawned ranks (env://, as torchrun starts them), the full run, a
run that rank 1 alone interrupts, the resumptions, a run that turns NaN on rank 1 alone and one
without micro_batch (so the micro batch changes with the world size); then the single-process
resumptions of the two-rank checkpoints. test_torchrun_cli runs the real entry point. About 30 s on
2 idle cores, 45 s on busy ones.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from moebench import checkpoint
from moebench.config import TrainConfig
from moebench.distributed import Dist, split_batch
from moebench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VARIANT = "MoE-Mamba_25M@tiny"
STEPS = 8
STOP_AT = 4          # an interrupted run's checkpoint is at this step
NAN_AT = 2           # the 2-rank NaN run's loss turns NaN in this step (1-based), on rank 1 only
TIMEOUT_S = 240      # a deadlock fails the test instead of hanging it
CURVE_SKIP = {"tok_s", "peak_mem_gib"}   # timings, not results
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there one all we can has been if more when will would who so no "
         "river mountain engine quiet seventeen copper lantern bright harbour theorem").split()


def tcfg_for(data_dir: str, **overrides) -> TrainConfig:
    kw = dict(tokens=STEPS * 4 * 32, batch=4, micro_batch=2, ctx=32, lr=3e-3, lr_source="user",
              warmup_frac=0.1, ema_alpha=0.1, dtype="fp32", eval_every_tokens=2 * 4 * 32, eval_batches=2,
              log_every=1, data_dir=data_dir)
    kw.update(overrides)
    return TrainConfig(**kw)


# ---- ways to disturb one rank --------------------------------------------------------------------


@contextmanager
def signal_at(step: int, only_rank: int | None = None):
    """SIGINT to this process while it trains step `step` (1-based), as a Ctrl-C would (only on
    `only_rank` when given): the trainer's lr_at() is called once per step on every rank."""
    import moebench.train as train_mod
    lr_at = train_mod.lr_at

    def patched(s, *args):
        if s == step - 1 and (only_rank is None or int(os.environ.get("RANK", 0)) == only_rank):
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(s, *args)
    train_mod.lr_at = patched
    try:
        yield
    finally:
        train_mod.lr_at = lr_at


@contextmanager
def nan_at(step: int, only_rank: int):
    """The training loss of micro batch `step` (1-based; one per step at world 2) is NaN on `only_rank`."""
    import moebench.train as train_mod
    build = train_mod.build_model

    def patched(*args, **kwargs):
        model = build(*args, **kwargs)
        if int(os.environ.get("RANK", 0)) == only_rank:
            calls = [0]

            def hook(module, inputs, out):
                if not module.training:
                    return out
                calls[0] += 1
                return replace(out, loss=out.loss * float("nan")) if calls[0] == step else out
            model.register_forward_hook(hook)
        return model
    train_mod.build_model = patched
    try:
        yield
    finally:
        train_mod.build_model = build


# ---- the runs ------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, data_dir: str, root: str):
    """One of 2 ranks, as torchrun would start it (env://); runs the 2-rank scenarios in order."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moebench.registry import get
    from moebench.train import TrainingFailed, train
    cfg, tcfg, root = get(VARIANT), tcfg_for(data_dir), Path(root)
    events = {}
    train(cfg, tcfg, root / "w2", device="cpu")
    try:
        with signal_at(STOP_AT, only_rank=1):       # a signal on rank 1 alone stops both
            train(cfg, tcfg, root / "w2_stop", device="cpu")
    except KeyboardInterrupt:
        events["w2_stop"] = "interrupted"
    if rank == 0:
        shutil.copytree(root / "w2_stop", root / "w2_stop_for_w1")
        shutil.copy(ckpt_path(root / "w2_stop"), root / "w2_stop.pt")   # as it was before resuming
    dist.barrier()
    train(cfg, tcfg, root / "w2_stop", resume=True, device="cpu")
    train(cfg, tcfg, root / "w1_stop", resume=True, device="cpu")     # a 1-rank checkpoint, at 2 ranks
    try:
        with nan_at(NAN_AT, only_rank=1):
            train(cfg, tcfg, root / "w2_nan", device="cpu")
    except TrainingFailed:
        events["w2_nan"] = "failed"
    try:                                            # micro_batch unset: 2 a rank here, 4 in one process
        with signal_at(STOP_AT, only_rank=0):
            train(cfg, replace(tcfg, micro_batch=None), root / "w2_implied", device="cpu")
    except KeyboardInterrupt:
        events["w2_implied"] = "interrupted"
    # accumulation under DDP (2 micro batches a rank; 4 in one process): same run
    train(cfg, replace(tcfg, micro_batch=1), root / "w2_accum", device="cpu")
    events["bucket_views"] = _grads_stay_bucket_views(rank)
    (root / f"events{rank}.json").write_text(json.dumps(events))


def _grads_stay_bucket_views(rank: int) -> list[bool]:
    """With the trainer's zero_grad, are the gradients views of DDP's buckets after the no_sync
    micro batch of each step? (Fresh tensors there would be a second copy of every gradient.)"""
    from moebench.distributed import Dist, grad_sync
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    dist = Dist(rank=rank, world=2)
    ddp, opt = dist.wrap(model), torch.optim.AdamW(model.parameters())
    seen = []
    for step in range(3):
        for i in range(2):
            with grad_sync(ddp, last=i == 1):
                ddp(torch.randn(4, 8)).sum().backward()
            if i == 0 and step > 0:
                seen.append(all(p.grad._base is not None for p in model.parameters()))
        opt.step()
        dist.zero_grad(opt, accum=2)
    torch.distributed.barrier()     # neither rank exits (destroying the group) while the other is in a collective
    return seen


def _spawn_world2(data_dir: str, root: Path):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(port, data_dir, str(root)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):             # raises when a rank fails (and ends the other)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-rank runs still going after {TIMEOUT_S} s: deadlock?")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """About 9K train + 1K val tokens of English words in 20 one-document .txt files."""
    from moebench.data import prepare
    root = tmp_path_factory.mktemp("dist_data")
    rng = np.random.default_rng(0)
    (root / "txt").mkdir()
    for i in range(20):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 450)]
        (root / "txt" / f"doc{i:02d}.txt").write_text(f"Document {i}. " + " ".join(words) + ".\n")
    return prepare(input=root / "txt", out=root / "prepared", val_frac=0.1, progress=False)["dir"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Path:
    from moebench.registry import get
    from moebench.train import train
    root = tmp_path_factory.mktemp("dist_runs")
    cfg, tcfg = get(VARIANT), tcfg_for(data_dir)
    old = torch.get_num_threads()
    torch.set_num_threads(1)                   # as the ranks: the same kernels, the same sums
    try:
        train(cfg, tcfg, root / "w1", device="cpu")
        with pytest.raises(KeyboardInterrupt), signal_at(STOP_AT):
            train(cfg, tcfg, root / "w1_stop", device="cpu")
        shutil.copy(ckpt_path(root / "w1_stop"), root / "w1_stop.pt")
        train(cfg, replace(tcfg, micro_batch=1), root / "w1_accum", device="cpu")
        _spawn_world2(data_dir, root)
        train(cfg, tcfg, root / "w2_stop_for_w1", resume=True, device="cpu")   # a 2-rank checkpoint, in 1 process
        shutil.copy(ckpt_path(root / "w2_implied"), root / "w2_implied.pt")
        with pytest.warns(UserWarning, match="micro batches of 4 sequences, the checkpoint's were 2"):
            train(cfg, replace(tcfg, micro_batch=None), root / "w2_implied", resume=True, device="cpu")
    finally:
        torch.set_num_threads(old)
    return root


def ckpt_path(out: Path) -> Path:
    (path,) = out.glob("runs/*/ckpt.pt")
    return path


def ckpt_of(out: Path) -> dict:
    return checkpoint.load(ckpt_path(out))


def rows_of(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_run(got: Path, want: Path, rtol: float = 1e-5, atol: float = 1e-7):
    """Curves (every point, every metric but timings) and final weights agree to rtol."""
    a, b = ckpt_of(got), ckpt_of(want)
    assert a["step"] == b["step"] == STEPS
    assert [r["step"] for r in a["curve"]] == [r["step"] for r in b["curve"]] == list(range(1, STEPS + 1))
    worst = (0.0, None)
    for ra, rb in zip(a["curve"], b["curve"]):
        assert set(ra) - CURVE_SKIP == set(rb) - CURVE_SKIP, f"step {ra['step']}: metrics differ"
        for key in set(ra) - CURVE_SKIP:
            x, y = ra[key], rb[key]
            rel = abs(x - y) / max(abs(y), 1e-12)
            worst = max(worst, (rel, f"step {ra['step']} {key}: {x!r} vs {y!r}"), key=lambda t: t[0])
    assert worst[0] <= rtol, f"curves differ: max relative difference {worst[0]:.2e} at {worst[1]}"
    assert a["model"].keys() == b["model"].keys()
    diffs = {k: (a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]}
    name = max(diffs, key=diffs.get)
    torch.testing.assert_close(a["model"], b["model"], rtol=rtol, atol=atol,
                               msg=lambda m: f"weights differ, most in {name} ({diffs[name]:.2e}): {m}")


# ---- tests ---------------------------------------------------------------------------------------


def test_micro_batch_numbering_is_independent_of_world_size():
    # world 1 x accumulation 4 = world 2 x 2 = world 4 x 1: the same micro batches in every step
    for step in range(3):
        one = list(Dist().micro_batches(step, 4))
        for world in (2, 4):
            parts = [list(Dist(r, world, r).micro_batches(step, 4 // world)) for r in range(world)]
            assert sum(parts, []) == one == list(range(4 * step, 4 * step + 4))


def test_split_batch():
    assert split_batch(64, None, 1) == (64, 1)
    assert split_batch(64, 8, 1) == (8, 8)
    assert split_batch(64, None, 8) == (8, 1)
    assert split_batch(64, 2, 8) == (2, 4)
    with pytest.raises(UserError, match="not a multiple of micro_batch 3"):
        split_batch(64, 3, 1)
    with pytest.raises(UserError, match="batch 64 does not split into micro_batch 3 x 2 ranks"):
        split_batch(64, 3, 2)
    with pytest.raises(UserError, match="batch 64 does not split into 3 equal ranks"):
        split_batch(64, None, 3)
    with pytest.raises(UserError, match="batch 2 does not split into 4 equal ranks"):
        split_batch(2, None, 4)


def test_two_ranks_equal_one_process(runs):
    assert_same_run(runs / "w2", runs / "w1")
    curve = ckpt_of(runs / "w2")["curve"]
    # capacity bites (1 slot per expert for a micro batch's 64 tokens): equal drops = equal capacity
    assert all(r["dropped_frac"] > 0.1 for r in curve)
    assert sum(r.get("val_loss") is not None for r in curve) == STEPS // 2
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.5, "the loss should fall"


def test_accumulation_under_ddp_equals_one_process_and_keeps_bucket_views(runs):
    # (g1 + g2) + (g3 + g4) over 2 ranks against ((g1 + g2) + g3) + g4 in one process: the same sum in
    # another order, so rounding; Adam's normalisation magnifies it in weights whose gradient is ~0
    assert_same_run(runs / "w2_accum", runs / "w1_accum", rtol=1e-4, atol=1e-5)
    for rank in (0, 1):
        assert json.loads((runs / f"events{rank}.json").read_text())["bucket_views"] == [True, True]


def test_rank0_alone_writes_rank_independent_state(runs):
    (row,) = rows_of(runs / "w2")
    assert row["status"] == "done" and row["train"]["world"] == 2 and row["train"]["accum"] == 1
    assert rows_of(runs / "w1")[0]["train"]["world"] == 1
    st = ckpt_of(runs / "w2")
    assert st["world"] == 2 and not any(k.startswith("module.") for k in st["model"])
    assert st["sampler"]["step"] == STEPS * 2 and st["sampler"]["batch"] == 2   # global micro batches
    assert sorted(p.name for p in (runs / "w2").glob("runs/*/*")) == ["checkpoint.json", "ckpt.pt", "curve.csv",
                                                                      "result.json", "train.lock"]


def test_signal_on_one_rank_stops_both(runs):
    for rank in (0, 1):
        assert json.loads((runs / f"events{rank}.json").read_text())["w2_stop"] == "interrupted"
    for world in (2, 1):
        st = checkpoint.load(runs / f"w{world}_stop.pt")    # as saved at the interruption
        assert (st["step"], st["sampler"]["step"], st["world"]) == (STOP_AT, STOP_AT * 2, world)
        assert [r["step"] for r in st["curve"]] == list(range(1, STOP_AT + 1))


@pytest.mark.parametrize("ckpt_world, resume_world", [(2, 2), (2, 1), (1, 2)])
def test_resume_at_either_world_size(runs, ckpt_world, resume_world):
    out = {(2, 2): "w2_stop", (2, 1): "w2_stop_for_w1", (1, 2): "w1_stop"}[ckpt_world, resume_world]
    assert_same_run(runs / out, runs / "w1")
    (row,) = rows_of(runs / out)
    assert row["status"] == "done" and row["train"]["world"] == resume_world


def test_resume_when_the_micro_batch_changes_with_the_world_size(runs):
    # micro_batch unset: micro batches of 2 at world 2, of 4 in one process. Model, optimizer and
    # step resume exactly; the windows from there on are other ones (documented, and warned about)
    for rank in (0, 1):                          # this time rank 0 got the signal
        assert json.loads((runs / f"events{rank}.json").read_text())["w2_implied"] == "interrupted"
    stopped, done = checkpoint.load(runs / "w2_implied.pt"), ckpt_of(runs / "w2_implied")
    assert stopped["step"] == STOP_AT and done["step"] == STEPS
    assert done["curve"][:STOP_AT] == stopped["curve"]
    assert all(np.isfinite(r["loss"]) for r in done["curve"])
    (row,) = rows_of(runs / "w2_implied")
    assert row["status"] == "done" and row["train"]["world"] == 1 and row["train"]["accum"] == 1


def test_device_under_torchrun(monkeypatch):
    from moebench.env import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")           # one process: as before
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(UserError, match="each rank uses cuda:LOCAL_RANK"):
        resolve_device("cuda:0", local_rank=1)
    with pytest.raises(UserError, match="only 2 GPUs are visible"):
        resolve_device("auto", local_rank=2)


def test_nan_on_one_rank_fails_both(runs):
    for rank in (0, 1):
        assert json.loads((runs / f"events{rank}.json").read_text())["w2_nan"] == "failed"
    (row,) = rows_of(runs / "w2_nan")
    assert row["status"] == "failed" and f"at step {NAN_AT - 1}" in row["reason"]


def test_torchrun_cli(tmp_path, data_dir):
    """The real entry point: torchrun --standalone --nproc_per_node 2 -m moebench train, 2 steps."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", COLUMNS="200")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "moebench", "train", VARIANT, "--tokens", "256", "--batch", "4", "--ctx", "32",
           "--device", "cpu", "--data", data_dir, "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = rows_of(tmp_path)
    assert row["status"] == "done" and row["metrics"]["steps"] == 2
    assert row["train"]["world"] == 2 and row["train"]["micro_batch"] is None and row["train"]["accum"] == 1
    assert p.stdout.count("row appended") == 1                  # rank 0 alone reports
