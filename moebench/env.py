"""What goes into every result row's "env": versions, device, git sha + dirty flag."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

from moebench.errors import UserError

# dense bf16 tensor-core peak, FLOP/s, from the vendors' datasheets (no sparsity)
PEAK_BF16_FLOPS = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


# memory bandwidth, bytes/s, from the vendors' datasheets
PEAK_HBM_BYTES_S = {
    "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
    "H200": 4.8e12, "GH200": 4.0e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12,
    "L40S": 0.864e12, "A10G": 0.6e12,
}


def _datasheet(table: dict[str, float], device_name: str | None) -> float | None:
    # the longest matching key wins, so "H100 PCIe" is not read as "H100"
    if not device_name:
        return None
    return next((table[k] for k in sorted(table, key=len, reverse=True) if k in device_name), None)


def peak_flops(device_name: str | None) -> float | None:
    """Peak bf16 FLOP/s of a known GPU; None when unknown (MFU is then null, never a guess)."""
    return _datasheet(PEAK_BF16_FLOPS, device_name)


def datasheet_bandwidth(device_name: str | None) -> float | None:
    """Datasheet memory bandwidth (bytes/s) of a known GPU; None when unknown."""
    return _datasheet(PEAK_HBM_BYTES_S, device_name)


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The processor's name where Linux says it (/proc/cpuinfo), else the architecture: 'AMD EPYC, x86_64'."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    arch = platform.machine() or platform.processor()
    return f"{name}, {arch}" if name else arch


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@lru_cache(maxsize=1)
def git_info() -> dict:
    if os.environ.get("MOEBENCH_GIT_SHA"):
        # a copy of the working tree whose .git is missing or stale (the lent GPU machine): the caller passes them
        return {"git_sha": os.environ["MOEBENCH_GIT_SHA"],
                "git_dirty": os.environ.get("MOEBENCH_GIT_DIRTY", "").lower() in ("1", "true")}
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


def mamba_ssm_version() -> str | None:
    """The installed mamba-ssm's version (package metadata: nothing is imported), or None."""
    try:
        return importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(device: torch.device | str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = device_name(device)
    return {
        **git_info(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "mamba_ssm": mamba_ssm_version(),
        "device": device.type,
        "gpu": name if device.type == "cuda" else None,
        "device_name": name,
        "n_gpu": torch.cuda.device_count() if device.type == "cuda" else 0,
        "peak_bf16_flops": peak_flops(name) if device.type == "cuda" else None,
        "host": socket.gethostname(),
    }


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """auto | cpu | cuda[:N]. Under torchrun (`local_rank` given) auto and cuda mean cuda:LOCAL_RANK."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else _local_gpu(local_rank)
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu or cuda") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available here")
    if d.type == "cuda" and local_rank is not None:
        if d.index not in (None, local_rank):
            raise UserError(f"device '{device}' under torchrun: each rank uses cuda:LOCAL_RANK, "
                            f"pass --device cuda or auto")
        return _local_gpu(local_rank)
    return d


def _local_gpu(local_rank: int) -> torch.device:
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                        f"use --nproc_per_node <= the number of GPUs")
    return torch.device("cuda", local_rank)
