"""The grouped MoE path against the per-expert loop reference on CPU (forward and backward, valid
mask, autocast, static shapes, one compiled graph), the expert op against its reference, and the
routing plan's layout."""
from __future__ import annotations

import pytest
import torch

import moebench.models.moe as moe_mod
from moebench.models.moe import MoEAux
from moebench.ops.experts import HAS_GROUPED_MM, experts_grouped, experts_loop_ref
from moebench.ops.routing import plan_grouped
from test_moe import D, DO, FH, IMPLS, TOL, assert_close, make_moe, run   # tests/ is on sys.path (prepend mode)


# ---- grouped == loop -------------------------------------------------------------------------------

CASES = [  # (T, E, K, capacity_factor, masked, dtype)
    (64, 8, 1, 1.0, False, torch.float32),
    (64, 8, 2, 1.25, False, torch.float32),
    (96, 4, 1, 0.25, False, torch.float32),        # heavy dropping
    (96, 4, 2, 0.25, False, torch.float32),
    (6, 16, 1, None, False, torch.float32),        # empty experts
    (6, 16, 2, 2.0, False, torch.float32),         # empty experts and capacity 1
    (64, 8, 2, 1.0, True, torch.float32),          # valid mask
    (64, 8, 1, 0.5, True, torch.float32),
    (64, 8, 2, None, True, torch.float32),
    (64, 8, 2, 1.0, False, torch.bfloat16),
    (64, 8, 1, 0.5, True, torch.bfloat16),
]


def _case_id(c):
    T, E, K, cf, masked, dt = c
    return f"T{T}-E{E}-k{K}-cf{cf}{'-mask' if masked else ''}-{str(dt)[6:]}"


def _compare_impls(case, seed=0):
    T, E, K, cf, masked, dtype = case
    moe = make_moe(E, K, cf, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(T, D, generator=gen).to(dtype)
    valid = torch.rand(T, generator=gen) > 0.3 if masked else None
    y_g, aux_g, gr_g = run(moe, "grouped", x, valid)
    y_l, aux_l, gr_l = run(moe, "loop", x, valid)
    assert moe.impl == "loop"
    tol = TOL[dtype]
    assert_close("y", y_g, y_l, **tol)
    assert torch.isfinite(y_g).all()
    for name in gr_l:
        assert torch.isfinite(gr_g[name]).all(), f"grad {name} not finite"
        assert_close(f"grad {name}", gr_g[name], gr_l[name], **tol)
    for name in MoEAux._fields:
        assert_close(f"aux.{name}", getattr(aux_g, name), getattr(aux_l, name), atol=1e-6, rtol=1e-6)
    if valid is not None:
        assert (y_g[~valid] == 0).all() and (gr_g["x"][~valid] == 0).all()


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grouped_matches_loop(case):
    _compare_impls(case)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[6]], ids=_case_id)
def test_grouped_ignores_garbage_rows(case, monkeypatch):
    """grouped_mm leaves rows after offs[-1] uninitialised, in the output and in the input gradient;
    the MoE must select them away, so poisoning them with NaN changes nothing."""
    real = moe_mod.experts_grouped

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, end, poison_fwd):
            ctx.end, ctx.poison_fwd = end, poison_fwd
            t = t.clone()
            if poison_fwd:
                t[end:] = float("nan")
            return t

        @staticmethod
        def backward(ctx, g):
            g = g.clone()
            if not ctx.poison_fwd:
                g[ctx.end:] = float("nan")
            return g, None, None

    def poisoned(x_SD, w1, w2, offs, act):
        end = int(offs[-1])
        out = real(Poison.apply(x_SD, end, False), w1, w2, offs, act)
        return Poison.apply(out, end, True)

    monkeypatch.setattr(moe_mod, "experts_grouped", poisoned)
    _compare_impls(case, seed=7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,cf", [(1, 0.5), (2, 1.0), (2, None)])
def test_valid_mask_invariance(impl, K, cf):
    """Changing the features of invalid tokens changes nothing: outputs, statistics, gradients."""
    T, E = 48, 8
    moe = make_moe(E, K, cf)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=gen)
    valid = torch.rand(T, generator=gen) > 0.4
    x2 = x.clone()
    x2[~valid] = 10 * torch.randn(int((~valid).sum()), D, generator=gen)
    y1, aux1, gr1 = run(moe, impl, x, valid)
    y2, aux2, gr2 = run(moe, impl, x2, valid)
    assert (y1[~valid] == 0).all()
    assert_close("y", y2, y1, atol=1e-6, rtol=1e-6)
    for name in MoEAux._fields:
        assert_close(f"aux.{name}", getattr(aux2, name), getattr(aux1, name), atol=1e-6, rtol=1e-6)
    for name in gr1:
        assert_close(f"grad {name}", gr2[name], gr1[name], atol=1e-6, rtol=1e-6)
    # and the invalid tokens are excluded from capacity's T: same result as dropping them beforehand
    y3, aux3, _ = run(moe, impl, x[valid])
    assert_close("y (valid only)", y1[valid], y3, atol=1e-6, rtol=1e-6)
    assert_close("lb_loss (valid only)", aux1.lb_loss, aux3.lb_loss, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("K", [1, 2])
def test_grouped_under_cpu_autocast(K):
    if not HAS_GROUPED_MM:
        pytest.skip("torch without grouped_mm")
    moe = make_moe(8, K, 1.0)
    x = torch.randn(64, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_g, _, gr_g = run(moe, "grouped", x)
        y_l, _, gr_l = run(moe, "loop", x)
    assert y_g.dtype == torch.bfloat16 and gr_g["w1_EDF"].dtype == torch.float32
    assert_close("y", y_g, y_l, **TOL[torch.bfloat16])
    for name in gr_l:
        assert_close(f"grad {name}", gr_g[name], gr_l[name], **TOL[torch.bfloat16])


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_has_static_shapes(masked):
    """Proxy for 'no host sync' on CPU: the grouped path runs forward and backward on the meta
    device, where .item(), nonzero and boolean-mask indexing fail (the loop path does fail)."""
    moe = make_moe(8, 2, 1.0).to("meta", torch.bfloat16)
    x = torch.randn(64, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    valid = torch.ones(64, dtype=torch.bool, device="meta") if masked else None
    moe.impl = "grouped"
    y, aux = moe(x, valid)
    (y.sum() + aux.lb_loss).backward()
    assert y.shape == (64, DO) and moe.w1_EDF.grad.shape == moe.w1_EDF.shape
    moe.impl = "loop"
    with pytest.raises((RuntimeError, NotImplementedError)):
        moe(x, valid)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
def test_grouped_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces the grouped path forward and backward without graph
    breaks, so the routing bookkeeping can be fused (grouped_mm's meta kernel wants bf16)."""
    moe = make_moe(8, 2, 1.0).to(torch.bfloat16)
    moe.impl = "grouped"
    x = torch.randn(64, D, dtype=torch.bfloat16)
    valid = torch.rand(64, generator=torch.Generator().manual_seed(0)) > 0.3
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    for v in (None, valid):
        y_e, aux_e, gr_e = run(moe, "grouped", x, v)
        y_c, aux_c, gr_c = run(moe, "grouped", x, v, call=compiled)
        assert_close("y", y_c, y_e, atol=0, rtol=0)
        assert_close("lb_loss", aux_c.lb_loss, aux_e.lb_loss, atol=0, rtol=0)
        for name in gr_e:
            assert_close(f"grad {name}", gr_c[name], gr_e[name], atol=0, rtol=0)


# ---- the expert op ---------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_experts_grouped_matches_ref(activation):
    gen = torch.Generator().manual_seed(0)
    E, S = 4, 20
    offs = torch.tensor([3, 3, 9, 15], dtype=torch.int32)      # expert 1 empty; rows 15.. don't-care
    expert_idx = torch.repeat_interleave(torch.arange(E), torch.diff(offs, prepend=offs.new_zeros(1)))
    x = torch.randn(S, D, generator=gen)
    w1 = torch.randn(E, D, FH, generator=gen) / D**0.5
    w2 = torch.randn(E, FH, DO, generator=gen) / FH**0.5
    leaves_g = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    leaves_r = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    y_g = experts_grouped(*leaves_g, offs, activation)
    y_r = experts_loop_ref(leaves_r[0][:15], expert_idx, *leaves_r[1:], activation)
    assert_close("y", y_g[:15], y_r, **TOL[torch.float32])
    y_g[:15].sum().backward()         # a stride-0 gradient: grouped_mm alone rejects it
    y_r.sum().backward()
    for name, a, b in zip(("x", "w1", "w2"), leaves_g, leaves_r):
        ga = a.grad[:15] if name == "x" else a.grad
        gb = b.grad[:15] if name == "x" else b.grad
        assert_close(f"grad {name}", ga, gb, **TOL[torch.float32])
    assert (leaves_g[1].grad[1] == 0).all(), "an empty expert gets a zero weight gradient"


def test_experts_loop_ref_ignores_out_of_range_indices():
    x = torch.randn(5, D)
    w1, w2 = torch.randn(2, D, FH), torch.randn(2, FH, DO)
    y = experts_loop_ref(x, torch.tensor([0, -1, 1, 2, 0]), w1, w2)
    assert (y[[1, 3]] == 0).all() and (y[[0, 2, 4]] != 0).any(-1).all()


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")
def test_grouped_rejects_unaligned_rows():
    x = torch.randn(8, 12, dtype=torch.bfloat16)           # 12 bf16 = 24 bytes
    w1, w2 = torch.randn(2, 12, 16, dtype=torch.bfloat16), torch.randn(2, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned rows.*d_in=12"):
        experts_grouped(x, w1, w2, torch.tensor([4, 8], dtype=torch.int32))


def test_plan_offsets_are_kept_counts():
    gen = torch.Generator().manual_seed(0)
    T, K, E, cap = 40, 2, 8, 6
    top_i = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    plan = plan_grouped(top_i, None, E, cap)
    counts = torch.bincount(top_i.flatten(), minlength=E)
    assert torch.equal(plan.counts_E.long(), counts)
    assert torch.equal(torch.diff(plan.offs_E, prepend=plan.offs_E.new_zeros(1)).long(), counts.clamp(max=cap))
    assert torch.equal(torch.sort(plan.n_S).values, torch.arange(T * K)), "n_S must be a permutation"
    assert torch.equal(plan.keep_N[plan.n_S], torch.arange(T * K) < plan.offs_E[-1])   # kept rows first
    # rows of expert e hold assignments to e, in priority order
    expert_S = top_i.t().reshape(-1)[plan.n_S]
    for e, (a, b) in enumerate(zip([0] + plan.offs_E[:-1].tolist(), plan.offs_E.tolist())):
        assert (expert_S[a:b] == e).all() and (torch.diff(plan.n_S[a:b]) > 0).all()
