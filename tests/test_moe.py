"""Switch MoE on CPU: routing invariants, capacity, load-balancing loss, valid mask, and the grouped
path against the per-expert loop reference (forward and backward). Fast: plain `pytest` runs it."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import moebench.models.moe as moe_mod
from moebench.models.ffn import FFN, act_fn
from moebench.impl import resolve_moe
from moebench.models.moe import MoE, MoEAux
from moebench.ops.routing import plan_grouped
from moebench.ops.experts import HAS_GROUPED_MM, experts_grouped, experts_loop_ref

IMPLS = ["grouped", "loop"] if HAS_GROUPED_MM else ["loop"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
D, FH, DO = 16, 32, 24            # d_in, d_hidden, d_out: multiples of 8 (bf16 grouped_mm rows), d_out != d_in


def assert_close(name, got, want, atol, rtol):
    got, want = got.detach().float(), want.detach().float()
    diff = (got - want).abs()
    ok = torch.allclose(got, want, atol=atol, rtol=rtol)
    assert ok, f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g} (atol={atol}, rtol={rtol})"


def run(moe, impl, x_TD, valid_T=None, g_TD=None, call=None):
    """Forward + backward of (y·g).sum() + lb_loss; returns y, aux and the gradients.
    `call` replaces moe's forward (e.g. a compiled moe)."""
    moe.impl = impl
    moe.zero_grad(set_to_none=True)
    x = x_TD.detach().clone().requires_grad_(True)
    y, aux = (moe if call is None else call)(x, valid_T)
    g = torch.randn_like(y, dtype=torch.float32, generator=torch.Generator().manual_seed(1)) if g_TD is None else g_TD
    ((y.float() * g).sum() + aux.lb_loss).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in moe.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), aux, grads


def expert_outputs(moe, x_TD):
    """(E, T, d_out): every expert applied to every token, by direct math (no routing code)."""
    h = act_fn(moe.activation)(torch.einsum("td,edf->etf", x_TD, moe.w1_EDF))
    return torch.einsum("etf,efo->eto", h, moe.w2_EFD)


def routing(moe, x_TD):
    probs = F.softmax(x_TD @ moe.router_DE, dim=-1, dtype=torch.float32)
    return probs.topk(moe.top_k, dim=-1)


def expected_keep(top_i_TK, capacity, valid_T=None):
    """Priority by (choice rank k, then position t); the first `capacity` of each expert are kept."""
    T, K = top_i_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    used: dict[int, int] = {}
    for k, t in itertools.product(range(K), range(T)):
        if valid_T is not None and not valid_T[t]:
            continue
        e = int(top_i_TK[t, k])
        if capacity is None or used.get(e, 0) < capacity:
            keep[t, k] = True
        used[e] = used.get(e, 0) + 1
    return keep


def decode_keep(moe, x_TD, y_TD):
    """Which assignments an output kept: match y_t against Σ_{k in subset} p_k·E_{i_k}(x_t), all subsets."""
    with torch.no_grad():
        top_p, top_i = routing(moe, x_TD)
        out_ETO = expert_outputs(moe, x_TD)
    y_TD = y_TD.detach()
    T, K = top_i.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for t in range(T):
        best, best_err = None, float("inf")
        for subset in itertools.product([False, True], repeat=K):
            cand = sum((top_p[t, k] * out_ETO[top_i[t, k], t] for k in range(K) if subset[k]),
                       torch.zeros(y_TD.shape[1]))
            err = float((cand - y_TD[t]).abs().max())
            if err < best_err:
                best, best_err = subset, err
        assert best_err < 1e-5, f"token {t}: output matches no subset of its assignments (err {best_err:.3g})"
        keep[t] = torch.tensor(best)
    return keep


def crafted(T, E, first, second=None, scale=4.0, d=D):
    """A fake router: x_t = onehot(first_t) + 0.5·onehot(second_t), router = scale·I, so expert
    first_t has the top logit and second_t the next one. Returns x_TD and router_DE."""
    x = torch.zeros(T, d)
    x[torch.arange(T), torch.as_tensor(first)] = 1.0
    if second is not None:
        x[torch.arange(T), torch.as_tensor(second)] += 0.5
    router = torch.zeros(d, E)
    router[:E, :E] = scale * torch.eye(E)
    return x, router


def make_moe(E, K, cf, seed=0, coef=0.01, d_out=DO, **kw):
    torch.manual_seed(seed)
    return MoE(D, FH, d_out, E, top_k=K, capacity_factor=cf, aux_loss_coef=coef, **kw)


# ---- routing semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [1, 2])
def test_fake_router_routes_as_expected(impl, K):
    T, E = 24, 8
    first = [(3 * t) % E for t in range(T)]
    second = [(3 * t + 1 + t % 3) % E for t in range(T)]
    moe = make_moe(E, K, None)
    x, router = crafted(T, E, first, second)
    with torch.no_grad():
        moe.router_DE.copy_(router)
    moe.impl = impl
    y, aux = moe(x)
    # expected: softmax of scale·(1, 0.5, 0...) at (first, second); y = Σ_k p_k · expert_k(x)
    probs = F.softmax(x @ router, dim=-1)
    out_ETO = expert_outputs(moe, x)
    choices = [first, second][:K]
    want = sum(probs[torch.arange(T), c, None] * out_ETO[c, torch.arange(T)] for c in map(torch.tensor, choices))
    assert_close("y", y, want, **TOL[torch.float32])
    counts = torch.bincount(torch.tensor(sum(choices, [])), minlength=E).float()
    assert torch.equal(aux.tokens_per_expert, counts)
    assert aux.dropped_frac == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,E,K,cf,seed", [(48, 4, 1, 0.5, 0), (48, 4, 2, 0.75, 1), (40, 8, 2, 1.0, 2),
                                            (64, 8, 1, 1.0, 3), (30, 6, 2, 0.25, 4)])
def test_capacity_respected_exactly(impl, T, E, K, cf, seed):
    moe = make_moe(E, K, cf, seed=seed)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    moe.impl = impl
    with torch.no_grad():
        y, aux = moe(x)
    capacity = int(cf * T * K / E)
    top_i = routing(moe, x)[1]
    keep = decode_keep(moe, x, y)
    assert torch.equal(keep, expected_keep(top_i, capacity)), "kept assignments differ from the (k, t) priority"
    counts = torch.bincount(top_i.flatten(), minlength=E)
    kept = torch.bincount(top_i[keep], minlength=E)
    assert (kept <= capacity).all() and torch.equal(kept, counts.clamp(max=capacity)), f"{kept=} {counts=} {capacity=}"
    assert torch.equal(aux.tokens_per_expert, counts.float())
    assert float(aux.dropped_frac) == pytest.approx(1 - float(kept.sum()) / (T * K))
    if K == 1:   # a fully dropped token gives exactly zero (the residual outside carries it)
        assert (y[~keep[:, 0]] == 0).all()
        assert (y[keep[:, 0]].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_priority_first_choices_before_second_choices(impl):
    # expert 0 is the second choice of the early tokens and the first choice of the late ones; with
    # capacity 4 the late first choices win although they come later in the sequence
    T, E = 8, 4                                          # K=2, cf=1 -> capacity = int(8·2/4) = 4
    first = [1, 2, 3, 1, 0, 0, 0, 0]
    second = [0, 0, 0, 0, 1, 2, 3, 1]
    moe = make_moe(E, 2, 1.0)
    x, router = crafted(T, E, first, second)
    with torch.no_grad():
        moe.router_DE.copy_(router)
    moe.impl = impl
    with torch.no_grad():
        y, _ = moe(x)
    keep = decode_keep(moe, x, y)
    assert keep[4:, 0].all() and not keep[:4, 1].any(), f"keep (first, second) per token:\n{keep}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [1, 2])
def test_dropless_drops_nothing(impl, K):
    T, E = 40, 4
    first = [0] * 30 + [1] * 10                          # heavily imbalanced: would overflow any capacity
    second = [1] * 30 + [2] * 10
    moe = make_moe(E, K, None)
    x, router = crafted(T, E, first, second)
    x = x + 0.1 * torch.randn(T, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe.router_DE.copy_(router)
    moe.impl = impl
    with torch.no_grad():
        y, aux = moe(x)
    assert float(aux.dropped_frac) == 0
    assert decode_keep(moe, x, y).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K,cf,masked", [(1, 1.0, False), (2, 0.5, False), (2, None, True), (1, 0.5, True)])
def test_tokens_per_expert_sums_to_TK(impl, K, cf, masked):
    T, E = 50, 8
    moe = make_moe(E, K, cf)
    moe.impl = impl
    valid = torch.rand(T, generator=torch.Generator().manual_seed(0)) > 0.3 if masked else None
    with torch.no_grad():
        _, aux = moe(torch.randn(T, D), valid)
    n = T if valid is None else int(valid.sum())
    assert aux.tokens_per_expert.shape == (E,) and aux.tokens_per_expert.dtype == torch.float32
    assert float(aux.tokens_per_expert.sum()) == n * K


# ---- load-balancing loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_lb_loss_is_coef_at_uniform_routing_and_larger_when_imbalanced(impl):
    T, E, coef = 64, 8, 0.01
    moe = make_moe(E, 1, None, coef=coef)
    moe.impl = impl
    # cyclic fake router: token t -> expert t mod E, so f_i = 1/E and, by symmetry, P_i = 1/E
    x, router = crafted(T, E, [t % E for t in range(T)])
    with torch.no_grad():
        moe.router_DE.copy_(router)
        _, aux = moe(x)
    assert torch.equal(aux.tokens_per_expert, torch.full((E,), T / E))
    assert float(aux.lb_loss) == pytest.approx(coef, rel=1e-5)
    # zero router: every probability is exactly 1/E, so the loss is coef whatever top-1 picks
    with torch.no_grad():
        moe.router_DE.zero_()
        _, aux = moe(torch.randn(T, D))
    assert float(aux.lb_loss) == pytest.approx(coef, rel=1e-6)
    # everything to expert 0 with high probability: f_0 = 1, P_0 ~ 1 -> loss ~ coef·E
    x, router = crafted(T, E, [0] * T)
    with torch.no_grad():
        moe.router_DE.copy_(router)
        _, aux = moe(x)
    assert float(aux.lb_loss) > 2 * coef
    assert float(aux.lb_loss) == pytest.approx(coef * E * float(F.softmax(x @ router, -1)[:, 0].mean()), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [1, 2])
def test_router_gets_gradient_from_task_loss_alone(impl, K):
    moe = make_moe(8, K, 1.0, coef=0.0)
    moe.impl = impl
    y, aux = moe(torch.randn(32, D))
    assert aux.lb_loss.item() == 0
    (y * torch.randn_like(y)).sum().backward()
    assert moe.router_DE.grad is not None and moe.router_DE.grad.abs().sum() > 0


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


# ---- construction ----------------------------------------------------------------------------------


def test_impl_resolution():
    moe = MoE(D, FH, DO, 4)
    assert moe.impl == ("grouped" if HAS_GROUPED_MM else "loop")
    assert not moe.fused and not moe.decode_kernels, "on a CPU 'auto' routing is torch; decode is off"
    assert MoE(D, 12, DO, 4).impl == "loop", "auto falls back when rows cannot be 16-byte aligned in bf16"
    assert MoE(D, FH, DO, 4, impl="loop").impl == "loop"
    with pytest.raises(ValueError):
        MoE(D, FH, DO, 4, impl="fast")
    assert resolve_moe("loop") == "loop" and resolve_moe("auto", (16, 12)) == "loop"


def test_param_counts_and_init():
    E, K = 8, 2
    moe = MoE(D, FH, DO, E, top_k=K)
    per_expert = D * FH + FH * DO
    assert moe.n_params() == D * E + E * per_expert
    assert moe.n_active_params() == D * E + K * per_expert
    assert moe.w1_EDF.abs().max() <= D**-0.5 and moe.w2_EFD.abs().max() <= FH**-0.5
    assert moe.router_DE.abs().max() <= D**-0.5


def test_ffn():
    ffn = FFN(D, FH, DO, activation="gelu")
    assert ffn.w1.weight.shape == (FH, D) and ffn.w2.weight.shape == (DO, FH)
    assert ffn.w1.bias is None and ffn.w2.bias is None
    x = torch.randn(3, 5, D)
    assert_close("ffn", ffn(x), F.gelu(x @ ffn.w1.weight.t()) @ ffn.w2.weight.t(), **TOL[torch.float32])
    assert ffn.n_params() == D * FH + FH * DO
    with pytest.raises(ValueError, match="unknown activation"):
        FFN(D, FH, DO, activation="swish")


def test_eval_mode_is_dropless_and_train_mode_drops():
    torch.manual_seed(0)
    moe = MoE(16, 32, 16, n_expert=4, capacity_factor=0.5, impl="grouped")
    x_TD = torch.randn(64, 16)
    _, aux_train = moe(x_TD)
    assert aux_train.dropped_frac.item() >= 0.5 - 1e-6     # capacity 8 per expert holds at most half
    moe.eval()
    y_eval, aux_eval = moe(x_TD)
    assert aux_eval.dropped_frac.item() == 0.0
    # dropless: a token's output does not depend on the rest of the batch
    y_one, _ = moe(x_TD[:1])
    torch.testing.assert_close(y_one, y_eval[:1])


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_need_aux_false_gives_the_same_output_and_no_statistics(impl):
    torch.manual_seed(0)
    moe = MoE(16, 32, 16, 4, top_k=2, capacity_factor=1.0, impl=impl)
    x = torch.randn(40, 16)
    y, aux = moe(x)
    y_fast, none = moe(x, need_aux=False)
    assert none is None and isinstance(aux, MoEAux)
    assert torch.equal(y, y_fast)
