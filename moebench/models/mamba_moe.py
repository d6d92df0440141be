"""The Mamba-R1 `create_mamba_moe` API on top of our blocks, done right: pre-norm residual blocks
(Mamba, then Switch MoE), a router that gets its gradient through p_I, capacity with dropping,
and the load-balancing loss returned to the caller instead of being lost."""
from __future__ import annotations

import torch
from torch import nn

from moebench.config import ModelConfig
from moebench.impl import resolve
from moebench.models.block import Block, make_norm


class MambaMoE(nn.Module):
    """forward(x (B, L, dim) float, mask (B, L) bool, False = ignore) -> (B, L, dim).
    After each forward, `self.aux_loss` holds the summed load-balancing loss (add it to yours)
    and `self.moe_aux` the per-layer MoE statistics. Masked positions influence nothing else
    and come out as zeros."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, impl: str = "auto"):
        super().__init__()
        self.cfg, self.max_seq_len = cfg, max_seq_len
        self.impl = resolve(cfg, None, impl)        # on torch's default device, where the layers are made
        self.blocks = nn.ModuleList(Block(cfg, i, self.impl) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.aux_loss: torch.Tensor | None = None
        self.moe_aux: list = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected (batch, length, {self.cfg.d_model}), got {tuple(x.shape)}")
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} > max_seq_len {self.max_seq_len}")
        valid = None
        if mask is not None:
            valid = mask.to(device=x.device, dtype=torch.bool)
            x = x * valid[..., None]                  # masked inputs carry nothing into the stream
        moe_aux = []
        for block in self.blocks:
            x, aux = block(x, valid)
            if valid is not None:
                x = x * valid[..., None]
            moe_aux.extend(aux)
        self.moe_aux = moe_aux
        self.aux_loss = sum((a.lb_loss for a in moe_aux), x.new_zeros((), dtype=torch.float32))
        y = self.norm_f(x)
        return y if valid is None else y * valid[..., None]


def create_mamba_moe(dim: int = 512, depth: int = 12, d_state: int = 64, d_conv: int = 4,
                     expand: float = 2, num_experts: int = 8, expert_dim: int = 2048,
                     max_seq_len: int = 2048, *, top_k: int = 1, capacity_factor: float | None = 1.0,
                     aux_loss_coef: float = 0.01, impl: str = "auto") -> MambaMoE:
    """Mamba-R1's constructor (same arguments and defaults): `depth` blocks of Mamba then MoE."""
    cfg = ModelConfig(name="mamba-r1-compatible", mixer="mamba", ffn="moe", n_layer=depth,
                      d_model=dim, d_state=d_state, d_conv=d_conv, expand=expand,
                      d_ff=expert_dim, n_expert=num_experts, top_k=top_k,
                      capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef)
    return MambaMoE(cfg, max_seq_len, impl)
