"""The top-1, dropless MoE layer at decode time (a handful of tokens per step) in Triton, and the
whole pre-norm MoE residual sublayer of a decode step, out = x + MoE(norm(x)), in three launches:

    1. norm + router, 16 tokens a program: h_TD = norm(x_TD) (stored: the experts' input), logits,
       softmax, max -> p_T, expert_T
    2. the experts, items E × F-blocks: item (e, g) takes expert e's tokens through hidden units
       g·BLOCK_F .. (g+1)·BLOCK_F of expert e, both layers: fp32 partial sums part_GTN[g, t]
    3. combine: out_TD[t] = x_TD[t] + p_T[t] · Σ_g part_GTN[g, t], rounded once to x's dtype
       (decode_moe_residual_ref rounds y, then x + y: a last-bit difference its tests allow)

    y_TD[t] = p_T[t] · ( act(h_TD[t] @ w1_EDF[e_t]) @ w2_EFD[e_t] )      e_t = expert_T[t]

decode_router and decode_experts (MoE.forward's decode step, for MoEs without a norm of their own,
e.g. inner MoEs) take kernels 1 and 2-3 without the norm and the residual. The grouped path
(moebench/models/moe.py) takes about a dozen launches for this.

Each expert program finds its expert's tokens itself, from the T expert ids, and streams its slice of
that expert's weights once (when the expert has <= BLOCK_M tokens, the common case at decode). An
expert without tokens is skipped: its weights are never read. Decode is bound by reading the
weights, so block sizes are chosen for HBM bandwidth, not FLOPs. The partial sums cost
G·T·N·4 bytes written and read back (3 MB at T=64, against 88 MB of weights), mostly in L2; in
exchange each expert's w1 and w2 are read by one launch, without the up kernel's h_TF round trip.

Shape suffixes as in moe.py: T tokens, E experts, D width in, F hidden width, N width out (Dout),
G blocks of BLOCK_F hidden units. The hidden state act(h @ w1) is rounded to x's dtype (as
grouped_mm's output is) before the second product. Products accumulate in fp32 (fp32 inputs use
IEEE dots, not TF32); norms, softmax, the activation and the scaling by p_T run in fp32.

Each op is a torch.library triton_op (torch.compile traces it) and never syncs with the host
(static grids, no data-dependent shapes), so it can be captured in a CUDA graph. On a CPU it runs
under Triton's interpreter (TRITON_INTERPRET=1 before triton's first import), as the tests do.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moebench.ops.experts import act_fn

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from moebench.ops.lazy_op import lazy_triton_op
    HAS_TRITON = True
except ImportError:                    # a CPU box without triton: the torch reference only
    HAS_TRITON = False

MAX_DECODE_T = 256      # every program holds all T expert ids in registers (padded to a power of 2)
_ACT_IDS = {"relu": 0, "gelu": 1}
# The fused expert kernel's static config (no autotune: CUDA-graph capture); blocks are caps, cut to
# the widths' powers of 2. The fastest on an H100 of the configurations scripts/bench_moe_decode.py
# times (the measurements: results/published/profiles/, git history).
EXPERT_CONFIG = dict(BLOCK_F=128, BLOCK_K=64, BLOCK_N=128, num_warps=4, num_stages=3)


def decode_experts_ref(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """The spec, in plain torch: per-token gathered weights, fp32 products, h rounded to x's dtype as
    the kernel rounds it. Gathers T copies of an expert's weights: for tests, not for speed."""
    h_TF = act_fn(activation)(torch.einsum("td,tdf->tf", x_TD.float(), w1_EDF[expert_T].float()))
    h_TF = h_TF.to(x_TD.dtype).float()
    y_TD = torch.einsum("tf,tfn->tn", h_TF, w2_EFD[expert_T].float()) * p_T.float()[:, None]
    return y_TD.to(x_TD.dtype)


def norm_args(norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    """(weight, bias or None, eps, rms) of an nn.LayerNorm or nn.RMSNorm, as the sublayer kernels take
    them. RMSNorm's default eps (None) is its input's finfo eps: the weight's dtype here, which the
    kernels require to be the input's."""
    rms = isinstance(norm, torch.nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
    return norm.weight, None if rms else norm.bias, float(eps), rms


def decode_router_ref(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE.forward's top-1 router: logits in x's dtype, softmax in fp32, the largest probability."""
    p_T, expert_T = torch.softmax(x_TD @ router_DE, dim=-1, dtype=torch.float32).max(-1)
    return p_T, expert_T


def decode_moe_residual_ref(x_TD: torch.Tensor, norm_w_D: torch.Tensor, norm_b_D: torch.Tensor | None,
                            eps: float | None, router_DE: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                            activation: str = "relu", *, rms: bool = False) -> torch.Tensor:
    """The sublayer's spec from the refs above: h = norm(x) in x's dtype, top-1 routing of h, the
    experts on h, then x + y (y rounded to x's dtype, then the sum)."""
    D = x_TD.shape[-1]
    if rms:
        h_TD = F.rms_norm(x_TD, (D,), norm_w_D, eps)
    else:
        h_TD = F.layer_norm(x_TD, (D,), norm_w_D, norm_b_D, eps)
    p_T, expert_T = decode_router_ref(h_TD, router_DE)
    return x_TD + decode_experts_ref(h_TD, expert_T, p_T, w1_EDF, w2_EFD, activation)


if HAS_TRITON:
    @triton.jit
    def _expert_rows(match, rank, count, m0, TP: tl.constexpr, BLOCK_M: tl.constexpr):
        # rows m0 .. m0+BLOCK_M of expert e's tokens, in token order: (token ids, row valid);
        # each row picks the token of its rank (a BLOCK_M × TP select: cheaper than a sort)
        t = tl.arange(0, TP)
        j = m0 + tl.arange(0, BLOCK_M)
        hit = match[None, :] & (rank[None, :] == j[:, None])
        return tl.sum(tl.where(hit, t[None, :], 0), axis=1).to(tl.int64), j < count

    @triton.jit
    def _round_to(v, dtype: tl.constexpr, RTNE_BY_HAND: tl.constexpr):
        # fp32 v rounded to dtype, to nearest even as the GPU's cvt.rn does. Triton's interpreter (3.9)
        # truncates fp32 -> bf16 (with fp_downcast_rounding="rtne" too), which biases h and can flip a
        # near tie of the router: there, round the fp32 bits first, so that truncating them is exact
        if RTNE_BY_HAND and dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            v = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _norm_router_kernel(x_ptr, nw_ptr, nb_ptr, r_ptr, h_ptr, p_ptr, e_ptr, T, D, E, eps, NORM: tl.constexpr,
                            HAS_NB: tl.constexpr, RTNE_BY_HAND: tl.constexpr, PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EP: tl.constexpr):
        # BLOCK_T tokens a program, whole rows in one load and one tl.dot: no K loop (at decode each
        # serial load is about a µs of latency, and a loop of them adds up).
        # NORM 0: h = x (no store); 1: LayerNorm; 2: RMSNorm. Statistics in fp32, mean then squared
        # deviations, as torch's norms.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, BLOCK_D)
        c = tl.arange(0, EP)
        t_ok, k_ok, c_ok = t < T, k < D, c < E
        m = t_ok[:, None] & k_ok[None, :]
        rows = t.to(tl.int64)[:, None] * D + k[None, :]
        a = tl.load(x_ptr + rows, mask=m, other=0.0)
        r = tl.load(r_ptr + k[:, None] * E + c[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if NORM != 0:
            dev = a.to(tl.float32)
            if NORM == 1:
                dev = tl.where(m, dev - (tl.sum(dev, axis=1) / D)[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / D + eps)
            h = dev * rstd[:, None] * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_NB:
                h += tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            # the norm's output in x's dtype: what the experts and the logits take, as in torch
            a = _round_to(h, h_ptr.dtype.element_ty, RTNE_BY_HAND)
            tl.store(h_ptr + rows, a, mask=m)
        if UPCAST:
            a, r = a.to(tl.float32), r.to(tl.float32)
        acc = tl.dot(a, r, input_precision=PRECISION)
        # logits in x's dtype (as h @ router in torch), softmax in fp32, top-1 by max
        logit = _round_to(acc, x_ptr.dtype.element_ty, RTNE_BY_HAND).to(tl.float32)
        logit = tl.where(c_ok[None, :], logit, float("-inf"))
        top = tl.max(logit, axis=1)
        total = tl.sum(tl.exp(logit - top[:, None]), axis=1)
        # the largest probability is exp(0) / total; its expert, the first of the largest logits
        first = tl.min(tl.where(logit == top[:, None], c[None, :], EP), axis=1)
        tl.store(p_ptr + t, 1.0 / total, mask=t_ok)
        tl.store(e_ptr + t, first.to(tl.int64), mask=t_ok)

    @triton.jit
    def _expert_kernel(h_ptr, expert_ptr, w1_ptr, w2_ptr, part_ptr, T, E, D, F, N, ACT: tl.constexpr,
                       EVEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, RTNE_BY_HAND: tl.constexpr,
                       TP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        # part[g, tok] = act(h[tok] @ w1[e][:, fblock g]) @ w2[e][fblock g, :] for the tokens tok of
        # expert e: the share of hidden units g of y[tok] (before p), in fp32. Every token has one
        # expert, so each (g, tok) row is written by exactly one program: no atomics, no zero fill.
        # EVEN (the blocks tile D, F and N): weight tiles load unmasked (sm_90, bf16, the target
        # shape: 128 registers a thread instead of 166 in ptxas, so 4 programs an SM instead of 3).
        # items (expert, F-block) e·G + g, strided over the programs: one each when the grid has E·G
        # programs, several when it is sized to the GPU (config "per_sm": no partial last wave)
        G = tl.cdiv(F, BLOCK_F)
        for item in range(tl.program_id(0), E * G, tl.num_programs(0)):
            e = item // G
            g = item % G
            f = g * BLOCK_F + tl.arange(0, BLOCK_F)
            f_ok = f < F
            w1_e = w1_ptr + e.to(tl.int64) * D * F
            w2_e = w2_ptr + e.to(tl.int64) * F * N
            part_g = part_ptr + g.to(tl.int64) * T * N
            # expert e's tokens (loaded here, not in a helper: torch's mutation analysis of the kernel
            # takes a pointer passed to a tl function for written, and would clone it around the call)
            t = tl.arange(0, TP)
            match = tl.load(expert_ptr + t, mask=t < T, other=-1) == e
            rank = tl.cumsum(match.to(tl.int32), axis=0) - 1
            count = tl.sum(match.to(tl.int32), axis=0)
            for m0 in range(0, count, BLOCK_M):        # no iteration, no weight read, for an unused expert
                tok, ok = _expert_rows(match, rank, count, m0, TP, BLOCK_M)
                acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < D
                    a = tl.load(h_ptr + tok[:, None] * D + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                    if EVEN:
                        b = tl.load(w1_e + k[:, None] * F + f[None, :])
                    else:
                        b = tl.load(w1_e + k[:, None] * F + f[None, :], mask=k_ok[:, None] & f_ok[None, :], other=0.0)
                    if UPCAST:
                        a, b = a.to(tl.float32), b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=PRECISION)
                if ACT == 0:
                    acc = tl.maximum(acc, 0.0)
                else:                                  # exact gelu, as F.gelu's default (approximate='none')
                    acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
                # rounded to x's dtype, as the reference (and grouped_mm) store the hidden state; columns
                # past F are act(0) = 0 and meet zeroed rows of w2
                hid = _round_to(acc, h_ptr.dtype.element_ty, RTNE_BY_HAND)
                if UPCAST:
                    hid = hid.to(tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = n < N
                    if EVEN:
                        b = tl.load(w2_e + f[:, None] * N + n[None, :])
                    else:
                        b = tl.load(w2_e + f[:, None] * N + n[None, :], mask=f_ok[:, None] & n_ok[None, :], other=0.0)
                    if UPCAST:
                        b = b.to(tl.float32)
                    y = tl.dot(hid, b, input_precision=PRECISION)
                    tl.store(part_g + tok[:, None] * N + n[None, :], y, mask=ok[:, None] & n_ok[None, :])

    @triton.jit
    def _combine_kernel(part_ptr, p_ptr, x_ptr, y_ptr, T, N, G, HAS_RES: tl.constexpr, RTNE_BY_HAND: tl.constexpr,
                        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
        # y[t] = (x[t] +) p[t] · Σ_g part[g, t], rounded once to y's dtype
        t = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, G, BLOCK_G):
            g = g0 + tl.arange(0, BLOCK_G)
            rows = (g.to(tl.int64) * T + t) * N
            acc += tl.load(part_ptr + rows[:, None] + n[None, :], mask=(g < G)[:, None] & n_ok[None, :], other=0.0)
        y = tl.sum(acc, axis=0) * tl.load(p_ptr + t).to(tl.float32)
        if HAS_RES:
            y += tl.load(x_ptr + t * N + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * N + n, _round_to(y, y_ptr.dtype.element_ty, RTNE_BY_HAND), mask=n_ok)

    def _block(width: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(width)))     # tl.dot wants every side >= 16

    def _interpreted(kernel) -> bool:
        return type(kernel).__name__ == "InterpretedFunction"

    def _dot_args(dtype: torch.dtype, kernel) -> dict:
        # fp32 inputs: IEEE dots, not TF32 (bf16/fp16 ignore the precision). Triton's interpreter
        # (3.9) multiplies bf16 dot operands as their raw uint16 bits: when interpreted, upcast first.
        # Exact: a product of two bf16 values fits in fp32, as in the GPU's MMA.
        return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=_interpreted(kernel))

    def _norm_router(x_TD: torch.Tensor, norm_w_D: torch.Tensor | None, norm_b_D: torch.Tensor | None,
                     eps: float, norm: int, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_TD, p_T, expert_T); norm 0 (none: h_TD is x_TD), 1 LayerNorm, 2 RMSNorm."""
        (T, D), E = x_TD.shape, router_DE.shape[1]
        h_TD = torch.empty_like(x_TD) if norm else x_TD
        p_T = torch.empty(T, dtype=torch.float32, device=x_TD.device)
        expert_T = torch.empty(T, dtype=torch.int64, device=x_TD.device)
        EP, BLOCK_D = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(D))
        nw = norm_w_D if norm_w_D is not None else router_DE        # unread without a norm
        # 16 tokens (tl.dot's minimum) a program, each a (16, D) tile: 64 fp32 registers a thread
        # at D = 512 and 4 warps, hence more warps for wider rows
        wrap_triton(_norm_router_kernel)[(triton.cdiv(T, 16),)](
            x_TD, nw, norm_b_D if norm_b_D is not None else nw, router_DE, h_TD, p_T, expert_T, T, D, E, eps,
            NORM=norm, HAS_NB=norm_b_D is not None, RTNE_BY_HAND=_interpreted(_norm_router_kernel), BLOCK_T=16,
            BLOCK_D=BLOCK_D, EP=EP, num_warps=min(16, max(4, BLOCK_D // 128)),
            **_dot_args(x_TD.dtype, _norm_router_kernel))
        return h_TD, p_T, expert_T

    @functools.cache
    def _sm_count(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _expert_partials(h_TD: torch.Tensor, expert_T: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                         activation: str, config: dict = EXPERT_CONFIG) -> torch.Tensor:
        """part_GTN (G = F/BLOCK_F, T, N) fp32: each block of hidden units' share of y, p not applied.
        config: EXPERT_CONFIG's keys (scripts/bench_moe_decode.py passes others)."""
        (T, D), (E, _, F), N = h_TD.shape, w1_EDF.shape, w2_EFD.shape[2]
        BLOCK_K, BLOCK_F = _block(D, config["BLOCK_K"]), _block(F, config["BLOCK_F"])
        BLOCK_N = _block(N, config["BLOCK_N"])
        G = triton.cdiv(F, BLOCK_F)
        part_GTN = torch.empty(G, T, N, dtype=torch.float32, device=h_TD.device)
        # BLOCK_M = 16 (tl.dot's minimum): a few tokens per expert at decode
        programs = E * G
        if config.get("per_sm") and h_TD.is_cuda:
            programs = min(programs, config["per_sm"] * _sm_count(h_TD.device))
        programs = config.get("programs", programs)       # tests: a few programs looping over items
        wrap_triton(_expert_kernel)[(programs,)](
            h_TD, expert_T, w1_EDF, w2_EFD, part_GTN, T, E, D, F, N, ACT=_ACT_IDS[activation],
            EVEN=D % BLOCK_K == 0 and F % BLOCK_F == 0 and N % BLOCK_N == 0,
            TP=max(16, triton.next_power_of_2(T)), BLOCK_M=16, BLOCK_K=BLOCK_K, BLOCK_F=BLOCK_F, BLOCK_N=BLOCK_N,
            num_warps=config["num_warps"], num_stages=config["num_stages"], RTNE_BY_HAND=_interpreted(_expert_kernel),
            **_dot_args(h_TD.dtype, _expert_kernel))
        return part_GTN

    def _combine(part_GTN: torch.Tensor, p_T: torch.Tensor, x_TD: torch.Tensor, residual: bool) -> torch.Tensor:
        """p_T · Σ_g part_GTN[g] (+ x_TD with residual), in x's dtype."""
        G, T, N = part_GTN.shape
        y_TN = torch.empty(T, N, dtype=x_TD.dtype, device=x_TD.device)
        BLOCK_N = _block(N, 128)
        # T × N/128 programs (256 at T=64, N=512), each summing G partial rows of 512 bytes
        wrap_triton(_combine_kernel)[(T, triton.cdiv(N, BLOCK_N))](
            part_GTN, p_T, x_TD, y_TN, T, N, G, HAS_RES=residual, RTNE_BY_HAND=_interpreted(_combine_kernel),
            BLOCK_G=min(32, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N, num_warps=4)
        return y_TN

    @lazy_triton_op("moebench::decode_router", mutates_args=())
    def _decode_router_op(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, p_T, expert_T = _norm_router(x_TD, None, None, 0.0, 0, router_DE)
        return p_T, expert_T

    @lazy_triton_op("moebench::decode_experts", mutates_args=())
    def _decode_experts_op(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                           w2_EFD: torch.Tensor, activation: str) -> torch.Tensor:
        part_GTN = _expert_partials(x_TD, expert_T, w1_EDF, w2_EFD, activation)
        return _combine(part_GTN, p_T, x_TD, residual=False)

    @lazy_triton_op("moebench::decode_moe_residual", mutates_args=())
    def _decode_moe_residual_op(x_TD: torch.Tensor, norm_w_D: torch.Tensor, norm_b_D: torch.Tensor | None, eps: float,
                                rms: bool, router_DE: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                                activation: str) -> torch.Tensor:
        h_TD, p_T, expert_T = _norm_router(x_TD, norm_w_D, norm_b_D, eps, 2 if rms else 1, router_DE)
        part_GTN = _expert_partials(h_TD, expert_T, w1_EDF, w2_EFD, activation)
        return _combine(part_GTN, p_T, x_TD, residual=True)


def _check_experts(fn: str, x_TD: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, activation: str,
                   inputs: tuple[torch.Tensor | None, ...]) -> None:
    """What decode_experts and decode_moe_residual both need of their arguments; errors name `fn`."""
    if not HAS_TRITON:
        raise RuntimeError(f"{fn} needs triton; use {fn}_ref")
    if activation not in _ACT_IDS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACT_IDS)}")
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in inputs):
        raise RuntimeError(f"{fn} has no backward: call it under torch.no_grad() / inference_mode()")
    if x_TD.dim() != 2 or not 1 <= x_TD.shape[0] <= MAX_DECODE_T:
        raise ValueError(f"{fn} takes (T, D) with 1..{MAX_DECODE_T} tokens, got x {tuple(x_TD.shape)}; "
                         f"use the grouped path")
    if w1_EDF.dim() != 3 or w2_EFD.dim() != 3 or w1_EDF.shape[1] != x_TD.shape[1] or \
            w2_EFD.shape[:2] != (w1_EDF.shape[0], w1_EDF.shape[2]):
        raise ValueError(f"{fn} shapes: x {tuple(x_TD.shape)}, w1 {tuple(w1_EDF.shape)} (E, D, F), "
                         f"w2 {tuple(w2_EFD.shape)} (E, F, N)")
    if x_TD.dtype not in (torch.float32, torch.bfloat16, torch.float16) or \
            not w1_EDF.dtype == w2_EFD.dtype == x_TD.dtype:
        raise TypeError(f"{fn} dtypes: x {x_TD.dtype}, w1 {w1_EDF.dtype}, w2 {w2_EFD.dtype}; "
                        f"one of fp32, bf16, fp16 for all three")
    if not (w1_EDF.is_contiguous() and w2_EFD.is_contiguous()):   # a silent copy would be 2 × E·D·F per step
        raise ValueError("w1_EDF and w2_EFD must be contiguous")


def decode_experts(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                   w2_EFD: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """y_TD (T, Dout) in x's dtype: token t through expert expert_T[t], scaled by p_T[t] (top-1, dropless).

    x_TD (T, D) bf16/fp16/fp32; expert_T (T,) int64/int32, every id in [0, E) (not checked: that would
    sync; a row with another id is left uninitialised); p_T (T,) float; w1_EDF (E, D, F) and w2_EFD
    (E, F, Dout) contiguous, in x's dtype. 1 <= T <= MAX_DECODE_T. Forward only (decoding, no_grad).
    One expert kernel and a combine (kernels 2 and 3 of the module docstring)."""
    _check_experts("decode_experts", x_TD, w1_EDF, w2_EFD, activation, (x_TD, p_T, w1_EDF, w2_EFD))
    T = x_TD.shape[0]
    if tuple(expert_T.shape) != (T,) or tuple(p_T.shape) != (T,):
        raise ValueError(f"shapes: x {tuple(x_TD.shape)}, expert {tuple(expert_T.shape)}, p {tuple(p_T.shape)}")
    if expert_T.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert_T must be int64 or int32, got {expert_T.dtype}")
    _decode_experts_op.register()                     # the op exists from its first call on (ops/lazy_op.py)
    return torch.ops.moebench.decode_experts(x_TD.contiguous(), expert_T.contiguous(), p_T.contiguous(),
                                             w1_EDF, w2_EFD, activation)


def decode_router(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_T fp32, expert_T int64): decode_router_ref's top-1 routing in one launch (a matmul, the
    softmax and the max, where torch takes three kernels); p agrees to fp32 rounding, the expert
    exactly unless two logits tie (then the first, as torch's max). The sublayer's router kernel
    without its norm."""
    if not HAS_TRITON:
        raise RuntimeError("decode_router needs triton; use decode_router_ref")
    T = x_TD.shape[0]
    if not 1 <= T <= MAX_DECODE_T or router_DE.shape[0] != x_TD.shape[1] or router_DE.dtype != x_TD.dtype:
        raise ValueError(f"decode_router: x {tuple(x_TD.shape)} {x_TD.dtype}, router {tuple(router_DE.shape)} "
                         f"{router_DE.dtype}; 1..{MAX_DECODE_T} tokens, same dtype")
    _decode_router_op.register()                     # the op exists from its first call on (ops/lazy_op.py)
    return torch.ops.moebench.decode_router(x_TD.contiguous(), router_DE.contiguous())


def decode_moe_residual(x_TD: torch.Tensor, norm_w_D: torch.Tensor, norm_b_D: torch.Tensor | None,
                        eps: float | None, router_DE: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                        activation: str = "relu", *, rms: bool = False) -> torch.Tensor:
    """out_TD = x_TD + MoE(norm(x_TD)) in x's dtype, a pre-norm top-1 dropless MoE sublayer of a
    decode step in three launches (norm + router, experts, combine; see the module docstring).

    norm: LayerNorm over D with weight norm_w_D and bias norm_b_D (None: no bias), or with rms=True
    RMSNorm (weight only; eps None: torch.finfo(x.dtype).eps, as nn.RMSNorm). x_TD (T, D)
    bf16/fp16/fp32, 1 <= T <= MAX_DECODE_T; router_DE (D, E); w1_EDF (E, D, F) and w2_EFD (E, F, D)
    contiguous; every weight in x's dtype. Forward only (decoding, no_grad).

    Against decode_moe_residual_ref: the combine rounds x + p · y once where the reference rounds
    y to x's dtype and then x + y (a bf16 rounding of y fewer), and the router's logits are fp32 sums
    in another order, so a near tie of two experts' logits may route a token differently."""
    _check_experts("decode_moe_residual", x_TD, w1_EDF, w2_EFD, activation,
                   (x_TD, norm_w_D, norm_b_D, router_DE, w1_EDF, w2_EFD))
    D = x_TD.shape[1]
    if w2_EFD.shape[2] != D:
        raise ValueError(f"decode_moe_residual: the experts' output width {w2_EFD.shape[2]} must be x's {D} "
                         f"(the residual)")
    if tuple(router_DE.shape) != (D, w1_EDF.shape[0]):
        raise ValueError(f"decode_moe_residual: router {tuple(router_DE.shape)}, expected (D, E) = "
                         f"{(D, w1_EDF.shape[0])}")
    if tuple(norm_w_D.shape) != (D,) or (norm_b_D is not None and tuple(norm_b_D.shape) != (D,)):
        raise ValueError(f"decode_moe_residual: norm weight {tuple(norm_w_D.shape)}, bias "
                         f"{None if norm_b_D is None else tuple(norm_b_D.shape)}; expected ({D},)")
    if rms and norm_b_D is not None:
        raise ValueError("decode_moe_residual: RMSNorm (rms=True) takes no bias; pass norm_b_D=None")
    if eps is None and not rms:
        raise ValueError("decode_moe_residual: LayerNorm needs an eps (only RMSNorm's may be None)")
    others = (norm_w_D, router_DE) + (() if norm_b_D is None else (norm_b_D,))
    if any(w.dtype != x_TD.dtype for w in others):
        raise TypeError(f"decode_moe_residual wants the norm and router weights in x's dtype {x_TD.dtype}, got "
                        f"{sorted({str(w.dtype) for w in others})}")
    eps = torch.finfo(x_TD.dtype).eps if eps is None else float(eps)
    _decode_moe_residual_op.register()                     # the op exists from its first call on (ops/lazy_op.py)
    return torch.ops.moebench.decode_moe_residual(
        x_TD.contiguous(), norm_w_D.contiguous(), None if norm_b_D is None else norm_b_D.contiguous(), eps, rms,
        router_DE.contiguous(), w1_EDF, w2_EFD, activation)
