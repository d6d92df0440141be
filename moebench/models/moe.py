"""Switch MoE (Fedus et al. 2021), the MoE layer of MoE-Mamba (Pióro et al. 2024): a softmax router
picks top_k experts per token, each expert a 2-layer MLP; experts over capacity drop assignments.

Shape suffixes (as in torchtitan's moe.py):
  T  tokens (batch × length, flattened)   E  experts      K  top-k choices per token
  D  input width d_in (w1) / output width d_out (w2)      F  expert hidden width (d_hidden)
  N  the T·K assignments in priority order n = k·T + t (all first choices, then second choices, ...)
  S  rows of the expert-sorted buffer (S = N): kept rows grouped by expert, dropped rows after them

Two implementations with identical semantics (tests/test_moe.py proves it):
  "grouped": counting sort of assignments by expert, one gather, two grouped GEMMs, one gather
             back; no host synchronisation and only static shapes when valid_T is None. On CUDA
             the plan and the gathers run as Triton kernels (moebench/ops/routing.py), whose
             reference is the torch code here (tests/test_routing.py).
  "loop":    a per-expert Python loop that decides capacity its own way; the reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moebench.ops import moe_decode, routing
from moebench.ops.experts import Impl, experts_grouped, experts_loop_ref, resolve_impl


class MoEAux(NamedTuple):
    lb_loss: torch.Tensor            # () fp32, load-balancing loss already multiplied by aux_loss_coef
    dropped_frac: torch.Tensor       # () fp32, fraction of the (valid) T·K assignments dropped by capacity
    tokens_per_expert: torch.Tensor  # (E,) fp32, assignments per expert before dropping


class MoE(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_expert: int, top_k: int = 1,
                 capacity_factor: float | None = 1.0, aux_loss_coef: float = 0.01, activation: str = "relu",
                 impl: Impl = "auto"):
        super().__init__()
        assert 1 <= top_k <= n_expert, f"need 1 <= top_k <= n_expert, got {top_k=} {n_expert=}"
        assert capacity_factor is None or capacity_factor > 0, "capacity_factor must be > 0 or None (dropless)"
        self.d_in, self.d_hidden, self.d_out = d_in, d_hidden, d_out
        self.n_expert, self.top_k = n_expert, top_k
        self.capacity_factor, self.aux_loss_coef, self.activation = capacity_factor, aux_loss_coef, activation
        self.router_DE = nn.Parameter(torch.empty(d_in, n_expert))
        self.w1_EDF = nn.Parameter(torch.empty(n_expert, d_in, d_hidden))
        self.w2_EFD = nn.Parameter(torch.empty(n_expert, d_hidden, d_out))
        self.eval_capacity_factor: float | None = None   # dropless in eval mode
        # the grouped path's gathers: None = fused Triton kernels on CUDA when triton imports, else torch
        self.fused_routing: bool | None = None
        # decode steps (few tokens, eval, no grad) through ops/moe_decode.py: None = when fused_routing
        self.decode_kernels: bool | None = None
        self.impl = impl                       # resolved by the setter below
        self.reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: Impl) -> None:
        # settable after build so that tests can run both paths on the same weights
        self._impl = resolve_impl(value, (self.d_in, self.d_hidden, self.d_out))

    def reset_parameters(self) -> None:
        # each expert as nn.Linear's default init: U(±1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))
        nn.init.uniform_(self.w1_EDF, -1 / math.sqrt(self.d_in), 1 / math.sqrt(self.d_in))
        nn.init.uniform_(self.w2_EFD, -1 / math.sqrt(self.d_hidden), 1 / math.sqrt(self.d_hidden))
        # the router as an nn.Linear(d_in, E) without bias would be: U(±1/sqrt(d_in))
        nn.init.uniform_(self.router_DE, -1 / math.sqrt(self.d_in), 1 / math.sqrt(self.d_in))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def n_active_params(self) -> int:
        """Parameters touched per token: the router plus top_k experts."""
        per_expert = self.d_in * self.d_hidden + self.d_hidden * self.d_out
        return self.router_DE.numel() + self.top_k * per_expert

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_hidden={self.d_hidden}, d_out={self.d_out}, n_expert={self.n_expert}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, impl={self.impl!r}")

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None,
                need_aux: bool = True) -> tuple[torch.Tensor, MoEAux | None]:
        """y_t = Σ_k p_{t,k} · expert_{i_k}(x_t) over kept assignments; invalid tokens (valid_T False) get 0.

        x_TD is 2-D: callers flatten batch × length. Returns y_TD in the compute dtype (the autocast
        dtype when autocast is on, else x's dtype) and the MoEAux statistics as tensors (no sync),
        or None for them with need_aux=False (decoding: a dozen small kernels fewer per layer).
        """
        assert x_TD.dim() == 2 and x_TD.shape[1] == self.d_in, f"expected (T, {self.d_in}), got {tuple(x_TD.shape)}"
        assert valid_T is None or (valid_T.dtype == torch.bool and valid_T.shape == x_TD.shape[:1]), \
            "valid_T must be a bool tensor of shape (T,)"
        # grouped_mm is not on autocast's list (pytorch#174763), so cast explicitly, the same in both paths
        dev = x_TD.device.type
        # (is_autocast_available does not trace under dynamo; meta has no autocast)
        autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if autocast else x_TD.dtype
        x_TD = x_TD.to(dtype)
        w1_EDF, w2_EFD = self.w1_EDF.to(dtype), self.w2_EFD.to(dtype)

        if not need_aux and self._decode_kernel(x_TD, valid_T):
            # a decode step: router, experts and combine in three Triton launches (ops/moe_decode.py)
            p_T, expert_T = moe_decode.decode_router(x_TD, self.router_DE.to(dtype))
            return moe_decode.decode_experts(x_TD, expert_T, p_T, w1_EDF, w2_EFD, self.activation), None

        # router: logits in the compute dtype, softmax in fp32
        probs_TE = F.softmax(x_TD @ self.router_DE.to(dtype), dim=-1, dtype=torch.float32)
        # raw probabilities, no renormalisation; top-1 is a max (one reduction, not a top-k kernel)
        top_p_TK, top_i_TK = (probs_TE.max(-1, keepdim=True) if self.top_k == 1
                              else probs_TE.topk(self.top_k, dim=-1))
        T, K, E = x_TD.shape[0], self.top_k, self.n_expert

        # n_valid and capacity stay on the device when valid_T is given (capacity's float64 arithmetic
        # repeats Python's int(cf * T * K / E) operation for operation, so both paths agree exactly)
        n_valid = T if valid_T is None else valid_T.sum()
        # capacity is a training-time device (Switch): in eval mode (validation, generation) every
        # assignment is kept, so a token's output never depends on the other tokens in the batch
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if capacity_factor is None:
            capacity = None
        elif valid_T is None:
            capacity = int(capacity_factor * T * K / E)
        else:
            capacity = torch.floor(capacity_factor * n_valid.double() * K / E).long()

        if self.impl == "grouped":
            y_TD, counts_E, n_kept = _forward_grouped(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD,
                                                      capacity, self.activation, self._fused(x_TD.device))
        else:
            y_TD, counts_E, n_kept = _forward_loop(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD,
                                                   capacity, self.activation)
        if not need_aux:
            return y_TD, None

        # load-balancing loss of Switch Transformer (Fedus et al. eq. 4): coef · E · Σ_i f_i · P_i, with
        # f_i the fraction of assignments routed to i before dropping (no gradient) and P_i the mean
        # router probability of i over valid tokens. Equals coef at perfectly uniform routing.
        n_assign = max(T * K, 1) if valid_T is None else (n_valid * K).clamp(min=1).float()
        f_E = counts_E.float() / n_assign
        if valid_T is None:
            P_E = probs_TE.mean(0)
        else:
            # masked by selection: an invalid token's probabilities must not reach P (or its gradient)
            P_E = probs_TE.masked_fill(~valid_T[:, None], 0).sum(0) / n_valid.clamp(min=1)
        lb_loss = self.aux_loss_coef * E * (f_E * P_E).sum()
        dropped_frac = ((n_valid * K - n_kept) / n_assign).float()   # 0, not 1, when no token is valid
        return y_TD, MoEAux(lb_loss, dropped_frac, counts_E.float())

    def _fused(self, device: torch.device) -> bool:
        """Whether the grouped path runs its Triton routing on `device` (fused_routing None: the default)."""
        return self.fused_routing if self.fused_routing is not None else routing.fused_available(device)

    def decode_path(self, device: torch.device) -> str:
        """What a decode step (a few tokens, eval, no gradient) runs on `device`: 'triton', the
        kernels of ops/moe_decode.py (top-1, no eval capacity, grouped path with fused routing, the
        same switch), or else the layer's impl ('grouped' or 'loop')."""
        if (self._fused(device) and self.decode_kernels is not False and moe_decode.HAS_TRITON and self.impl == "grouped"
                and self.top_k == 1 and self.eval_capacity_factor is None):
            return "triton"
        return self.impl

    def _decode_kernel(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> bool:
        return (not self.training and valid_T is None and x_TD.shape[0] <= moe_decode.MAX_DECODE_T
                and not torch.is_grad_enabled() and self.decode_path(x_TD.device) == "triton")


# ---- grouped path ------------------------------------------------------------------------------


class _Plan(NamedTuple):
    offs_E: torch.Tensor    # (E,) int32 cumulative ends of the kept rows of each expert
    counts_E: torch.Tensor  # (E,) int32 assignments per expert before dropping (valid tokens only)
    n_S: torch.Tensor       # (S,) int64 the assignment n = k·T + t held by buffer row s
    row_N: torch.Tensor     # (N,) int64 the buffer row of assignment n (inverse of n_S)
    keep_N: torch.Tensor    # (N,) bool assignment n is kept
    tok_S: torch.Tensor     # (S,) int64 the token of buffer row s: n_S mod T


def plan_grouped(top_i_TK: torch.Tensor, valid_T: torch.Tensor | None, n_expert: int,
                 capacity: int | torch.Tensor | None, fused: bool = False) -> _Plan:
    """Counting sort of the T·K assignments by expert: static shapes, no host sync.

    Invalid tokens go to a virtual column E. Rank r (1-based) of assignment n is its place among
    the assignments of its column in priority order n = k·T + t, so capacity keeps ranks <= cap.
    Buffer layout: the kept rows of expert 0, 1, ..., E-1 (offs_E), then the dropped rows of expert
    0, 1, ..., E-1, then the invalid ones, each segment in n order. fused=True computes the same
    plan, bitwise, with three Triton kernels (moebench/ops/routing.py); this is its reference.
    """
    T, K = top_i_TK.shape
    N, E, dev = T * K, n_expert, top_i_TK.device
    expert_N = top_i_TK.t().reshape(N)                   # n = k·T + t: choice rank first, then position
    col_N = expert_N if valid_T is None else torch.where(valid_T.repeat(K), expert_N, E)
    if fused:
        row_N, keep_N, n_S, tok_S, offs_E, counts_E = routing.route_plan(col_N, T, E, *_cap_args(capacity))
        return _Plan(offs_E, counts_E, n_S, row_N, keep_N, tok_S)
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
    return _Plan(offs_C[:E], counts_C[:E], n_S, row_N, keep_N, n_S % T)


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


class _Dispatch(torch.autograd.Function):
    """x_SD = x_TD[n_S % T]; backward: g_TD[t] = Σ_k g_SD[row(k·T + t)] over kept assignments."""

    @staticmethod
    def forward(ctx, x_TD, tok_S, row_N, keep_N, fused: bool):
        ctx.save_for_backward(row_N, keep_N)
        ctx.T, ctx.fused = x_TD.shape[0], fused
        return x_TD.index_select(0, tok_S)

    @staticmethod
    def backward(ctx, g_SD):
        row_N, keep_N = ctx.saved_tensors
        if ctx.fused:       # row_N stands in for the unused weights
            return routing.gather_sum(g_SD, row_N, row_N, keep_N, ctx.T, False), None, None, None, None
        g_ND = torch.where(keep_N[:, None], g_SD.index_select(0, row_N), 0)
        return _sum_over_k(g_ND, ctx.T), None, None, None, None


class _Combine(torch.autograd.Function):
    """y_TD[t] = Σ_k p_N[n] · out_SD[row_N[n]] over the kept assignments n = k·T + t."""

    @staticmethod
    def forward(ctx, out_SD, p_N, row_N, keep_N, n_S, T: int, fused: bool):
        ctx.T, ctx.fused = T, fused
        if fused:           # p stays fp32: the kernel multiplies and sums in fp32
            ctx.save_for_backward(out_SD, p_N, row_N, keep_N, n_S)
            return routing.gather_sum(out_SD, p_N, row_N, keep_N, T, True)
        w_N = p_N.to(out_SD.dtype)
        o_ND = out_SD.index_select(0, row_N)
        y_ND = torch.where(keep_N[:, None], o_ND * w_N[:, None], 0)
        ctx.save_for_backward(out_SD, w_N, row_N, keep_N, n_S)
        return _sum_over_k(y_ND, T)

    @staticmethod
    def backward(ctx, g_TD):
        out_SD, w_N, row_N, keep_N, n_S = ctx.saved_tensors
        if ctx.fused:
            want_out, want_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            g_out, g_p = routing.combine_bwd(g_TD, out_SD, w_N, n_S, keep_N, want_out, want_p)
            return g_out if want_out else None, g_p if want_p else None, None, None, None, None, None
        K = keep_N.shape[0] // ctx.T
        g_ND = g_TD.repeat(K, 1) if K > 1 else g_TD           # n = k·T + t reads g_TD[t]
        g_out = g_p = None
        if ctx.needs_input_grad[0]:
            # row s of the buffer holds assignment n_S[s]: gather back through the inverse permutation
            g_out = torch.where(keep_N[:, None], g_ND * w_N[:, None], 0).index_select(0, n_S)
        if ctx.needs_input_grad[1]:
            o_ND = out_SD.index_select(0, row_N)
            g_p = torch.where(keep_N, (g_ND.float() * o_ND.float()).sum(-1), 0)
        return g_out, g_p, None, None, None, None, None


def _forward_grouped(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD, capacity, activation, fused=False):
    T, K = top_i_TK.shape
    plan = plan_grouped(top_i_TK, valid_T, w1_EDF.shape[0], capacity, fused)
    p_N = top_p_TK.t().reshape(-1)
    x_SD = _Dispatch.apply(x_TD, plan.tok_S, plan.row_N, plan.keep_N, fused)
    out_SD = experts_grouped(x_SD, w1_EDF, w2_EFD, plan.offs_E, activation)
    y_TD = _Combine.apply(out_SD, p_N, plan.row_N, plan.keep_N, plan.n_S, T, fused)
    return y_TD, plan.counts_E, plan.offs_E[-1]


# ---- loop path (reference) ---------------------------------------------------------------------


def _forward_loop(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD, capacity, activation):
    T, K = top_i_TK.shape
    E = w1_EDF.shape[0]
    if isinstance(capacity, torch.Tensor):
        capacity = int(capacity)
    ok_KT = torch.ones(K, T, dtype=torch.bool, device=x_TD.device) if valid_T is None else valid_T.expand(K, T)
    keep_TK = torch.zeros(T, K, dtype=torch.bool, device=x_TD.device)
    counts_E = torch.zeros(E, dtype=torch.int32, device=x_TD.device)
    for e in range(E):
        # nonzero of a (K, T) mask lists assignments by choice rank, then token position: the priority
        k_idx, t_idx = ((top_i_TK.t() == e) & ok_KT).nonzero(as_tuple=True)
        counts_E[e] = k_idx.numel()
        if capacity is not None:
            k_idx, t_idx = k_idx[:capacity], t_idx[:capacity]
        keep_TK[t_idx, k_idx] = True
    y_TD = x_TD.new_zeros(T, w2_EFD.shape[2])
    for k in range(K):
        expert_T = torch.where(keep_TK[:, k], top_i_TK[:, k], -1)      # -1: dropped, output 0
        out_TD = experts_loop_ref(x_TD, expert_T, w1_EDF, w2_EFD, activation)
        y_TD = y_TD + out_TD * top_p_TK[:, k, None].to(out_TD.dtype)
    return y_TD, counts_E, keep_TK.sum()
