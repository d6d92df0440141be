"""Mamba-2's fast path on a GPU against the reference (tests/test_mamba2.py holds the reference to a
naive recurrence): mamba-ssm's SSD, gated-norm and state-update kernels, forward and backward, fp32
and bf16; the mixer under autocast; mamba_ssm.Mamba2 loads our state dict and gives our output."""
from __future__ import annotations

import pytest
import torch

from moebench.impl import resolve_mixer
from moebench.models.mamba2 import Mamba2
from moebench.ops.ssd import HAS_SSD_KERNELS, SSD_IMPORT_ERROR, rmsnorm_gated, ssd, ssd_step

from conftest import check, rel

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if not HAS_SSD_KERNELS:
    pytest.skip(f"mamba-ssm's Mamba-2 kernels unavailable: {SSD_IMPORT_ERROR}", allow_module_level=True)

CUDA = torch.device("cuda")
# the Triton SSD kernels take their fp32 dot products in TF32 (tl.dot's default): ~1.5e-3 relative on an
# H100 at every length, where the reference is true fp32
TOL = {"fp32": 5e-3, "bf16": 2e-2}


def test_resolve_on_cuda():
    assert resolve_mixer("auto", CUDA, 4, mamba2=True) == "fast"


@pytest.mark.parametrize("L", [1, 64, 300, 2048])
def test_ssd_kernel_vs_ref(L):
    g = torch.Generator(device=CUDA).manual_seed(L)
    r = lambda *s: torch.randn(*s, device=CUDA, generator=g)  # noqa: E731
    H, P, G, N = 8, 32, 2, 64
    t = dict(x=r(2, L, H, P), dt=r(2, L, H) - 1, A=-torch.exp(r(H) * 0.5 + 0.5), B=r(2, L, G, N), C=r(2, L, G, N),
             D=r(H), dt_bias=r(H) * 0.3)
    t = {k: v.requires_grad_() for k, v in t.items()}
    g_out = torch.randn(2, L, H, P, device=CUDA)
    res = {}
    for impl in ("fast", "ref"):
        y, h = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], return_final_state=True,
                   chunk_size=256, impl=impl)
        res[impl] = (y, h, *torch.autograd.grad((y * g_out).sum(), list(t.values())))
    names = ["y", "final_state"] + [f"d{k}" for k in t]
    check(f"ssd fp32 L={L}", {n: rel(a, b) for n, a, b in zip(names, res["fast"], res["ref"])}, TOL["fp32"])


def test_norm_and_step_kernels_vs_ref():
    g = torch.Generator(device=CUDA).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=CUDA, generator=g)  # noqa: E731
    y, z, w = r(64, 256), r(64, 256), r(256)
    errors = {"norm": rel(rmsnorm_gated(y, z, w, 1e-5, 128, impl="fast"), rmsnorm_gated(y, z, w, 1e-5, 128, impl="ref"))}
    H, P, G, N = 8, 32, 2, 64
    state0, x, dt = r(3, H, P, N), r(3, H, P), r(3, H) - 1
    A, B, C, D, bias = -torch.exp(r(H) * 0.5), r(3, G, N), r(3, G, N), r(H), r(H) * 0.3
    out = {}
    for impl in ("fast", "ref"):
        st = state0.clone()
        out[impl] = (ssd_step(st, x, dt, A, B, C, D, bias, impl=impl), st)
    errors |= {"step y": rel(out["fast"][0], out["ref"][0]), "step state": rel(out["fast"][1], out["ref"][1])}
    check("gated norm, state update fp32", errors, TOL["fp32"])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_mixer_fast_vs_ref(autocast):
    torch.manual_seed(0)
    m = Mamba2(256, d_state=64, headdim=32, ngroups=2, device=CUDA)
    x = torch.randn(2, 300, 256, device=CUDA)
    g_out = torch.randn(2, 300, 256, device=CUDA)
    res = {}
    for impl in ("fast", "ref"):
        m.impl = impl
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y, _ = m(xi)
        (y.float() * g_out).sum().backward()
        res[impl] = {"y": y.float(), "dx": xi.grad} | {f"d{k}": p.grad.clone() for k, p in m.named_parameters()}
    check(f"Mamba2 mixer {'bf16' if autocast else 'fp32'}", {k: rel(res["fast"][k], res["ref"][k]) for k in res["ref"]},
          TOL["bf16" if autocast else "fp32"])


def test_mamba_ssm_mamba2_loads_our_state_dict():
    from mamba_ssm import Mamba2 as Reference
    torch.manual_seed(0)
    ours = Mamba2(256, d_state=64, headdim=32, ngroups=2, impl="fast", device=CUDA)
    theirs = Reference(d_model=256, d_state=64, d_conv=4, expand=2, headdim=32, ngroups=2, device=CUDA)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 200, 256, device=CUDA)
    with torch.no_grad():
        check("mamba_ssm.Mamba2 vs ours", {"y": rel(theirs(x), ours(x)[0])}, TOL["fp32"])
