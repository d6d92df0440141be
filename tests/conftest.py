"""Shared fixtures for the training, results and CLI tests: a small prepared corpus of real English
(the standard library's docstrings, so no test needs the shared data folder), one finished tiny
MoE-Mamba run to inspect, helpers to run moebench in a subprocess, and the fast-vs-reference error
checks of the GPU tests.

Nothing here is autouse: the other test files keep their own fixtures."""
from __future__ import annotations

import ast
import csv
import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

# Without a GPU, the Triton kernels (moebench/ops/routing.py) run under Triton's interpreter, which
# is chosen when triton decorates them, i.e. on the first import: so before any moebench import.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]

# modules of the standard library with long docstrings of plain English (a few hundred documents)
STDLIB_MODULES = ("argparse", "pathlib", "subprocess", "typing", "collections/__init__", "json/__init__",
                  "logging/__init__", "unittest/case", "email/message", "http/client", "threading", "socket",
                  "tarfile", "shutil", "tempfile", "inspect", "dataclasses", "functools", "random",
                  "statistics", "fractions", "decimal", "datetime", "calendar", "textwrap", "difflib",
                  "pickle", "csv", "configparser")


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of modules, classes and functions of the running Python's standard library."""
    lib = Path(os.__file__).parent
    docs = []
    for name in STDLIB_MODULES:
        path = lib / f"{name}.py"
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> str:
    """About 70K train + 3K val GPT-2 tokens of real English in four .txt files, prepared once."""
    from moebench.data import prepare
    root = tmp_path_factory.mktemp("corpus")
    docs = stdlib_docstrings()
    if sum(map(len, docs)) < 100_000:
        pytest.skip(f"this Python's standard library has too few docstrings ({len(docs)} documents)")
    (root / "txt").mkdir()
    for i in range(4):
        (root / "txt" / f"part{i}.txt").write_text("\n<|endoftext|>\n".join(docs[i::4]), encoding="utf-8")
    manifest = prepare(input=root / "txt", out=root / "prepared", val_frac=0.05, progress=False)
    assert manifest["splits"]["train"]["tokens"] > 50_000 and manifest["splits"]["val"]["tokens"] > 1_000
    return manifest["dir"]


@contextmanager
def torch_threads(n: int):
    # a shared 2-core box; one thread also makes in-process and subprocess runs bitwise comparable
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def triton_runs():
    """Skip unless moebench's Triton kernels can run here: triton imports, and a GPU is present or
    (on a CPU) the interpreter was chosen above."""
    import importlib.util

    import torch
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on a CPU needs TRITON_INTERPRET=1")


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_tcfg(text_data):
    """TrainConfig factory for the CPU twins: batch 4 as 2 micro-batches of 2 (so gradient
    accumulation runs), ctx 32, a curve point every 5 steps, a learning rate that moves the loss in 30 steps."""
    from moebench.config import TrainConfig

    def make(steps: int = 30, **overrides):
        kw = dict(batch=4, micro_batch=2, ctx=32, lr=3e-3, lr_source="user", warmup_frac=0.05,
                  ema_alpha=0.1, eval_batches=2, log_every=5, data_dir=text_data)
        kw.update(overrides)
        return TrainConfig(tokens=steps * kw["batch"] * kw["ctx"], **kw)
    return make


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_tcfg):
    """One uninterrupted 30-step run of MoE-Mamba_25M@tiny: (row, out folder, model cfg, train cfg, wall s)."""
    import time

    from moebench.registry import get
    from moebench.train import train
    cfg, tcfg = get("MoE-Mamba_25M@tiny"), tiny_tcfg()
    out = tmp_path_factory.mktemp("finished")
    with torch_threads(1):
        t0 = time.perf_counter()
        row = train(cfg, tcfg, out=out, device="cpu")
        wall = time.perf_counter() - t0
    return row, out, cfg, tcfg, wall


def read_curve(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="session")
def curve_reader():
    return read_curve


def subprocess_env(tmp_path) -> dict:
    """Environment of a moebench subprocess: this checkout first on the path, one torch thread,
    prepared data under tmp_path (never ./data)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MOEBENCH_DATA=str(tmp_path / "data"),
               PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


@pytest.fixture
def sub_env(tmp_path):
    return subprocess_env(tmp_path)


@pytest.fixture(scope="session")
def run_moebench():
    """`python -m moebench ARGS` in this checkout: CompletedProcess with text stdout / stderr."""
    def run(args, env, timeout=120):
        return subprocess.run([sys.executable, "-m", "moebench", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return run


def tree_digest(folder) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: equal digests = nothing written.
    Empty *.lock files (runs.jsonl.lock, a run's train.lock) are flock targets, not data: left out."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not (p.name.endswith(".lock") and p.stat().st_size == 0):
            with open(p, "rb") as f:
                out[p.relative_to(folder).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


@pytest.fixture(scope="session")
def digest():
    return tree_digest


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """Run the real entry point as `moebench ARGV` would (UserError -> one line, exit 2):
    cli_main(argv) -> (exit code, stdout, stderr)."""
    from moebench.cli import main

    def run(argv):
        monkeypatch.setattr(sys, "argv", ["moebench", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        cap = capsys.readouterr()
        return exc.value.code or 0, cap.out, cap.err
    return run


# ---- fast path against reference, on a GPU (tests/test_gpu_*.py) --------------------------------------

@pytest.fixture
def no_tf32():
    """fp32 means fp32: TF32 matmuls alone would give ~1e-3 relative errors."""
    import torch
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(label: str, errors: dict[str, float], tol: float):
    """Prints every relative error (pytest -s) and fails on any not below tol."""
    worst = max(errors, key=errors.get)
    print(f"\n[{label}] max rel err {errors[worst]:.2e} ({worst}); " +
          ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"{label}: rel err above {tol:.0e}: {bad}"
