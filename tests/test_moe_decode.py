"""The fused decode MoE kernels (moebench/ops/moe_decode.py) against their plain-torch reference and
against the repo's MoE layer. On a CPU they run under Triton's interpreter (set in conftest.py), so
the shapes are tiny; scripts/bench_moe_decode.py compares them with the grouped path on an H100."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moebench.models.moe import MoE
from moebench.ops import moe_decode
from moebench.ops.moe_decode import (decode_experts, decode_experts_ref, decode_moe_residual,
                                     decode_moe_residual_ref, decode_router_ref)

pytestmark = pytest.mark.usefixtures("triton_runs")   # conftest.py: a GPU, or the interpreter on a CPU

# compiled on a GPU; on a CPU, interpreted
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


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


@DTYPES
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("T,E,D,Fh,N", [(1, 4, 32, 64, 32), (5, 8, 32, 64, 48), (64, 4, 32, 64, 32),
                                         (9, 4, 80, 160, 160), (9, 4, 64, 128, 256)],
                         ids=["T1", "T5", "T64", "ragged", "even-multiblock"])
def test_matches_reference(T, E, D, Fh, N, activation, dtype):
    # T <= 5: some experts get no token; T=64 on 4 experts: one gets 25 (two BLOCK_M=16 row blocks).
    # ragged: D, F, N blocks of 64, 64, 128 with partial last blocks (masked loads); even: 2 F-blocks
    # and 2 N-blocks that tile exactly (the fused kernel's unmasked EVEN path)
    x, expert_T, p, w1, w2 = inputs(T, E, D, Fh, N, dtype, seed=T + E)
    y = decode_experts(x, expert_T, p, w1, w2, activation)
    assert y.shape == (T, N) and y.dtype == dtype
    check(y, decode_experts_ref(x, expert_T, p, w1, w2, activation), dtype)


def test_one_expert_takes_every_token():
    """40 tokens on one expert: three BLOCK_M=16 row blocks, the last one partial (int32 ids)."""
    expert_T = torch.full((40,), 2, dtype=torch.int32)
    x, expert_T, p, w1, w2 = inputs(40, 4, 32, 64, 32, torch.float32, expert_T)
    check(decode_experts(x, expert_T, p, w1, w2, "gelu"),
          decode_experts_ref(x, expert_T.long(), p, w1, w2, "gelu"), torch.float32)


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_expert_kernel_with_fewer_programs_than_items(programs):
    """A grid sized to the GPU (EXPERT_CONFIG per_sm) strides the (expert, F-block) items over the
    programs: the partial sums are those of one program per item, bit for bit."""
    x, expert_T, p, w1, w2 = inputs(20, 5, 32, 96, 48, torch.bfloat16, seed=3)
    cfg = dict(moe_decode.EXPERT_CONFIG, BLOCK_F=32, BLOCK_N=32)     # 5 experts × 3 F-blocks = 15 items
    want = moe_decode._expert_partials(x, expert_T, w1, w2, "relu", cfg)
    got = moe_decode._expert_partials(x, expert_T, w1, w2, "relu", dict(cfg, programs=programs))
    assert torch.equal(got, want)


def test_unused_experts_are_never_read():
    """NaN weights of experts without tokens must not reach the output (a 0 times NaN is NaN). That
    they are not even loaded (the kernels' skip of an expert without tokens) no output can show:
    scripts/bench_moe_decode.py's bandwidth does."""
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
    with pytest.raises(TypeError, match="dtypes"):
        decode_experts(x, expert_T, p, w1.double(), w2.double(), "relu")


@DTYPES
@pytest.mark.parametrize("T,E,D", [(1, 4, 32), (37, 8, 48), (64, 32, 64), (5, 128, 40)])
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


# ---- the whole sublayer: out = x + MoE(norm(x)) ------------------------------------------------

NORMS = {"layernorm": dict(rms=False, bias=True), "layernorm-nobias": dict(rms=False, bias=False),
         "rmsnorm": dict(rms=True, bias=False)}


def sublayer_inputs(T, E, D, Fh, dtype, norm, seed=0):
    """Arguments of decode_moe_residual: x with a mean and a spread per token (so that the norm
    matters), norm weights near 1, a router and experts of unit-scale outputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen) * (1 + torch.rand(T, 1, generator=gen)) + torch.randn(T, 1, generator=gen)
    w = 1 + 0.2 * torch.randn(D, generator=gen)
    b = 0.2 * torch.randn(D, generator=gen) if NORMS[norm]["bias"] else None
    r = torch.randn(D, E, generator=gen) / D ** 0.5
    w1 = torch.randn(E, D, Fh, generator=gen) / D ** 0.5
    w2 = torch.randn(E, Fh, D, generator=gen) / Fh ** 0.5
    args = [a if a is None else a.to(dtype).to(DEV) for a in (x, w, b)]
    return dict(x_TD=args[0], norm_w_D=args[1], norm_b_D=args[2], eps=1e-5, router_DE=r.to(dtype).to(DEV),
                w1_EDF=w1.to(dtype).to(DEV), w2_EFD=w2.to(dtype).to(DEV), rms=NORMS[norm]["rms"])


def reference_routing(args):
    """(expert_T, clear_T) of the reference: each token's expert, and whether its top two logits are
    far enough apart (2 units of their last bit) that a last-bit difference of the kernel's sums,
    or of h, cannot swap them."""
    x, D = args["x_TD"], args["x_TD"].shape[1]
    if args["rms"]:
        h = F.rms_norm(x, (D,), args["norm_w_D"], args["eps"])
    else:
        h = F.layer_norm(x, (D,), args["norm_w_D"], args["norm_b_D"], args["eps"])
    logits = h.float() @ args["router_DE"].float()
    top2 = logits.topk(2, -1).values
    ulp = 2.0 ** -7 if x.dtype == torch.bfloat16 else 2.0 ** -20
    clear = (top2[:, 0] - top2[:, 1]) > 2 * ulp * top2[:, 0].abs().clamp(min=1)
    return decode_router_ref(h, args["router_DE"])[1], clear


def check_sublayer(out, args, activation):
    want = decode_moe_residual_ref(activation=activation, **args)
    assert out.shape == want.shape and out.dtype == want.dtype
    _, clear = reference_routing(args)
    assert clear.float().mean() >= 0.5, "too many near ties to test: change the seed"
    check(out[clear], want[clear], want.dtype)


@DTYPES
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("T,E,D,Fh,activation", [(1, 4, 160, 160, "gelu"), (5, 128, 160, 160, "relu"),
                                                  (64, 8, 160, 160, "gelu"), (64, 4, 256, 128, "relu")],
                         ids=["T1", "T5", "T64", "T64-even"])
def test_sublayer_matches_reference(T, E, D, Fh, activation, norm, dtype):
    """D = N = 160: 3 K-blocks of 64 and 2 N-blocks of 128, both ragged, 3 ragged F-blocks, and (5
    tokens on 128 experts) experts without tokens; T64-even: 2 F-blocks and 2 N-blocks that tile,
    two row blocks for an expert with more than 16 tokens. One activation a shape (the interpreter
    is slow): each dtype and norm meets both."""
    args = sublayer_inputs(T, E, D, Fh, dtype, norm, seed=T + E + D)
    check_sublayer(decode_moe_residual(activation=activation, **args), args, activation)


@DTYPES
def test_sublayer_never_reads_unused_experts(dtype):
    """Experts no token picks get NaN weights: the output stays finite and equal to the reference
    computed with the real weights (see test_unused_experts_are_never_read)."""
    args = sublayer_inputs(7, 16, 64, 64, dtype, "layernorm", seed=0)
    want = decode_moe_residual_ref(activation="gelu", **args)
    expert_T, clear = reference_routing(args)
    assert clear.all()
    unused = [e for e in range(16) if e not in expert_T.tolist()]
    assert len(unused) >= 9
    args["w1_EDF"][unused], args["w2_EFD"][unused] = float("nan"), float("nan")
    out = decode_moe_residual(activation="gelu", **args)
    assert torch.isfinite(out).all()
    check(out, want, dtype)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_sublayer_one_expert_takes_every_token(norm):
    """64 tokens on expert 2 (the router's only non-zero column, with h near 1 everywhere): four
    BLOCK_M=16 row blocks; the other experts' weights are NaN, so never read."""
    args = sublayer_inputs(64, 4, 32, 64, torch.float32, norm, seed=5)
    args["norm_w_D"] = torch.full_like(args["norm_w_D"], 0.05)
    if norm == "layernorm":
        args["norm_b_D"] = torch.ones_like(args["norm_w_D"])
    else:                                        # RMSNorm: x = 20 + noise, so h ≈ 0.05 · 1
        args["x_TD"] = args["x_TD"] + 20
    args["router_DE"] = torch.zeros_like(args["router_DE"])
    args["router_DE"][:, 2] = 1.0
    want = decode_moe_residual_ref(activation="relu", **args)
    assert (reference_routing(args)[0] == 2).all()
    for e in (0, 1, 3):
        args["w1_EDF"][e], args["w2_EFD"][e] = float("nan"), float("nan")
    check(decode_moe_residual(activation="relu", **args), want, torch.float32)


def test_sublayer_router_tie_takes_the_first_expert():
    """Router columns 1 and 3 equal and the largest (x near 20, so h near the norm weight, near 1):
    every token ties, takes expert 1; expert 3's weights are NaN."""
    args = sublayer_inputs(6, 4, 32, 32, torch.bfloat16, "rmsnorm", seed=6)
    args["x_TD"] += 20
    args["router_DE"][:, 3] = args["router_DE"][:, 1] = args["router_DE"][:, 1].abs() * 4
    args["w1_EDF"][3], args["w2_EFD"][3] = float("nan"), float("nan")
    assert (reference_routing(args)[0] == 1).all()
    out = decode_moe_residual(activation="relu", **args)
    assert torch.isfinite(out).all()
    check(out, decode_moe_residual_ref(activation="relu", **args), torch.bfloat16)


def test_sublayer_rejects_what_it_cannot_do():
    args = sublayer_inputs(4, 4, 32, 64, torch.float32, "layernorm")
    with pytest.raises(ValueError, match="RMSNorm"):
        decode_moe_residual(**{**args, "rms": True})
    with pytest.raises(ValueError, match="eps"):
        decode_moe_residual(**{**args, "eps": None})
    with pytest.raises(ValueError, match="residual"):
        decode_moe_residual(**{**args, "w2_EFD": args["w2_EFD"][:, :, :16].contiguous()})
    with pytest.raises(ValueError, match="router"):
        decode_moe_residual(**{**args, "router_DE": args["router_DE"][:, :3]})
    with pytest.raises(ValueError, match="norm weight"):
        decode_moe_residual(**{**args, "norm_w_D": args["norm_w_D"][:16]})
    with pytest.raises(TypeError, match="norm and router"):
        decode_moe_residual(**{**args, "norm_w_D": args["norm_w_D"].double()})
    with pytest.raises(ValueError, match="tokens"):
        decode_moe_residual(**{**args, "x_TD": args["x_TD"].repeat(65, 1)})
    with pytest.raises(ValueError, match="activation"):
        decode_moe_residual(**args, activation="silu")
    with pytest.raises(RuntimeError, match="no_grad"):
        decode_moe_residual(**{**args, "norm_w_D": args["norm_w_D"].clone().requires_grad_()})
    # RMSNorm's eps=None is nn.RMSNorm's default: torch.finfo(x.dtype).eps, as F.rms_norm
    rms = {**args, "norm_b_D": None, "rms": True, "eps": None}
    check(decode_moe_residual(**rms), decode_moe_residual_ref(**rms), torch.float32)


def test_the_decode_kernels_take_top1_grouped_layers_only():
    assert MoE(16, 32, 16, 4, top_k=1, impl="grouped", decode=True).decode_kernels
    assert not MoE(16, 32, 16, 4, top_k=1, impl="grouped").decode_kernels       # off unless asked
    assert not MoE(16, 32, 16, 4, top_k=1, impl="loop", decode=True).decode_kernels   # the reference
    assert not MoE(16, 32, 16, 4, top_k=2, impl="grouped", decode=True).decode_kernels
