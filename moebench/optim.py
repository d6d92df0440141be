"""AdamW groups, the paper's learning-rate schedule and default learning rates (appendix A)."""
from __future__ import annotations

import math

import torch
from torch import nn

from moebench.config import ModelConfig, TrainConfig


def default_lr(cfg: ModelConfig) -> float:
    """Tables 5 and 6. Mamba without an FFN (inner-MoE variants too) uses Mamba's rate; Mamba with
    an FFN or MoE uses MoE-Mamba's; Transformer-MoE at 100M scale is halved as in the paper."""
    if cfg.mixer == "attention":
        return 2.5e-4 if cfg.ffn == "moe" and cfg.d_model >= 768 else 5e-4
    return 1e-3 if cfg.ffn == "none" else 5e-4


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, embeddings, A_log and D (tagged `_no_weight_decay`)."""
    no_decay_ids = {id(p) for m in model.modules()
                    if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.Embedding)) for p in m.parameters()}
    decay, no_decay = [], []
    head = getattr(model, "head", None)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (id(p) in no_decay_ids or name.endswith("bias") or getattr(p, "_no_weight_decay", False))
        if head is not None and p is head.weight and getattr(model.cfg, "tie_embeddings", False):
            skip = True
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, tcfg: TrainConfig, lr: float, device: torch.device):
    return torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=lr, betas=tuple(tcfg.betas),
                             eps=tcfg.eps, fused=device.type == "cuda")


def clip_grad_norm(opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same norm, same clip factor), with the scaling of the gradients
    folded into a fused optimizer's next step(): fused AdamW divides each gradient by `grad_scale` as
    it reads it, which saves a read and a write of every gradient (1.6 GB per step for
    MoE-Mamba_25M-e32's 400M fp32 parameters). Returns the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if opt.defaults.get("fused"):
        # 1 / clip_grads_with_norm_'s factor min(max_norm / (norm + 1e-6), 1)
        opt.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def lr_at(step: int, total_steps: int, lr: float, warmup_frac: float, min_ratio: float) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from lr to min_ratio * lr."""
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
