"""Switch MoE on CPU: routing invariants, capacity, load-balancing loss and construction, on both
paths (the grouped path against the loop reference: tests/test_moe_paths.py). Fast: plain `pytest`
runs it."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moebench.impl import resolve_moe
from moebench.models.ffn import FFN, act_fn
from moebench.models.moe import MoE, MoEAux
from moebench.ops.experts import HAS_GROUPED_MM

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
