"""Dense 2-layer MLP without biases, the channel mixer of dense blocks and the shape of one expert."""
from __future__ import annotations

import torch
from torch import nn

from moebench.ops.experts import act_fn  # one activation table for the dense FFN and the experts

__all__ = ["FFN", "act_fn"]


class FFN(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, activation: str = "relu"):
        super().__init__()
        self.activation = activation
        self.act = act_fn(activation)              # fails early on an unknown name
        self.w1 = nn.Linear(d_in, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
