"""The fused Triton gathers of the grouped MoE path (moebench/ops/routing.py) against the plain-torch
gathers they replace, forward and backward. On a CPU they run under Triton's interpreter (set in
conftest.py); tests/test_gpu_moe.py runs them compiled, in bf16, on CUDA."""
from __future__ import annotations

import pytest
import torch

from moebench.models.moe import MoE
from moebench.ops import routing

pytestmark = pytest.mark.usefixtures("triton_runs")   # conftest.py: a GPU, or the interpreter on a CPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    # CPU (interpreter) in CI; the compiled kernels on a GPU machine
    with torch.device(DEV):
        yield


CASES = [  # (T, E, K, capacity_factor, masked)
    (96, 4, 1, 1.0, False),
    (96, 4, 2, 1.0, True),
    (80, 8, 2, None, False),
    (64, 4, 1, 0.5, True),
    (50, 3, 3, 1.25, False),
]


def run(moe: MoE, fused: bool, x_TD, valid_T, g_TD):
    moe.fused = fused
    moe.zero_grad(set_to_none=True)
    x = x_TD.clone().requires_grad_(True)
    y, aux = moe(x, valid_T)
    torch.autograd.backward([y, aux.lb_loss], [g_TD, torch.ones_like(aux.lb_loss)])
    return {"y": y.detach(), "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in moe.named_parameters()},
            "dropped": aux.dropped_frac, "counts": aux.tokens_per_expert}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-cf{}{}".format(*c[:4], "-mask" if c[4] else ""))
def test_fused_gathers_match_torch(case):
    T, E, K, cf, masked = case
    D, FH = 16, 24
    for seed in range(2):                      # fresh inputs: two draws per case
        torch.manual_seed(seed)
        moe = MoE(D, FH, D, E, top_k=K, capacity_factor=cf, impl="grouped")
        x, g = torch.randn(T, D), torch.randn(T, D)
        valid = torch.rand(T) > 0.3 if masked else None
        ref, fused = run(moe, False, x, valid, g), run(moe, True, x, valid, g)
        for name, want in ref.items():
            torch.testing.assert_close(fused[name], want, rtol=1e-5, atol=1e-6, msg=name)
        assert ref["x.grad"].abs().sum() > 0 and ref["router_DE.grad"].abs().sum() > 0


def test_dropped_rows_are_never_read():
    """Buffer rows of dropped assignments hold grouped_mm's uninitialised memory: NaN there must
    not reach the output or any gradient (masked loads, not multiplication by 0)."""
    T, D, K = 40, 8, 2
    torch.manual_seed(0)
    row_N = torch.randperm(T * K)
    keep_N = torch.rand(T * K) > 0.4
    n_S = torch.empty_like(row_N).scatter_(0, row_N, torch.arange(T * K))
    src_SD = torch.randn(T * K, D)
    src_SD[row_N[~keep_N]] = float("nan")
    p_N = torch.rand(T * K)
    y = routing.gather_sum(src_SD, p_N, row_N, keep_N, T, True)
    want = sum(torch.where(keep_N[k * T:(k + 1) * T, None], src_SD[row_N[k * T:(k + 1) * T]] * p_N[k * T:(k + 1) * T, None], 0)
               for k in range(K))
    torch.testing.assert_close(y, want)
    g_TD = torch.randn(T, D)
    g_out, g_p = routing.combine_bwd(g_TD, src_SD, p_N, n_S, keep_N, True, True)
    assert torch.isfinite(g_out).all() and torch.isfinite(g_p).all()
    t_S = n_S % T
    keep_S = keep_N[n_S]
    torch.testing.assert_close(g_out, torch.where(keep_S[:, None], g_TD[t_S] * p_N[n_S, None], 0))
    dot_S = torch.where(keep_S, (g_TD[t_S] * torch.nan_to_num(src_SD)).sum(-1), 0)
    torch.testing.assert_close(g_p[n_S], dot_S)
    g_only, none = routing.combine_bwd(g_TD, src_SD, p_N, n_S, keep_N, True, False)
    assert none.numel() == 0 and torch.equal(g_only, g_out)


@pytest.mark.parametrize("T,K,E,cap,masked", [
    (96, 1, 4, 20, False), (96, 2, 4, 30, True), (80, 2, 8, None, False), (700, 1, 32, "tensor", True),
    (600, 3, 5, 100, False), (300, 1, 7, 0, True),
    (2600, 2, 8, 500, True), (9000, 2, 8, 2000, True)])   # 256-wide chunks; 71 of them, scanned 64 at a time
def test_fused_plan_is_the_torch_plan_bitwise(T, K, E, cap, masked):
    gen = torch.Generator().manual_seed(T + K + E)
    top_i = torch.stack([torch.randperm(E, generator=gen, device="cpu")[:K] for _ in range(T)]).to(DEV)
    valid = (torch.rand(T, generator=gen, device="cpu") > 0.3).to(DEV) if masked else None
    if cap == "tensor":
        cap = torch.floor(0.9 * valid.sum().double() * K / E).long()
    ref, fused = routing.plan_grouped(top_i, valid, E, cap, fused=False), routing.plan_grouped(top_i, valid, E, cap, fused=True)
    for name, a, b in zip(ref._fields, ref, fused):
        assert a.dtype == b.dtype and torch.equal(a, b), name
