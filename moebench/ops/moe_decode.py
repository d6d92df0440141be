"""The top-1, dropless MoE layer at decode time (a handful of tokens per step) in three Triton
launches: the router (logits, softmax, max), then the experts in two:

    y_TD[t] = p_T[t] · ( act(x_TD[t] @ w1_EDF[e_t]) @ w2_EFD[e_t] )      e_t = expert_T[t]

The grouped path (moebench/models/moe.py) takes about a dozen launches for this: the router's three,
a counting-sort plan, a gather, two grouped GEMMs, the activation, a combine. Here each program of the up kernel (grid E ×
F-blocks) and of the down kernel (grid E × Dout-blocks) finds its expert's tokens itself, from the T
expert ids, and streams its slice of that expert's weights once (when the expert has <= BLOCK_M
tokens, the common case at decode). An expert without tokens is skipped: its weights are never read.
Decode is bound by reading the weights, so block sizes are chosen for HBM bandwidth, not FLOPs.

Shape suffixes as in moe.py: T tokens, E experts, D width in, F hidden width, N width out (Dout).
h_TF, the activated hidden state, is stored in x's dtype (as grouped_mm's output is), in token order:
each token has exactly one expert, so no two programs write the same row. Products accumulate in
fp32 (fp32 inputs use IEEE dots, not TF32); the activation and the scaling by p_T run in fp32.

The op is a torch.library triton_op (torch.compile traces it) and never syncs with the host (static
grid, no data-dependent shapes), so it can be captured in a CUDA graph. On a CPU it runs under
Triton's interpreter (TRITON_INTERPRET=1 before triton's first import), as the tests do.
"""
from __future__ import annotations

import torch

from moebench.ops.experts import act_fn

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    HAS_TRITON = True
except ImportError:                    # a CPU box without triton: the torch reference only
    HAS_TRITON = False

MAX_DECODE_T = 256      # every program holds all T expert ids in registers (padded to a power of 2)
_ACT_IDS = {"relu": 0, "gelu": 1}


def decode_experts_ref(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                       w2_EFD: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """The spec, in plain torch: per-token gathered weights, fp32 products, h rounded to x's dtype as
    the kernel rounds it. Gathers T copies of an expert's weights: for tests, not for speed."""
    h_TF = act_fn(activation)(torch.einsum("td,tdf->tf", x_TD.float(), w1_EDF[expert_T].float()))
    h_TF = h_TF.to(x_TD.dtype).float()
    y_TD = torch.einsum("tf,tfn->tn", h_TF, w2_EFD[expert_T].float()) * p_T.float()[:, None]
    return y_TD.to(x_TD.dtype)


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
    def _up_kernel(x_ptr, expert_ptr, w1_ptr, h_ptr, T, D, F, ACT: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, TP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_F: tl.constexpr):
        # h[tok, fblock] = act(x[tok] @ w1[e][:, fblock]) for the tokens tok of expert e
        e = tl.program_id(0)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = f < F
        w_ptr = w1_ptr + e.to(tl.int64) * D * F
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
                a = tl.load(x_ptr + tok[:, None] * D + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + k[:, None] * F + f[None, :], mask=k_ok[:, None] & f_ok[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if ACT == 0:
                acc = tl.maximum(acc, 0.0)
            else:                                  # exact gelu, as F.gelu's default (approximate='none')
                acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
            tl.store(h_ptr + tok[:, None] * F + f[None, :], acc.to(h_ptr.dtype.element_ty),
                     mask=ok[:, None] & f_ok[None, :])

    @triton.jit
    def _down_kernel(h_ptr, expert_ptr, p_ptr, w2_ptr, y_ptr, T, F, N, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, TP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        # y[tok, nblock] = p[tok] · h[tok] @ w2[e][:, nblock] for the tokens tok of expert e
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_ptr = w2_ptr + e.to(tl.int64) * F * N
        t = tl.arange(0, TP)
        match = tl.load(expert_ptr + t, mask=t < T, other=-1) == e
        rank = tl.cumsum(match.to(tl.int32), axis=0) - 1
        count = tl.sum(match.to(tl.int32), axis=0)
        for m0 in range(0, count, BLOCK_M):
            tok, ok = _expert_rows(match, rank, count, m0, TP, BLOCK_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, F, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < F
                a = tl.load(h_ptr + tok[:, None] * F + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            p = tl.load(p_ptr + tok, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + tok[:, None] * N + n[None, :], (acc * p[:, None]).to(y_ptr.dtype.element_ty),
                     mask=ok[:, None] & n_ok[None, :])

    def _block(width: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(width)))     # tl.dot wants every side >= 16

    def _dot_args(dtype: torch.dtype, kernel) -> dict:
        # fp32 inputs: IEEE dots, not TF32 (bf16/fp16 ignore the precision). Triton's interpreter
        # (3.9) multiplies bf16 dot operands as their raw uint16 bits: when interpreted, upcast first.
        # Exact: a product of two bf16 values fits in fp32, as in the GPU's MMA.
        return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32",
                    UPCAST=type(kernel).__name__ == "InterpretedFunction")

    @triton.jit
    def _router_kernel(x_ptr, r_ptr, p_ptr, e_ptr, T, D, E, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, EP: tl.constexpr):
        # logits in x's dtype (as x @ router under autocast), softmax in fp32, top-1 by max
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.arange(0, EP)
        t_ok, c_ok = t < T, c < E
        acc = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < D
            a = tl.load(x_ptr + t.to(tl.int64)[:, None] * D + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(r_ptr + k[:, None] * E + c[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        logit = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        logit = tl.where(c_ok[None, :], logit, float("-inf"))
        top = tl.max(logit, axis=1)
        total = tl.sum(tl.exp(logit - top[:, None]), axis=1)
        # the largest probability is exp(0) / total; its expert, the first of the largest logits
        first = tl.min(tl.where(logit == top[:, None], c[None, :], EP), axis=1)
        tl.store(p_ptr + t, 1.0 / total, mask=t_ok)
        tl.store(e_ptr + t, first.to(tl.int64), mask=t_ok)

    @triton_op("moebench::decode_router", mutates_args=())
    def _decode_router_op(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (T, D), E = x_TD.shape, router_DE.shape[1]
        p_T = torch.empty(T, dtype=torch.float32, device=x_TD.device)
        expert_T = torch.empty(T, dtype=torch.int64, device=x_TD.device)
        wrap_triton(_router_kernel)[(triton.cdiv(T, 16),)](
            x_TD, router_DE, p_T, expert_T, T, D, E, BLOCK_T=16, BLOCK_K=_block(D, 64),
            EP=max(16, triton.next_power_of_2(E)), num_warps=4, **_dot_args(x_TD.dtype, _router_kernel))
        return p_T, expert_T

    @triton_op("moebench::decode_experts", mutates_args=())
    def _decode_experts_op(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                           w2_EFD: torch.Tensor, activation: str) -> torch.Tensor:
        (T, D), (E, _, F), N = x_TD.shape, w1_EDF.shape, w2_EFD.shape[2]
        h_TF = torch.empty(T, F, dtype=x_TD.dtype, device=x_TD.device)
        y_TD = torch.empty(T, N, dtype=x_TD.dtype, device=x_TD.device)
        # Static configs (no autotune: CUDA-graph capture). Measured on an H100 at E=32, D=N=512,
        # F=1536, T=64 and 128: 128-wide blocks (256-byte weight rows), 64-deep K steps, 4 warps were
        # best, at ~1.6-1.7 TB/s per kernel with L2 flushed; narrower blocks (more programs), deeper
        # pipelines, 8 warps, and swapping the dot's operands (so that wgmma runs) were no faster; nor
        # was splitting the down projection over F into 2 or 4 programs (fp32 partials and a sum:
        # 2-3.5 µs slower at T = 64, 11b00d3 + split). The two kernels' K loops stay inline: a pointer
        # passed to a tl function counts as written for torch's mutation analysis (see _up_kernel).
        # BLOCK_M = 16 (tl.dot's minimum): a few tokens per expert at decode.
        TP = max(16, triton.next_power_of_2(T))
        common = dict(TP=TP, BLOCK_M=16, num_warps=4, **_dot_args(x_TD.dtype, _up_kernel))
        BLOCK_F = _block(F, 128)
        wrap_triton(_up_kernel)[(E, triton.cdiv(F, BLOCK_F))](
            x_TD, expert_T, w1_EDF, h_TF, T, D, F, ACT=_ACT_IDS[activation], BLOCK_K=_block(D, 64),
            BLOCK_F=BLOCK_F, num_stages=3, **common)
        BLOCK_N = _block(N, 128)
        wrap_triton(_down_kernel)[(E, triton.cdiv(N, BLOCK_N))](
            h_TF, expert_T, p_T, w2_EFD, y_TD, T, F, N, BLOCK_K=_block(F, 64), BLOCK_N=BLOCK_N, num_stages=4,
            **common)
        return y_TD


def decode_experts(x_TD: torch.Tensor, expert_T: torch.Tensor, p_T: torch.Tensor, w1_EDF: torch.Tensor,
                   w2_EFD: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """y_TD (T, Dout) in x's dtype: token t through expert expert_T[t], scaled by p_T[t] (top-1, dropless).

    x_TD (T, D) bf16/fp16/fp32; expert_T (T,) int64/int32, every id in [0, E) (not checked: that would
    sync; a row with another id is left uninitialised); p_T (T,) float; w1_EDF (E, D, F) and w2_EFD
    (E, F, Dout) contiguous, in x's dtype. 1 <= T <= MAX_DECODE_T. Forward only (decoding, no_grad)."""
    if not HAS_TRITON:
        raise RuntimeError("decode_experts needs triton; use decode_experts_ref")
    if activation not in _ACT_IDS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACT_IDS)}")
    if torch.is_grad_enabled() and any(a.requires_grad for a in (x_TD, p_T, w1_EDF, w2_EFD)):
        raise RuntimeError("decode_experts has no backward: call it under torch.no_grad() / inference_mode()")
    (T, D), (E, D1, F), (E2, F2, N) = x_TD.shape, w1_EDF.shape, w2_EFD.shape
    if not 1 <= T <= MAX_DECODE_T:
        raise ValueError(f"decode_experts takes 1..{MAX_DECODE_T} tokens, got T={T}; use the grouped path")
    if (D1, E2, F2, tuple(expert_T.shape), tuple(p_T.shape)) != (D, E, F, (T,), (T,)):
        raise ValueError(f"shapes: x {tuple(x_TD.shape)}, expert {tuple(expert_T.shape)}, p {tuple(p_T.shape)}, "
                         f"w1 {tuple(w1_EDF.shape)}, w2 {tuple(w2_EFD.shape)}")
    if not (w1_EDF.dtype == w2_EFD.dtype == x_TD.dtype) or expert_T.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"dtypes: x {x_TD.dtype}, w1 {w1_EDF.dtype}, w2 {w2_EFD.dtype}, expert {expert_T.dtype}")
    if not (w1_EDF.is_contiguous() and w2_EFD.is_contiguous()):   # a silent copy would be 2 × E·D·F per step
        raise ValueError("w1_EDF and w2_EFD must be contiguous")
    return torch.ops.moebench.decode_experts(x_TD.contiguous(), expert_T.contiguous(), p_T.contiguous(),
                                             w1_EDF, w2_EFD, activation)


def decode_router_ref(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE.forward's top-1 router: logits in x's dtype, softmax in fp32, the largest probability."""
    p_T, expert_T = torch.softmax(x_TD @ router_DE, dim=-1, dtype=torch.float32).max(-1)
    return p_T, expert_T


def decode_router(x_TD: torch.Tensor, router_DE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_T fp32, expert_T int64): decode_router_ref's top-1 routing in one launch (a matmul, the
    softmax and the max, where torch takes three kernels); p agrees to fp32 rounding, the expert
    exactly unless two logits tie (then the first, as torch's max)."""
    if not HAS_TRITON:
        raise RuntimeError("decode_router needs triton; use decode_router_ref")
    T = x_TD.shape[0]
    if not 1 <= T <= MAX_DECODE_T or router_DE.shape[0] != x_TD.shape[1] or router_DE.dtype != x_TD.dtype:
        raise ValueError(f"decode_router: x {tuple(x_TD.shape)} {x_TD.dtype}, router {tuple(router_DE.shape)} "
                         f"{router_DE.dtype}; 1..{MAX_DECODE_T} tokens, same dtype")
    return torch.ops.moebench.decode_router(x_TD.contiguous(), router_DE.contiguous())
