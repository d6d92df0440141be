"""The fused decode MoE kernels (moebench/ops/moe_decode.py) against their plain-torch reference and
against the repo's MoE layer. On a CPU they run under Triton's interpreter (set in conftest.py), so
the shapes are tiny; scripts/bench_moe_decode.py compares them with the grouped path on an H100."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moebench.models.moe import MoE
from moebench.ops import moe_decode
from moebench.ops.moe_decode import decode_experts, decode_experts_ref

pytestmark = pytest.mark.usefixtures("triton_runs")   # conftest.py: a GPU, or the interpreter on a CPU

# compiled on a GPU; on a CPU, interpreted
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def inputs(T, E, D, Fh, N, dtype, expert_T=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w1 = (torch.randn(E, D, Fh, generator=gen) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, Fh, N, generator=gen) / Fh ** 0.5).to(dtype)
    if expert_T is None:
        expert_T = torch.randint(0, E, (T,), generator=gen)
    p = torch.rand(T, generator=gen)
    return tuple(a.to(DEV) for a in (x, expert_T, p, w1, w2))


def check(got, want, dtype):
    diff = (got.float() - want.float()).abs()
    torch.testing.assert_close(got, want, **TOL[dtype],
                               msg=f"max diff {diff.max():.3g}, mean diff {diff.mean():.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("T,E,N", [(1, 4, 32), (5, 8, 48), (64, 4, 32)])
def test_matches_reference(T, E, N, activation, dtype):
    # T <= 5: some experts get no token; T=64 on 4 experts: one gets 25 (two BLOCK_M=16 row blocks)
    x, expert_T, p, w1, w2 = inputs(T, E, 32, 64, N, dtype, seed=T + E)
    y = decode_experts(x, expert_T, p, w1, w2, activation)
    assert y.shape == (T, N) and y.dtype == dtype
    check(y, decode_experts_ref(x, expert_T, p, w1, w2, activation), dtype)


def test_one_expert_takes_every_token():
    """40 tokens on one expert: three BLOCK_M=16 row blocks, the last one partial."""
    expert_T = torch.full((40,), 2)
    x, expert_T, p, w1, w2 = inputs(40, 4, 32, 64, 32, torch.float32, expert_T)
    check(decode_experts(x, expert_T, p, w1, w2, "gelu"), decode_experts_ref(x, expert_T, p, w1, w2, "gelu"),
          torch.float32)


def test_unused_experts_are_never_read():
    """NaN weights of experts without tokens must not reach the output: never loaded, not multiplied by 0."""
    expert_T = torch.tensor([1, 3, 1, 1, 3, 3, 1])
    x, expert_T, p, w1, w2 = inputs(7, 5, 32, 64, 32, torch.float32, expert_T)
    want = decode_experts_ref(x, expert_T, p, w1, w2, "relu")
    for e in (0, 2, 4):
        w1[e], w2[e] = float("nan"), float("nan")
    y = decode_experts(x, expert_T, p, w1, w2, "relu")
    assert torch.isfinite(y).all()
    check(y, want, torch.float32)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_matches_the_moe_layer(activation):
    """Router as MoE.forward computes it (fp32 softmax, top-1 by max, raw probability), then the
    kernels must give the layer's own output (eval mode: dropless)."""
    T, D, Fh, N, E = 24, 32, 64, 48, 8
    torch.manual_seed(0)
    moe = MoE(D, Fh, N, E, top_k=1, capacity_factor=None, activation=activation, impl="loop").eval().to(DEV)
    x = torch.randn(T, D).to(DEV)
    with torch.no_grad():
        want, _ = moe(x, need_aux=False)
        p_T, expert_T = F.softmax(x @ moe.router_DE, dim=-1, dtype=torch.float32).max(-1)
        y = decode_experts(x, expert_T, p_T, moe.w1_EDF, moe.w2_EFD, activation)
    assert expert_T.unique().numel() > 1
    check(y, want, torch.float32)


def test_rejects_what_it_cannot_do():
    x, expert_T, p, w1, w2 = inputs(4, 4, 32, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="no_grad"):
        decode_experts(x, expert_T, p, w1.requires_grad_(), w2, "relu")
    w1.requires_grad_(False)
    with pytest.raises(ValueError, match="tokens"):
        decode_experts(x.repeat(65, 1), expert_T.repeat(65), p.repeat(65), w1, w2, "relu")
    with pytest.raises(ValueError, match="activation"):
        decode_experts(x, expert_T, p, w1, w2, "silu")
    with pytest.raises(ValueError, match="contiguous"):
        decode_experts(x, expert_T, p, w1.transpose(1, 2).contiguous().transpose(1, 2), w2, "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,D", [(1, 4, 32), (37, 8, 48), (64, 32, 64)])
def test_router_equals_softmax_max(T, E, D, dtype):
    gen = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=gen).to(dtype).to(DEV)
    r = (torch.randn(D, E, generator=gen) / D ** 0.5).to(dtype).to(DEV)
    p, e = moe_decode.decode_router(x, r)
    p_ref, e_ref = moe_decode.decode_router_ref(x, r)
    assert p.dtype == torch.float32 and e.dtype == torch.int64
    # bf16: one rounding of an fp32 sum against the CPU's blocked bf16 matmul, a logit's last bit apart
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(p, p_ref, **tol)
    # the expert agrees wherever the top two probabilities are apart by more than that
    top2 = torch.softmax(x @ r, -1, dtype=torch.float32).topk(2, -1).values
    apart = (top2[:, 0] - top2[:, 1]) > 2 * tol["rtol"] * top2[:, 0]
    assert apart.any() and torch.equal(e[apart], e_ref[apart])


def test_router_tie_takes_the_first_expert():
    x = torch.ones(2, 16, device=DEV)
    r = torch.zeros(16, 4, device=DEV)
    r[:, 1] = r[:, 3] = 1.0                      # experts 1 and 3 tie
    p, e = moe_decode.decode_router(x, r)
    assert e.tolist() == [1, 1]


def test_decode_path_says_when_the_kernels_apply():
    moe = MoE(16, 32, 16, 4, top_k=1, capacity_factor=1.0, impl="grouped")
    cpu = torch.device("cpu")
    assert moe.decode_path(cpu) == "grouped"             # no fused routing on a CPU by default
    moe.fused_routing = True
    assert moe.decode_path(cpu) == "triton"
    moe.decode_kernels = False
    assert moe.decode_path(cpu) == "grouped"
    moe.decode_kernels = None
    moe.eval_capacity_factor = 1.0                       # a capacity at eval: the kernels keep everything
    assert moe.decode_path(cpu) == "grouped"
    moe.eval_capacity_factor = None
    moe.impl = "loop"
    assert moe.decode_path(cpu) == "loop"
    assert MoE(16, 32, 16, 4, top_k=2, impl="grouped").decode_path(cpu) == "grouped"
