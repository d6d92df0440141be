"""Causal self-attention with rotary position embeddings (Su et al.) through SDPA.

Shapes: B batch, L sequence, D model, H heads, K head dim, S cached length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(positions_L: torch.Tensor, d_head: int, base: float):
    inv_freq_K2 = 1.0 / (base ** (torch.arange(0, d_head, 2, device=positions_L.device,
                                               dtype=torch.float32) / d_head))
    angles_LK2 = positions_L.float()[:, None] * inv_freq_K2[None, :]
    return angles_LK2.cos(), angles_LK2.sin()


def apply_rope(x_BHLK: torch.Tensor, cos_LK2: torch.Tensor, sin_LK2: torch.Tensor) -> torch.Tensor:
    # rotate pairs (x[2i], x[2i+1]) in fp32, as in the RoFormer formulation
    x1, x2 = x_BHLK.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos_LK2 - x2 * sin_LK2, x1 * sin_LK2 + x2 * cos_LK2), dim=-1)
    return out.flatten(-2).type_as(x_BHLK)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, rope_base: float = 10000.0):
        super().__init__()
        self.n_head, self.d_head, self.rope_base = n_head, d_model // n_head, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x_BLD: torch.Tensor, positions_L: torch.Tensor):
        q, k, v = self.qkv(x_BLD).unflatten(-1, (3, self.n_head, self.d_head)).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(positions_L, self.d_head, self.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None,
                return_state: bool = False):
        B, L, _ = x_BLD.shape
        q, k, v = self._qkv(x_BLD, torch.arange(L, device=x_BLD.device))
        if valid_BL is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # masked keys are invisible; a query always sees itself so no row is empty
            causal_LL = torch.ones(L, L, dtype=torch.bool, device=x_BLD.device).tril()
            mask_BLL = (causal_LL & valid_BL[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x_BLD.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BLL[:, None])
        y = self.proj(y.transpose(1, 2).reshape(B, L, -1))
        if return_state:
            return y, [], (k, v)
        return y, []

    # --- KV-cache decoding ------------------------------------------------------------------
    def allocate_state(self, batch: int, max_len: int, device, dtype):
        shape = (batch, self.n_head, max_len, self.d_head)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype), "len": 0}

    def step(self, x_BD: torch.Tensor, state: dict):
        """One token at position state['len'], attending to the cache and itself."""
        pos = state["len"]
        q, k, v = self._qkv(x_BD[:, None], torch.tensor([pos], device=x_BD.device))
        state["k"][:, :, pos:pos + 1] = k.to(state["k"].dtype)
        state["v"][:, :, pos:pos + 1] = v.to(state["v"].dtype)
        state["len"] = pos + 1
        y = F.scaled_dot_product_attention(q.to(state["k"].dtype), state["k"][:, :, :pos + 1],
                                           state["v"][:, :, :pos + 1])
        return self.proj(y.transpose(1, 2).reshape(x_BD.shape[0], -1).to(x_BD.dtype)), state

    def load_prefill(self, state: dict, kv) -> dict:
        k, v = kv
        L = k.shape[2]
        state["k"][:, :, :L] = k.to(state["k"].dtype)
        state["v"][:, :, :L] = v.to(state["v"].dtype)
        state["len"] = L
        return state
