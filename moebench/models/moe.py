"""Switch MoE (Fedus et al. 2021), the MoE layer of MoE-Mamba (Pióro et al. 2024): a softmax router
picks top_k experts per token, each expert a 2-layer MLP; experts over capacity drop assignments.

Shape suffixes (as in torchtitan's moe.py):
  T  tokens (batch × length, flattened)   E  experts      K  top-k choices per token
  D  input width d_in (w1) / output width d_out (w2)      F  expert hidden width (d_hidden)
  N  the T·K assignments in priority order n = k·T + t (all first choices, then second choices, ...)
  S  rows of the expert-sorted buffer (S = N): kept rows grouped by expert, dropped rows after them

Two implementations with identical semantics (tests/test_moe.py proves it), chosen at build
(moebench/impl.py, the model's Impl.moe):
  "grouped": counting sort of assignments by expert, one gather, two grouped GEMMs, one gather
             back; no host synchronisation and only static shapes when valid_T is None. The plan and
             the gathers (moebench/ops/routing.py) run in torch or as Triton kernels (Impl.routing).
  "loop":    a per-expert Python loop that decides capacity its own way; the reference.
A decode step (a few tokens, eval, no gradient) of a top-1 grouped layer can take the Triton kernels
of moebench/ops/moe_decode.py instead (Impl.decode).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moebench.impl import resolve_moe, resolve_routing
from moebench.ops import moe_decode, routing
from moebench.ops.experts import experts_grouped, experts_loop_ref


class MoEAux(NamedTuple):
    lb_loss: torch.Tensor            # () fp32, load-balancing loss already multiplied by aux_loss_coef
    dropped_frac: torch.Tensor       # () fp32, fraction of the (valid) T·K assignments dropped by capacity
    tokens_per_expert: torch.Tensor  # (E,) fp32, assignments per expert before dropping


class MoE(nn.Module):
    """impl ('auto' | 'grouped' | 'loop'), routing ('auto' | 'triton' | 'torch') and decode are
    resolved here, once (moebench/impl.py; 'auto' routing looks at torch's default device, which a
    model's build sets); a model passes its Impl's choices."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_expert: int, top_k: int = 1,
                 capacity_factor: float | None = 1.0, aux_loss_coef: float = 0.01, activation: str = "relu",
                 impl: str = "auto", routing: str = "auto", decode: bool = False):
        super().__init__()
        assert 1 <= top_k <= n_expert, f"need 1 <= top_k <= n_expert, got {top_k=} {n_expert=}"
        assert capacity_factor is None or capacity_factor > 0, "capacity_factor must be > 0 or None (dropless)"
        self.d_in, self.d_hidden, self.d_out = d_in, d_hidden, d_out
        self.n_expert, self.top_k = n_expert, top_k
        self.capacity_factor, self.aux_loss_coef, self.activation = capacity_factor, aux_loss_coef, activation
        self.router_DE = nn.Parameter(torch.empty(d_in, n_expert))
        self.w1_EDF = nn.Parameter(torch.empty(n_expert, d_in, d_hidden))
        self.w2_EFD = nn.Parameter(torch.empty(n_expert, d_hidden, d_out))
        self.impl = resolve_moe(impl, (d_in, d_hidden, d_out))
        self.fused = self.impl == "grouped" and resolve_routing(routing, None) == "triton"
        # the decode kernels take top-1 layers; the loop stays the reference for everything
        self.decode_kernels = decode and self.impl == "grouped" and top_k == 1
        self.reset_parameters()

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
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, impl={self.impl!r}, "
                f"fused={self.fused}, decode_kernels={self.decode_kernels}")

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
        capacity_factor = self.capacity_factor if self.training else None
        if capacity_factor is None:
            capacity = None
        elif valid_T is None:
            capacity = int(capacity_factor * T * K / E)
        else:
            capacity = torch.floor(capacity_factor * n_valid.double() * K / E).long()

        if self.impl == "grouped":
            y_TD, counts_E, n_kept = _forward_grouped(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD,
                                                      capacity, self.activation, self.fused)
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

    def _decode_kernel(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> bool:
        """A decode step: the layer's decode kernels, eval, no gradient, no mask, a few tokens."""
        return (self.decode_kernels and not self.training and valid_T is None
                and x_TD.shape[0] <= moe_decode.MAX_DECODE_T and not torch.is_grad_enabled())


# ---- grouped path ------------------------------------------------------------------------------


def _forward_grouped(x_TD, valid_T, top_p_TK, top_i_TK, w1_EDF, w2_EFD, capacity, activation, fused=False):
    T, K = top_i_TK.shape
    plan = routing.plan_grouped(top_i_TK, valid_T, w1_EDF.shape[0], capacity, fused)
    p_N = top_p_TK.t().reshape(-1)
    x_SD = routing.dispatch(x_TD, plan, fused)
    out_SD = experts_grouped(x_SD, w1_EDF, w2_EFD, plan.offs_E, activation)
    y_TD = routing.combine(out_SD, p_N, plan, T, fused)
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
