"""Expert MLPs applied to tokens that are already sorted by expert: a grouped-GEMM fast path and a
per-expert Python loop that is the reference. Both read the same weight tensors.

Shape suffixes (as in torchtitan's moe.py):
  T  tokens (batch × length, flattened)       E  experts
  S  rows of the expert-sorted buffer          F  expert hidden width (d_hidden)
  D  input width d_in (w1) / output width d_out (w2); they differ only for inner-MoE projections

Weight layout, one for both paths: w1_EDF (E, d_in, d_hidden), w2_EFD (E, d_hidden, d_out): expert e
computes act(x @ w1_EDF[e]) @ w2_EFD[e], i.e. nn.Linear's weight transposed, so that grouped_mm
takes the weights as they are stored (row-major K×N), with no transpose or copy per step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# torch >= 2.10 exposes grouped_mm publicly; older builds (2.8/2.9, maybe the GPU box's 2.11) only
# have the private op. Same schema: (mat_a, mat_b, *, offs, bias, out_dtype).
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
HAS_GROUPED_MM = _grouped_mm is not None

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hidden activation of every MLP in moebench (dense FFN and experts)."""
    if name not in _ACTS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTS)}")
    return _ACTS[name]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous. grouped_mm's backward
    rejects gradients with stride 0 (e.g. from `.sum()`): "Invalid strides/sizes" (torch 2.13)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _check_rows_aligned(dtype: torch.dtype, **widths: int) -> None:
    # grouped_mm (CUTLASS/TMA on Hopper, and the stride check on every device) needs each row to be
    # a multiple of 16 bytes: 8 elements in bf16, 4 in fp32.
    size = torch.empty((), dtype=dtype).element_size()
    for name, d in widths.items():
        if d * size % 16:
            raise ValueError(f"grouped_mm needs 16-byte aligned rows, but {name}={d} in {dtype} is {d * size} "
                             f"bytes; use a multiple of {16 // size} or impl='loop'")


def experts_grouped(x_SD: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor, offs_E: torch.Tensor,
                    activation: str = "relu") -> torch.Tensor:
    """Rows offs_E[e-1]:offs_E[e] of x_SD go through expert e (offs_E: int32 cumulative ends, offs_E[-1] <= S).

    Rows after offs_E[-1] are don't-care: grouped_mm leaves them uninitialised (may be inf/NaN) in
    the output, and their input gradient is uninitialised too. Callers must select those rows away,
    never multiply them by zero. No host synchronisation for bf16 on Hopper (CUTLASS path); other
    dtypes/GPUs take torch's fallback, which copies offs_E to the host.
    """
    E, D, Fh = w1_EDF.shape
    assert x_SD.dim() == 2 and x_SD.shape[1] == D and w2_EFD.shape[:2] == (E, Fh), \
        f"shapes: x {tuple(x_SD.shape)}, w1 {tuple(w1_EDF.shape)}, w2 {tuple(w2_EFD.shape)}"
    assert offs_E.dtype == torch.int32 and offs_E.shape == (E,), f"offs must be int32 of shape ({E},)"
    _check_rows_aligned(x_SD.dtype, d_in=D, d_hidden=Fh, d_out=w2_EFD.shape[2])
    h_SF = _grouped_mm(x_SD.contiguous(), w1_EDF, offs=offs_E)
    h_SF = act_fn(activation)(h_SF)
    out_SD = _grouped_mm(h_SF, w2_EFD, offs=offs_E)
    return _ContiguousGrad.apply(out_SD)


def experts_loop_ref(x_TD: torch.Tensor, expert_idx: torch.Tensor, w1_EDF: torch.Tensor, w2_EFD: torch.Tensor,
                     activation: str = "relu") -> torch.Tensor:
    """y_TD[t] = expert expert_idx[t] applied to x_TD[t]; rows with expert_idx outside [0, E) get 0.

    Tokens need not be sorted. One matmul pair per expert, with data-dependent shapes (host syncs):
    slow on purpose, it is the spec.
    """
    E = w1_EDF.shape[0]
    act = act_fn(activation)
    y_TD = x_TD.new_zeros(x_TD.shape[0], w2_EFD.shape[2])
    for e in range(E):
        idx = (expert_idx == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y_TD.index_add_(0, idx, act(x_TD[idx] @ w1_EDF[e]) @ w2_EFD[e])
    return y_TD
