"""The decode kernels compile for an H100 (sm_90) on this CPU machine: scripts/check_sm90.py, in a
subprocess (Triton must be imported without the interpreter the other tests switch on)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def test_decode_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "check_sm90.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "compiled for sm_90" in out.stdout
    for kernel in ("_in_conv_kernel", "_ssm_kernel", "_out_kernel", "_norm_router_kernel", "_expert_kernel",
                   "_combine_kernel"):
        assert kernel in out.stdout, f"{kernel} was not compiled"
