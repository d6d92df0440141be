"""AdamW groups, gradient clipping folded into the fused step, and the paper's learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from moebench.ops import adamw as adamw_ops


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


LARGE = 1 << 20     # elements: from here on an fp32 tensor takes the Triton step (the experts)


def _on_triton(t: torch.Tensor, large: int) -> bool:
    """A tensor of the Triton path: large enough, fp32, contiguous (the step's and the norm's rule)."""
    return t.numel() >= large and adamw_ops.supported(t)


class AdamW(torch.optim.AdamW):
    """torch's AdamW (same state, same state_dict), whose tensors of >= `large` fp32 elements (the
    experts' weights) are stepped by moebench/ops/adamw.py when `triton_large`: one kernel per tensor
    that does not write the gradient back, as torch's fused step does when given a grad_scale.
    The rest, and everything when triton_large is False, go through torch's step unchanged."""

    def __init__(self, params, *, triton_large: bool = False, large: int = LARGE, **kw):
        super().__init__(params, **kw)
        self.triton_large, self.large = triton_large, large

    def _large_params(self) -> list[tuple[dict, torch.Tensor]]:
        if not self.triton_large:
            return []
        return [(g, p) for g in self.param_groups if not (g["amsgrad"] or g["maximize"]) for p in g["params"]
                if p.grad is not None and _on_triton(p, self.large) and adamw_ops.supported(p.grad)]

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        large = self._large_params()
        grads = [p.grad for _, p in large]
        for _, p in large:             # torch's step skips parameters without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for (_, p), g in zip(large, grads):
                p.grad = g
        if not large:
            return None
        for _, p in large:
            st = self.state[p]
            if not st:                 # as torch's fused _init_group: a 0-d fp32 step on the device
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        torch._foreach_add_([self.state[p]["step"] for _, p in large], 1)
        scale = getattr(self, "grad_scale", None)
        for (g, p), grad in zip(large, grads):
            st = self.state[p]
            b1, b2 = g["betas"]
            adamw_ops.adamw_step_(p, grad, st["exp_avg"], st["exp_avg_sq"], st["step"], lr=float(g["lr"]),
                                  beta1=float(b1), beta2=float(b2), weight_decay=g["weight_decay"], eps=g["eps"],
                                  grad_scale=scale)
        return None


def make_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> AdamW:
    """AdamW with the paper's hyperparameters (TrainConfig's defaults), stepped as the model's
    Impl.adamw says (moebench/impl.py): 'torch', torch's for-each step; 'fused', torch's fused step
    (CUDA); 'triton', the fused step with the expert-sized tensors on the Triton step."""
    adamw = model.impl.adamw
    return AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=adamw != "torch",
                 triton_large=adamw == "triton")


def grad_norm(grads: list[torch.Tensor], triton_large: bool = False, large: int = LARGE) -> torch.Tensor:
    """The 2-norm of all gradients together, as torch.nn.utils.get_total_norm; with triton_large the
    large fp32 ones are summed by one bandwidth-bound Triton kernel each (same value to rounding)."""
    big = [g for g in grads if triton_large and _on_triton(g, large)]
    if not big:
        return torch.nn.utils.get_total_norm(grads)
    ids = {id(g) for g in big}
    small = [g for g in grads if id(g) not in ids]
    sq = torch.stack([adamw_ops.sum_of_squares(g) for g in big]).sum()
    if small:
        sq = sq + torch.nn.utils.get_total_norm(small).float() ** 2
    return sq.sqrt()


def clip_grad_norm(opt: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (same norm, same clip factor), with the scaling of the gradients
    folded into a fused optimizer's next step(): fused AdamW divides each gradient by `grad_scale` as
    it reads it, which saves a read and a write of every gradient (1.6 GB per step for
    MoE-Mamba_25M-e32's 400M fp32 parameters). Returns the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = grad_norm(grads, getattr(opt, "triton_large", False), getattr(opt, "large", LARGE))
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
