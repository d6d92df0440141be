"""LM = embed -> blocks -> norm -> head, plus the parameter and FLOP accounting of the paper.

Parameter counts follow the paper's appendix E: trainable, non-embedding (the embedding and the
unembedding head are excluded). Active parameters count, in each MoE, the router and top_k experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moebench.config import ModelConfig
from moebench.impl import Impl, resolve
from moebench.models.block import Block, make_norm
from moebench.models.moe import MoE

# tokens per chunk of the head + cross-entropy in training on CUDA: 8192 x 50304 logits are 0.8 GB
# in bf16, where a whole 32 x 1024 batch would be 3.3 GB (and as much again for their gradient)
LOSS_CHUNK_CUDA = 8192


def default_loss_chunk(device: torch.device) -> int:
    """The training loss chunk on `device`: chunked on CUDA, whole on CPU (small models, no gain)."""
    return LOSS_CHUNK_CUDA if device.type == "cuda" else 0


@dataclass
class LMOutput:
    logits: torch.Tensor | None        # (B, L, V) when asked for
    loss: torch.Tensor | None          # mean next-token cross-entropy (nats)
    aux_loss: torch.Tensor             # sum of the MoE load-balancing losses (already weighted)
    moe_aux: list                      # one MoEAux per MoE layer, in order


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig, impl: Impl):
        super().__init__()
        self.cfg = cfg
        self.impl = impl                   # every layer was built with these choices; rows record it
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, impl) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.embed.weight, std=0.02)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=0.02)
        # GPT-2 / mamba-ssm: scale the projections that write into the residual stream by
        # 1/sqrt(number of residual additions) so the stream's variance does not grow with depth
        n_res = self.cfg.n_layer * (2 if self.cfg.ffn != "none" and self.cfg.layout == "sequential" else 1)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mixer.proj.weight", "ffn.w2.weight", "ffn.w2_EFD")):
                with torch.no_grad():
                    p.div_(math.sqrt(n_res))

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, the FFN MoEs and the inner MoEs of Mamba mixers, in order."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden(self, idx_BL: torch.Tensor, valid_BL: torch.Tensor | None = None):
        x = self.embed(idx_BL)
        moe_aux = []
        for block in self.blocks:
            x, aux = block(x, valid_BL)
            moe_aux.extend(aux)
        return self.norm_f(x), moe_aux

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None,
                valid_BL: torch.Tensor | None = None, return_logits: bool | None = None,
                loss_chunk: int = 0) -> LMOutput:
        """`loss_chunk` > 0 computes the head and cross-entropy over that many tokens at a time
        (with recomputation) so the (tokens x vocab) logits never exist whole during training."""
        h_BLD, moe_aux = self.hidden(idx_BL, valid_BL)
        aux_loss = sum((a.lb_loss for a in moe_aux), h_BLD.new_zeros((), dtype=torch.float32))
        want_logits = targets_BL is None if return_logits is None else return_logits
        logits = loss = None
        if targets_BL is not None and loss_chunk and not want_logits:
            loss = chunked_cross_entropy(h_BLD.flatten(0, 1), self.head.weight, targets_BL.flatten(), loss_chunk)
        else:
            logits = self.head(h_BLD)
            if targets_BL is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets_BL.flatten())
        return LMOutput(logits if want_logits else None, loss, aux_loss, moe_aux)

    # --- accounting ---------------------------------------------------------------------------
    def n_params(self) -> int:
        """Trainable non-embedding parameters (paper, appendix E)."""
        skip = {id(self.embed.weight), id(self.head.weight)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def n_active_params(self) -> int:
        return self.n_params() - sum(m.n_params() - m.n_active_params() for m in self.moe_layers())

    def n_embedding_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in (self.embed.weight, self.head.weight)}.values())


class _FusedLinearCE(torch.autograd.Function):
    """mean CE(h @ w.T, targets) computed `chunk` tokens at a time. The gradients are formed in the
    forward pass (softmax - one_hot, then two matmuls per chunk), so the (tokens x vocab) logits
    never exist whole and nothing is recomputed in the backward."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, chunk: int, dtype: torch.dtype):
        T = h_TD.shape[0]
        h, w = h_TD.to(dtype), w_VD.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        acc = torch.promote_types(dtype, torch.float32)      # softmax and sums in fp32 at least
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want_w else None
        loss = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, T, chunk):
            h_c, t_c = h[s:s + chunk], targets_T[s:s + chunk]
            logits = (h_c @ w.t()).to(acc)
            lse = logits.logsumexp(-1)
            loss += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()            # softmax, in place of the logits
                g[torch.arange(len(t_c), device=g.device), t_c] -= 1
                g = g.div_(T).to(dtype)
                if want_h:
                    grad_h[s:s + chunk] = g @ w
                if want_w:
                    grad_w += (g.t() @ h_c).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_TD.dtype, w_VD.dtype)
        return (loss / T).float()

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * g).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * g).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None


def chunked_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, chunk: int):
    dev = h_TD.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev) if autocast else h_TD.dtype
    if not torch.is_grad_enabled():      # evaluation: no gradient buffers to fill
        h_TD, w_VD = h_TD.detach(), w_VD.detach()
    with torch.autocast(dev, enabled=False):
        return _FusedLinearCE.apply(h_TD, w_VD, targets_T, chunk, dtype)


def build_model(cfg: ModelConfig, impl: str | dict | Impl = "auto", device=None) -> LM:
    """The model on `device` (default CPU), its implementation resolved there once (moebench/impl.py:
    a request such as "auto", "ref" or "mixer=ref,moe=loop", or an Impl)."""
    device = torch.device(device or "cpu")
    impl = resolve(cfg, device, impl)
    with device:
        return LM(cfg, impl)


def flops_per_token(cfg: ModelConfig, n_active: int, ctx: int = 1024) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) on active weights:
    6 x (active non-embedding matmul parameters + head), plus causal attention scores
    (6 x n_layer x d_model x ctx: QK^T and AV over ctx/2 keys on average), plus the selective
    scan (about 9 x d_inner x d_state per Mamba layer forward, Gu & Dao)."""
    flops = 6.0 * (n_active + cfg.vocab_size * cfg.d_model)
    if cfg.mixer == "attention":
        flops += 6.0 * cfg.n_layer * cfg.d_model * ctx
    elif cfg.mixer == "mamba2":
        # SSD per token and layer, forward: the causal products inside a chunk (C·B per group, then
        # the heads' x over Q/2 positions on average) and the chunk states in and out (2 x 2PN a head)
        Q = min(cfg.chunk_size, ctx)
        flops += 3.0 * cfg.n_layer * (Q * (cfg.ngroups * cfg.d_state + cfg.d_inner) + 4 * cfg.d_inner * cfg.d_state)
    else:
        flops += 3.0 * 9 * cfg.n_layer * cfg.d_inner * cfg.d_state
    return flops


def describe(cfg: ModelConfig, ctx: int = 1024) -> dict:
    """Parameter counts and FLOPs of a variant, computed on the meta device (no memory used)."""
    model = build_model(cfg, impl="mixer=ref,moe=loop", device="meta")
    active = model.n_active_params()
    return {"name": cfg.name, "family": cfg.family, "mixer": cfg.mixer, "ffn": cfg.ffn,
            "layout": cfg.layout, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "n_expert": cfg.n_expert or cfg.inner_n_expert, "total_params": model.n_params(),
            "active_params": active, "embedding_params": model.n_embedding_params(),
            "flops_per_token": flops_per_token(cfg, active, ctx), "paper_ref": cfg.paper_ref}
