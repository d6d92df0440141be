"""Pre-norm residual blocks: the only place where layers are composed.

sequential: x = x + mixer(norm1(x)); x = x + ffn(norm2(x))       (MoE-Mamba, Transformer[-MoE])
mixer only: x = x + mixer(norm1(x))                              (Mamba, inner-MoE Mamba)
parallel:   x = x + mixer(norm1(x)) + ffn(norm1(x))              (paper 4.4, one norm, one residual)
"""
from __future__ import annotations

import torch
from torch import nn

from moebench.config import ModelConfig
from moebench.impl import Impl
from moebench.models.attention import Attention
from moebench.models.ffn import FFN
from moebench.models.mamba import Mamba
from moebench.models.mamba2 import Mamba2
from moebench.models.moe import MoE
from moebench.ops import mamba_decode, moe_decode
from moebench.ops.moe_decode import MAX_DECODE_T


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.d_model)


def make_mixer(cfg: ModelConfig, layer: int, impl: Impl) -> nn.Module:
    if cfg.mixer == "attention":
        return Attention(cfg.d_model, cfg.n_head, cfg.rope_base)
    if cfg.mixer == "mamba2":
        return Mamba2.from_config(cfg, layer, impl)
    return Mamba.from_config(cfg, layer, impl)


def make_ffn(cfg: ModelConfig, impl: Impl) -> nn.Module | None:
    if cfg.ffn == "none":
        return None
    if cfg.ffn == "dense":
        return FFN(cfg.d_model, cfg.d_ff, cfg.d_model, cfg.activation)
    return MoE(cfg.d_model, cfg.d_ff, cfg.d_model, cfg.n_expert, top_k=cfg.top_k,
               capacity_factor=cfg.capacity_factor, aux_loss_coef=cfg.aux_loss_coef,
               activation=cfg.activation, impl=impl.moe, routing=impl.routing or "torch", decode=impl.decode)


def _kernels_apply(x_BD: torch.Tensor, norm: nn.Module) -> bool:
    """What every decode-sublayer kernel needs: no gradient, no autocast (the weights cast once,
    generate.cast_for_inference), a decode-sized batch, the norm's weight in x's dtype."""
    dev = x_BD.device.type
    if torch.is_grad_enabled() or (dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)):
        return False
    return x_BD.shape[0] <= MAX_DECODE_T and norm.weight.dtype == x_BD.dtype


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, impl: Impl):
        super().__init__()
        self.layout, self.ffn_kind = cfg.layout, cfg.ffn
        self.norm1 = make_norm(cfg)
        self.mixer = make_mixer(cfg, layer, impl)
        self.ffn = make_ffn(cfg, impl)
        self.norm2 = make_norm(cfg) if self.ffn is not None and cfg.layout == "sequential" else None
        # which residual sublayers a decode step may run as one fused launch sequence (Block.step)
        sequential = cfg.layout == "sequential"
        self.mixer_decode = sequential and cfg.mixer == "mamba" and self.mixer.decode_kernels
        self.moe_decode = sequential and cfg.ffn == "moe" and self.ffn.decode_kernels

    def _ffn(self, h_BLD: torch.Tensor, valid_BL: torch.Tensor | None, aux: list | None):
        """aux None: the MoE statistics are not wanted (decoding), so they are not computed."""
        if self.ffn_kind != "moe":
            return self.ffn(h_BLD)
        B, L, D = h_BLD.shape
        valid_T = None if valid_BL is None else valid_BL.reshape(-1)
        y_TD, moe_aux = self.ffn(h_BLD.reshape(B * L, D), valid_T, need_aux=aux is not None)
        if aux is not None:
            aux.append(moe_aux)
        return y_TD.view(B, L, D)

    def _mixer_kernels(self, x_BD: torch.Tensor, state) -> bool:
        """Whether this step's mixer sublayer takes ops/mamba_decode.py's kernels: a decode-kernel
        Mamba sublayer, weights and conv state in x's dtype; otherwise the unfused step, which
        handles every case."""
        return (self.mixer_decode and _kernels_apply(x_BD, self.norm1) and state[0].dtype == x_BD.dtype
                and self.mixer.in_proj.weight.dtype == x_BD.dtype)

    def _moe_kernels(self, x_BD: torch.Tensor) -> bool:
        """Whether the MoE sublayer takes ops/moe_decode.py's decode_moe_residual: a decode-kernel
        MoE (top-1, grouped), in eval, experts in x's dtype."""
        return (self.moe_decode and not self.ffn.training and _kernels_apply(x_BD, self.norm2)
                and self.ffn.w1_EDF.dtype == x_BD.dtype)

    def forward(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None,
                return_state: bool = False):
        """-> (x, moe_aux) or, with return_state, (x, moe_aux, mixer state after the last position)
        for prefill before step decoding."""
        h = self.norm1(x_BLD)
        if return_state:
            y, aux, state = self.mixer(h, valid_BL, return_state=True)
        else:
            y, aux = self.mixer(h, valid_BL)
        aux = list(aux)
        if self.ffn is None:
            x_BLD = x_BLD + y
        elif self.layout == "parallel":
            x_BLD = x_BLD + y + self._ffn(h, valid_BL, aux)
        else:
            x_BLD = x_BLD + y
            x_BLD = x_BLD + self._ffn(self.norm2(x_BLD), valid_BL, aux)
        return (x_BLD, aux, state) if return_state else (x_BLD, aux)

    # --- recurrent / cached decoding: one token per call --------------------------------------
    def step(self, x_BD: torch.Tensor, state):
        """One token per sequence. Each residual sublayer takes the decode kernels of ops/ when it
        can (a whole sublayer in three launches: _mixer_kernels, _moe_kernels), else the modules."""
        if self._mixer_kernels(x_BD, state):
            x_BD = mamba_decode.mamba_decode_residual(x_BD, self.norm1, self.mixer, state)
            if self.ffn is None:
                return x_BD, state
        else:
            h = self.norm1(x_BD)
            y, state = self.mixer.step(h, state)
            if self.ffn is None:
                return x_BD + y, state
            if self.layout == "parallel":
                return x_BD + y + self._ffn(h[:, None], None, None)[:, 0], state
            x_BD = x_BD + y
        if self._moe_kernels(x_BD):
            moe = self.ffn
            w, b, eps, rms = moe_decode.norm_args(self.norm2)
            return moe_decode.decode_moe_residual(x_BD, w, b, eps, moe.router_DE.to(x_BD.dtype), moe.w1_EDF,
                                                  moe.w2_EFD, moe.activation, rms=rms), state
        return x_BD + self._ffn(self.norm2(x_BD)[:, None], None, None)[:, 0], state
