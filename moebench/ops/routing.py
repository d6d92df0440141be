"""The routing of the grouped MoE path (moebench/models/moe.py), each op as a plain-torch reference
beside its Triton twin, as mamba-ssm keeps selective_scan_ref beside selective_scan_fn:

    plan_grouped   the plan: a counting sort of the T·K assignments by expert (torch: about fifteen
                   ops; Triton: route_plan, three small kernels, the same plan bitwise)
    dispatch       x_SD = x_TD[tok_S], whose backward sums the gradients over k   (gather_sum_ref | gather_sum)
    combine        y_TD = Σ_k p·out_SD[row]                                      (gather_sum_ref | gather_sum)
                   and its backward                                              (combine_bwd_ref | combine_bwd)

`fused` picks the twin (the model's Impl.routing == "triton"). Each Triton gather is one pass over
the rows it reads and writes, where the torch reference takes an index_select, a broadcast
multiply, a torch.where and a sum, each a full pass over a (T, D) tensor.

Shape suffixes as in moe.py: T tokens, K choices, N = K·T assignments (n = k·T + t), S = N buffer
rows, D width. row_N maps an assignment to its buffer row, n_S is its inverse; keep_N marks the
kept assignments. Dropped rows of the buffer are never read (masked loads, or torch.where), so the
uninitialised memory grouped_mm leaves there cannot leak in.

Sums over k and the dot products of the router gradient accumulate in fp32 and round once in the
Triton gathers: the reference rounds after each bf16 operation, so the two agree to bf16 rounding,
not bitwise. The Triton ops are torch.library triton_ops, so torch.compile traces them. On a CPU they
run under Triton's interpreter (TRITON_INTERPRET=1 before the first import of triton), which the
CPU tests use.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from moebench.ops.lazy_op import lazy_triton_op
    HAS_TRITON = True
except ImportError:                    # a CPU box without triton: the torch reference only
    HAS_TRITON = False


# ---- the torch references, and the autograd functions that pick a twin ---------------------------


class Plan(NamedTuple):
    offs_E: torch.Tensor    # (E,) int32 cumulative ends of the kept rows of each expert
    counts_E: torch.Tensor  # (E,) int32 assignments per expert before dropping (valid tokens only)
    n_S: torch.Tensor       # (S,) int64 the assignment n = k·T + t held by buffer row s
    row_N: torch.Tensor     # (N,) int64 the buffer row of assignment n (inverse of n_S)
    keep_N: torch.Tensor    # (N,) bool assignment n is kept
    tok_S: torch.Tensor     # (S,) int64 the token of buffer row s: n_S mod T


def plan_grouped(top_i_TK: torch.Tensor, valid_T: torch.Tensor | None, n_expert: int,
                 capacity: int | torch.Tensor | None, fused: bool = False) -> Plan:
    """Counting sort of the T·K assignments by expert: static shapes, no host sync.

    Invalid tokens go to a virtual column E. Rank r (1-based) of assignment n is its place among
    the assignments of its column in priority order n = k·T + t, so capacity keeps ranks <= cap.
    Buffer layout: the kept rows of expert 0, 1, ..., E-1 (offs_E), then the dropped rows of expert
    0, 1, ..., E-1, then the invalid ones, each segment in n order. fused=True computes the same
    plan, bitwise, with three Triton kernels (route_plan below); this is its reference.
    """
    T, K = top_i_TK.shape
    N, E, dev = T * K, n_expert, top_i_TK.device
    expert_N = top_i_TK.t().reshape(N)                   # n = k·T + t: choice rank first, then position
    col_N = expert_N if valid_T is None else torch.where(valid_T.repeat(K), expert_N, E)
    if fused:
        row_N, keep_N, n_S, tok_S, offs_E, counts_E = route_plan(col_N, T, E, *_cap_args(capacity))
        return Plan(offs_E, counts_E, n_S, row_N, keep_N, tok_S)
    # (E+1, N), so that the running count is a scan along the contiguous last dim: CUDA scans an
    # outer dim with one thread per column, i.e. 32 threads walking 32k rows (milliseconds)
    cum_CN = (torch.arange(E + 1, device=dev)[:, None] == col_N[None, :]).cumsum(1, dtype=torch.int32)
    counts_C = cum_CN[:, -1]
    rank_N = cum_CN.gather(0, col_N[None, :]).squeeze(0)
    is_expert_C = torch.arange(E + 1, device=dev) < E
    if capacity is None:
        kept_C = counts_C
    elif isinstance(capacity, torch.Tensor):
        kept_C = torch.minimum(counts_C, capacity.int())
    else:
        kept_C = counts_C.clamp(max=capacity)
    kept_C = torch.where(is_expert_C, kept_C, 0)
    offs_C = kept_C.cumsum(0, dtype=torch.int32)
    drops_C = counts_C - kept_C
    drop_base_C = offs_C[-1] + drops_C.cumsum(0, dtype=torch.int32) - drops_C
    kept_N = kept_C[col_N]
    keep_N = rank_N <= kept_N
    row_N = torch.where(keep_N, (offs_C - kept_C)[col_N] + rank_N - 1, drop_base_C[col_N] + rank_N - kept_N - 1).long()
    n_S = torch.empty_like(row_N).scatter_(0, row_N, torch.arange(N, device=dev))   # invert n -> row
    return Plan(offs_C[:E], counts_C[:E], n_S, row_N, keep_N, n_S % T)


def _cap_args(capacity) -> tuple:
    """(mode, int, tensor) for the kernel: 0 dropless, 1 a Python int, 2 a device tensor."""
    if capacity is None:
        return 0, 0, None
    if isinstance(capacity, torch.Tensor):
        return 2, 0, capacity.reshape(1).int()
    return 1, int(capacity), None


# The buffer rows are a permutation of the assignments (row_N and its inverse n_S), so dispatch and
# combine are gathers in both directions: no index_add_, hence no atomics. Rows after offs_E[-1]
# (dropped assignments) hold grouped_mm's uninitialised memory, possibly inf/NaN, in the output and
# in the input gradient; they are excluded by selection (torch.where), never by multiplying with 0.


def _sum_over_k(v_ND: torch.Tensor, T: int) -> torch.Tensor:
    # plain additions in choice order, like the loop path; `sum` would be promoted to fp32 by autocast
    out = v_ND[:T]
    for k in range(1, v_ND.shape[0] // T):
        out = out + v_ND[k * T:(k + 1) * T]
    return out


def gather_sum_ref(src_SD: torch.Tensor, w_N: torch.Tensor, row_N: torch.Tensor, keep_N: torch.Tensor,
                   T: int, has_w: bool) -> torch.Tensor:
    """(T, D): Σ_k keep·w·src_SD[row_N[k·T + t]] in src's dtype (w_N cast to it); w ignored unless has_w."""
    v_ND = src_SD.index_select(0, row_N)
    if has_w:
        v_ND = v_ND * w_N.to(src_SD.dtype)[:, None]
    return _sum_over_k(torch.where(keep_N[:, None], v_ND, 0), T)


def combine_bwd_ref(g_TD: torch.Tensor, out_SD: torch.Tensor, w_N: torch.Tensor, n_S: torch.Tensor,
                    keep_N: torch.Tensor, want_out: bool, want_p: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of combine: g_out_SD[s] = keep·w·g_TD[t] for the assignment n = n_S[s] of token t
    (w_N in out's dtype, as combine's reference saved it); g_p_N[n] = keep·<g_TD[t], out_SD[row(n)]>
    in fp32. None for what is not wanted."""
    T = g_TD.shape[0]
    K = keep_N.shape[0] // T
    g_ND = g_TD.repeat(K, 1) if K > 1 else g_TD           # n = k·T + t reads g_TD[t]
    g_out = g_p = None
    if want_out:
        # row s of the buffer holds assignment n_S[s]: gather back through the inverse permutation
        g_out = torch.where(keep_N[:, None], g_ND * w_N[:, None], 0).index_select(0, n_S)
    if want_p:
        row_N = torch.empty_like(n_S).scatter_(0, n_S, torch.arange(len(n_S), device=n_S.device))
        o_ND = out_SD.index_select(0, row_N)
        g_p = torch.where(keep_N, (g_ND.float() * o_ND.float()).sum(-1), 0)
    return g_out, g_p


class Dispatch(torch.autograd.Function):
    """x_SD = x_TD[tok_S]; backward: g_TD[t] = Σ_k g_SD[row(k·T + t)] over kept assignments."""

    @staticmethod
    def forward(ctx, x_TD, tok_S, row_N, keep_N, fused: bool):
        ctx.save_for_backward(row_N, keep_N)
        ctx.T, ctx.fused = x_TD.shape[0], fused
        return x_TD.index_select(0, tok_S)

    @staticmethod
    def backward(ctx, g_SD):
        row_N, keep_N = ctx.saved_tensors
        # row_N stands in for the unused weights
        g_TD = (gather_sum if ctx.fused else gather_sum_ref)(g_SD, row_N, row_N, keep_N, ctx.T, False)
        return g_TD, None, None, None, None


class Combine(torch.autograd.Function):
    """y_TD[t] = Σ_k p_N[n] · out_SD[row_N[n]] over the kept assignments n = k·T + t."""

    @staticmethod
    def forward(ctx, out_SD, p_N, row_N, keep_N, n_S, T: int, fused: bool):
        ctx.fused = fused
        # the kernel multiplies and sums in fp32; the reference in out's dtype, as the loop path does
        w_N = p_N if fused else p_N.to(out_SD.dtype)
        ctx.save_for_backward(out_SD, w_N, keep_N, n_S)
        return (gather_sum if fused else gather_sum_ref)(out_SD, w_N, row_N, keep_N, T, True)

    @staticmethod
    def backward(ctx, g_TD):
        out_SD, w_N, keep_N, n_S = ctx.saved_tensors
        want_out, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_out, g_p = (combine_bwd if ctx.fused else combine_bwd_ref)(g_TD, out_SD, w_N, n_S, keep_N, want_out, want_p)
        return g_out if want_out else None, g_p if want_p else None, None, None, None, None, None


def dispatch(x_TD: torch.Tensor, plan: Plan, fused: bool) -> torch.Tensor:
    """The expert-sorted buffer x_SD (kept rows first, grouped by expert: plan.offs_E)."""
    return Dispatch.apply(x_TD, plan.tok_S, plan.row_N, plan.keep_N, fused)


def combine(out_SD: torch.Tensor, p_N: torch.Tensor, plan: Plan, T: int, fused: bool) -> torch.Tensor:
    """y_TD: each token's kept expert outputs weighted by their router probabilities p_N (fp32)."""
    return Combine.apply(out_SD, p_N, plan.row_N, plan.keep_N, plan.n_S, T, fused)


# ---- the Triton twins --------------------------------------------------------------------------

if HAS_TRITON:
    @triton.jit
    def _gather_sum_kernel(src_ptr, w_ptr, row_ptr, keep_ptr, out_ptr, T, D,
                           K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[t] = Σ_k keep[n] · w[n] · src[row[n]] with n = k·T + t (w = 1 without HAS_W)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        t_ok, d_ok = t < T, d < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(K):
            n = k * T + t
            keep = (tl.load(keep_ptr + n, mask=t_ok, other=0) != 0) & t_ok
            row = tl.load(row_ptr + n, mask=t_ok, other=0).to(tl.int64)
            v = tl.load(src_ptr + row[:, None] * D + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
            v = v.to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + n, mask=keep, other=0.0).to(tl.float32)[:, None]
            acc += v
        out = out_ptr + t.to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_bwd_kernel(g_ptr, out_ptr, w_ptr, nS_ptr, keep_ptr, gout_ptr, gp_ptr, T, S, D,
                            WANT_OUT: tl.constexpr, WANT_P: tl.constexpr,
                            BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # row s holds assignment n = n_S[s] of token t = n mod T:
        #   g_out[s] = keep[n] · w[n] · g[t]        g_p[n] = keep[n] · <g[t], out[s]>
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        n = tl.load(nS_ptr + s, mask=s_ok, other=0).to(tl.int64)
        keep = (tl.load(keep_ptr + n, mask=s_ok, other=0) != 0) & s_ok
        t = n % T
        w = tl.load(w_ptr + n, mask=keep, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            m = keep[:, None] & d_ok[None, :]
            g = tl.load(g_ptr + t[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
            if WANT_OUT:
                tl.store(gout_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                         (g * w[:, None]).to(gout_ptr.dtype.element_ty), mask=s_ok[:, None] & d_ok[None, :])
            if WANT_P:
                o = tl.load(out_ptr + s.to(tl.int64)[:, None] * D + d[None, :], mask=m, other=0.0)
                dot += tl.sum(g * o.to(tl.float32), axis=1)
        if WANT_P:
            tl.store(gp_ptr + n, dot, mask=s_ok)

    def _blocks(D: int) -> int:
        return min(triton.next_power_of_2(D), 256)

    @lazy_triton_op("moebench::gather_sum", mutates_args=())
    def gather_sum(src_SD: torch.Tensor, w_N: torch.Tensor, row_N: torch.Tensor, keep_N: torch.Tensor,
                   T: int, has_w: bool) -> torch.Tensor:
        """(T, D): Σ_k keep·w·src_SD[row_N[k·T + t]]; w_N is ignored when has_w is False."""
        src_SD = src_SD.contiguous()
        K, D = row_N.shape[0] // T, src_SD.shape[1]
        out_TD = torch.empty(T, D, dtype=src_SD.dtype, device=src_SD.device)
        BLOCK_T, BLOCK_D = 32, _blocks(D)
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
        wrap_triton(_gather_sum_kernel)[grid](src_SD, w_N, row_N, keep_N, out_TD, T, D,
                                             K=K, HAS_W=has_w, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
        return out_TD

    @lazy_triton_op("moebench::combine_bwd", mutates_args=())
    def combine_bwd(g_TD: torch.Tensor, out_SD: torch.Tensor, w_N: torch.Tensor, n_S: torch.Tensor,
                    keep_N: torch.Tensor, want_out: bool, want_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_out_SD in out_SD's dtype, g_p_N fp32); a tensor not wanted comes back empty."""
        g_TD, out_SD = g_TD.contiguous(), out_SD.contiguous()
        (T, D), S = g_TD.shape, out_SD.shape[0]
        g_out = torch.empty((S, D) if want_out else (0, D), dtype=out_SD.dtype, device=out_SD.device)
        g_p = torch.empty(S if want_p else 0, dtype=torch.float32, device=out_SD.device)
        BLOCK_S, BLOCK_D = 32, _blocks(D)
        wrap_triton(_combine_bwd_kernel)[(triton.cdiv(S, BLOCK_S),)](
            g_TD, out_SD, w_N, n_S, keep_N, g_out, g_p, T, S, D,
            WANT_OUT=want_out, WANT_P=want_p, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)
        return g_out, g_p

    # ---- the routing plan: a counting sort of the assignments by column, in three kernels -------
    # Column c of assignment n is its expert, or E for an invalid token. (1) per chunk of BLOCK
    # assignments, in parallel: the rank of n among its chunk's assignments of column c, and the
    # chunk's histogram; (2) one program: the count of c in earlier chunks (before_BC, a scan over the
    # chunks, SB at a time), the totals,
    # and per column its kept count and the first buffer row of its kept and of its dropped rows;
    # (3) per chunk, in parallel: each assignment's rank, keep flag and row, by plain gathers.

    @triton.jit
    def _plan_count_kernel(col_ptr, rank_ptr, hist_ptr, N, BLOCK: tl.constexpr, CP: tl.constexpr):
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        n_ok = n < N
        col = tl.load(col_ptr + n, mask=n_ok, other=0).to(tl.int32)
        c = tl.arange(0, CP)
        hit = ((col[:, None] == c[None, :]) & n_ok[:, None]).to(tl.int32)
        tl.store(rank_ptr + n, tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1), mask=n_ok)   # 1-based
        tl.store(hist_ptr + tl.program_id(0) * CP + c, tl.sum(hit, axis=0))

    @triton.jit
    def _plan_scan_kernel(hist_ptr, before_ptr, table_ptr, offs_ptr, counts_ptr, cap_ptr, cap, E, n_blocks,
                          CAP_MODE: tl.constexpr, CP: tl.constexpr, SB: tl.constexpr):
        # SB chunks' histograms at a time, scanned along the chunks (a loop over single chunks
        # waits on one load after another)
        c = tl.arange(0, CP)
        counts = tl.zeros((CP,), dtype=tl.int32)
        for b0 in range(0, n_blocks, SB):
            b = b0 + tl.arange(0, SB)
            at = b[:, None] * CP + c[None, :]
            ok = (b < n_blocks)[:, None]
            h = tl.load(hist_ptr + at, mask=ok, other=0)
            tl.store(before_ptr + at, tl.cumsum(h, axis=0) - h + counts[None, :], mask=ok)
            counts += tl.sum(h, axis=0)
        if CAP_MODE == 0:
            kept = counts
        elif CAP_MODE == 1:
            kept = tl.minimum(counts, cap)
        else:
            kept = tl.minimum(counts, tl.load(cap_ptr))
        kept = tl.where(c < E, kept, 0)       # the invalid column keeps nothing
        offs = tl.cumsum(kept, axis=0)
        drops = counts - kept
        # table rows: kept count, first row of the kept rows, first row of the dropped rows
        tl.store(table_ptr + c, kept)
        tl.store(table_ptr + CP + c, offs - kept)
        tl.store(table_ptr + 2 * CP + c, tl.sum(kept, axis=0) + tl.cumsum(drops, axis=0) - drops)
        tl.store(offs_ptr + c, offs, mask=c < E)
        tl.store(counts_ptr + c, counts, mask=c < E)

    @triton.jit
    def _plan_rows_kernel(col_ptr, rank_ptr, before_ptr, table_ptr, row_ptr, keep_ptr, nS_ptr, tokS_ptr, N, T,
                          BLOCK: tl.constexpr, CP: tl.constexpr):
        b = tl.program_id(0)
        n = b * BLOCK + tl.arange(0, BLOCK)
        n_ok = n < N
        col = tl.load(col_ptr + n, mask=n_ok, other=0).to(tl.int32)
        rank = tl.load(rank_ptr + n, mask=n_ok, other=0) + tl.load(before_ptr + b * CP + col, mask=n_ok, other=0)
        kept = tl.load(table_ptr + col, mask=n_ok, other=0)
        keep = rank <= kept
        row = tl.where(keep, tl.load(table_ptr + CP + col, mask=n_ok, other=0) + rank - 1,
                       tl.load(table_ptr + 2 * CP + col, mask=n_ok, other=0) + rank - kept - 1).to(tl.int64)
        tl.store(row_ptr + n, row, mask=n_ok)
        tl.store(keep_ptr + n, keep, mask=n_ok)
        n64 = n.to(tl.int64)
        tl.store(nS_ptr + row, n64, mask=n_ok)
        tl.store(tokS_ptr + row, n64 % T, mask=n_ok)

    @lazy_triton_op("moebench::route_plan", mutates_args=())
    def route_plan(col_N: torch.Tensor, T: int, n_expert: int, cap_mode: int, cap: int,
                   cap_t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
        """moe.plan_grouped's plan from the column (expert, or E for an invalid token) of each
        assignment -> (row_N, keep_N, n_S, tok_S, offs_E, counts_E); same layout, bitwise."""
        N, E, dev = col_N.shape[0], n_expert, col_N.device
        BLOCK, CP = (256 if N > 4096 else 64), triton.next_power_of_2(E + 1)
        n_blocks = triton.cdiv(N, BLOCK)
        i32 = dict(dtype=torch.int32, device=dev)
        rank_N, hist_BC, before_BC = torch.empty(N, **i32), torch.empty(n_blocks, CP, **i32), torch.empty(n_blocks, CP, **i32)
        table_3C, offs_E, counts_E = torch.empty(3, CP, **i32), torch.empty(E, **i32), torch.empty(E, **i32)
        row_N = torch.empty(N, dtype=torch.int64, device=dev)
        keep_N = torch.empty(N, dtype=torch.bool, device=dev)
        n_S, tok_S = torch.empty_like(row_N), torch.empty_like(row_N)
        wrap_triton(_plan_count_kernel)[(n_blocks,)](col_N, rank_N, hist_BC, N, BLOCK=BLOCK, CP=CP)
        wrap_triton(_plan_scan_kernel)[(1,)](hist_BC, before_BC, table_3C, offs_E, counts_E,
                                             cap_t if cap_t is not None else offs_E, cap, E, n_blocks,
                                             CAP_MODE=cap_mode, CP=CP, SB=min(64, triton.next_power_of_2(n_blocks)))
        wrap_triton(_plan_rows_kernel)[(n_blocks,)](col_N, rank_N, before_BC, table_3C, row_N, keep_N, n_S, tok_S,
                                                    N, T, BLOCK=BLOCK, CP=CP)
        return row_N, keep_N, n_S, tok_S, offs_E, counts_E
