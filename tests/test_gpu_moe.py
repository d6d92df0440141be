"""MoE on CUDA in bf16: the grouped path (CUTLASS grouped GEMM on sm90+) against the loop reference,
forward and backward, under capacity limits; no host synchronisation; speed against a dense FFN.

Run with `pytest -m gpu -s` to see the measured errors and timings.
"""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

from moebench.models.moe import MoE
from moebench.ops.experts import HAS_GROUPED_MM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm / _grouped_mm"),
]
D, FH, DO = 256, 512, 256
MAX_REL_ERR = 1e-2


def needs_sm90():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bf16 grouped_mm runs CUTLASS only on sm90+; elsewhere torch's fallback copies offsets to the host")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def crafted_routing(T: int, E: int, seed: int):
    """Inputs and router whose top-2 logits have margins of 1.5, so that bf16 and fp32 route every
    token identically: x_t = 3·q_{a_t} + 1.5·q_{b_t} + noise orthogonal to the q's, router = Q.
    First choices are skewed (∝ 1/(e+1)) and expert E-1 is never chosen: capacity drops tokens and
    one expert stays empty (an empty group in grouped_mm's weight gradient)."""
    gen = torch.Generator().manual_seed(seed)
    Q_DE, _ = torch.linalg.qr(torch.randn(D, E, generator=gen))
    w = 1.0 / torch.arange(1, E + 1).float()
    w[-1] = 0
    first = torch.multinomial(w, T, replacement=True, generator=gen)
    second = (first + torch.randint(1, E - 1, (T,), generator=gen)) % (E - 1)   # != first, never E-1
    noise = torch.randn(T, D, generator=gen)
    noise -= noise @ Q_DE @ Q_DE.T
    x_TD = 3 * Q_DE.T[first] + 1.5 * Q_DE.T[second] + noise
    return x_TD, Q_DE


def run(moe: MoE, impl: str, x_TD, valid_T, g_TD, fused: bool = True):
    # the path a CUDA build resolves to by default: grouped with the Triton routing
    moe.impl, moe.fused = impl, impl == "grouped" and fused
    moe.zero_grad(set_to_none=True)
    x = x_TD.detach().clone().requires_grad_(True)
    y, aux = moe(x, valid_T)
    ((y.float() * g_TD).sum() + aux.lb_loss).backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in moe.named_parameters()})
    return out, aux


CASES = [  # (T, E, K, capacity_factor, masked)
    (8192, 16, 1, 1.0, False),
    (8192, 16, 2, 1.0, False),
    (8192, 16, 1, 0.5, True),
    (8192, 8, 2, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-cf{}{}".format(*c[:4], "-mask" if c[4] else ""))
def test_grouped_bf16_matches_loop(case, device="cuda"):
    T, E, K, cf, masked = case
    torch.manual_seed(0)
    base = MoE(D, FH, DO, E, top_k=K, capacity_factor=cf)
    x_TD, Q_DE = crafted_routing(T, E, seed=1)
    with torch.no_grad():
        base.router_DE.copy_(Q_DE)
    m16 = copy.deepcopy(base).to(device, torch.bfloat16)
    m32 = copy.deepcopy(m16).float()                      # fp32 copy of the same (bf16-rounded) weights
    x16 = x_TD.to(device, torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    g_TD = torch.randn(T, DO, generator=gen).to(device)
    valid_T = (torch.rand(T, generator=gen) > 0.25).to(device) if masked else None

    grouped, aux_g = run(m16, "grouped", x16, valid_T, g_TD)
    loop16, aux_l = run(m16, "loop", x16, valid_T, g_TD)
    loop32, aux_32 = run(m32, "loop", x16.float(), valid_T, g_TD)

    # the crafted margins make all three route identically; otherwise the comparison is meaningless
    assert torch.equal(aux_g.tokens_per_expert, aux_32.tokens_per_expert)
    assert torch.equal(aux_l.tokens_per_expert, aux_32.tokens_per_expert)
    assert float(aux_g.dropped_frac) == pytest.approx(float(aux_32.dropped_frac))
    assert aux_32.tokens_per_expert[-1] == 0, "expert E-1 should be empty"
    if cf is not None:
        assert float(aux_32.dropped_frac) > 0, "the case should exercise capacity"
    print(f"\n{case}: dropped {aux_g.dropped_frac.item():.3f}, lb_loss {aux_g.lb_loss.item():.5f}")
    failures = []
    for name in loop32:
        errs = {"grouped16~loop16": rel_err(grouped[name], loop16[name]),
                "grouped16~loop32": rel_err(grouped[name], loop32[name]),
                "loop16~loop32": rel_err(loop16[name], loop32[name])}
        print(f"  {name:14s} " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        if not torch.isfinite(grouped[name]).all():
            failures.append(f"{name}: not finite")
        failures += [f"{name} {k}: rel err {v:.2e}" for k, v in errs.items()
                     if k != "loop16~loop32" and not v < MAX_REL_ERR]
    assert rel_err(aux_g.lb_loss, aux_32.lb_loss) < MAX_REL_ERR
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("masked,autocast", [(False, False), (True, False), (False, True)],
                         ids=["plain", "valid_mask", "autocast"])
def test_grouped_issues_no_host_sync(masked, autocast):
    needs_sm90()
    T, E = 4096, 32
    dtype = torch.float32 if autocast else torch.bfloat16   # autocast: fp32 master weights, bf16 compute
    moe = MoE(512, 1536, 512, E, top_k=2, capacity_factor=1.0, impl="grouped", routing="triton").to("cuda", dtype)
    x = torch.randn(T, 512, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
    valid = torch.rand(T, device="cuda") > 0.2 if masked else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y, aux = moe(x, valid)
        ((y * g).float().sum() + aux.lb_loss).backward()

    step()                                  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        moe.impl = "loop"                   # sanity: the check is live (the loop syncs on nonzero)
        with pytest.raises(RuntimeError, match="synchroniz"):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-cf{}{}".format(*c[:4], "-mask" if c[4] else ""))
def test_fused_routing_matches_torch_gathers(case):
    """The Triton gathers (moebench/ops/routing.py) against the torch gathers they replace, bf16
    weights and activations, fresh random routing (ties and near-ties included)."""
    needs_sm90()
    T, E, K, cf, masked = case
    torch.manual_seed(0)
    moe = MoE(D, FH, DO, E, top_k=K, capacity_factor=cf).to("cuda", torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(T, DO, device="cuda")
    valid = torch.rand(T, device="cuda") > 0.3 if masked else None
    results = []
    for fused in (False, True):
        results.append(run(moe, "grouped", x, valid, g, fused=fused)[0])
    errs = {name: rel_err(results[1][name], results[0][name]) for name in results[0]}
    print(f"\nfused~torch gathers {case}: " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(v < MAX_REL_ERR for v in errs.values()), errs


def test_grouped_under_autocast_matches_loop():
    T, E, K = 4096, 16, 2
    torch.manual_seed(0)
    moe = MoE(D, FH, DO, E, top_k=K, capacity_factor=1.0).to("cuda")
    x_TD, Q_DE = crafted_routing(T, E, seed=3)
    with torch.no_grad():
        moe.router_DE.copy_(Q_DE)
    x, g = x_TD.to("cuda"), torch.randn(T, DO, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped, _ = run(moe, "grouped", x, None, g)
        loop, _ = run(moe, "loop", x, None, g)
    assert grouped["y"].dtype == torch.bfloat16 and grouped["w1_EDF.grad"].dtype == torch.float32
    errs = {name: rel_err(grouped[name], loop[name]) for name in loop}
    print("\nautocast grouped~loop: " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(v < MAX_REL_ERR for v in errs.values()), errs


def test_compiled_grouped_matches_eager():
    """torch.compile (inductor) of the grouped path gives the eager results: the path traces as one
    graph, so compiling is the way to fuse its routing bookkeeping."""
    needs_sm90()
    T, E, K = 4096, 16, 2
    torch.manual_seed(0)
    moe = MoE(D, FH, DO, E, top_k=K, capacity_factor=1.0).to("cuda", torch.bfloat16)
    x_TD, Q_DE = crafted_routing(T, E, seed=4)
    with torch.no_grad():
        moe.router_DE.copy_(Q_DE)
    x, g = x_TD.to("cuda", torch.bfloat16), torch.randn(T, DO, device="cuda")
    valid = torch.rand(T, device="cuda") > 0.2
    compiled = torch.compile(moe, fullgraph=True)
    for v in (None, valid):
        eager, _ = run(moe, "grouped", x, v, g)
        moe.zero_grad(set_to_none=True)
        xc = x.detach().clone().requires_grad_(True)
        y, aux = compiled(xc, v)
        ((y.float() * g).sum() + aux.lb_loss).backward()
        comp = {"y": y.detach(), "x.grad": xc.grad}
        comp.update({f"{n}.grad": p.grad for n, p in moe.named_parameters()})
        errs = {name: rel_err(comp[name], eager[name]) for name in eager}
        print(f"\ncompiled~eager (mask={v is not None}): " + "  ".join(f"{k} {e:.2e}" for k, e in errs.items()))
        assert all(e < MAX_REL_ERR for e in errs.values()), errs


def _median_ms(fn, warmup=5, repeats=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)

# Speed is a benchmark, not a test: `moebench bench moe` and `moebench bench train` measure the
# MoE against its dense equivalent and the per-expert loop (results/published/bench.jsonl, reports/bench.md).
