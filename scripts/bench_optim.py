"""The optimizer step and the clipping norm of MoE-Mamba_25M-e32 (470M fp32 parameters, 402M of
them in expert tensors) on a GPU: torch's fused AdamW against optim.AdamW's Triton step for the
large tensors, at a few block sizes. Random gradients; CUDA-synchronised medians.

    usage (device machine, repo root, after `. scripts/device_env.sh`):  python3 scripts/bench_optim.py
"""
from __future__ import annotations

import torch

from moebench.bench.common import median_ms as bench_median_ms
from moebench.config import TrainConfig
from moebench.models.lm import build_model
from moebench.ops import adamw as adamw_ops
from moebench.optim import AdamW, clip_grad_norm, param_groups
from moebench.registry import get

DEV = torch.device("cuda")


def median_ms(fn, repeats: int = 20) -> float:
    return bench_median_ms(fn, DEV, repeats, warmup=3)


def main() -> None:
    model = build_model(get("MoE-Mamba_25M-e32"), device=DEV)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n_large = sum(p.numel() for p in params if p.numel() >= 1 << 20)
    print(f"{torch.cuda.get_device_name(0)}: {sum(p.numel() for p in params) / 1e6:.0f}M parameters, "
          f"{n_large / 1e6:.0f}M in tensors of >= 2^20 elements")
    tcfg = TrainConfig(tokens=1)
    for label, triton_large, block, warps in [("torch fused", False, 0, 0), ("triton", True, 1024, 4),
                                              ("triton", True, 2048, 4), ("triton", True, 4096, 8),
                                              ("triton", True, 8192, 8), ("triton", True, 4096, 4)]:
        if triton_large:
            adamw_ops.BLOCK, adamw_ops.NUM_WARPS = block, warps
        opt = AdamW(param_groups(model, tcfg.weight_decay), lr=1e-4, fused=True, triton_large=triton_large)
        norm_ms = median_ms(lambda: clip_grad_norm(opt, params, 0.5))
        step_ms = median_ms(opt.step)
        # bytes the large tensors need at the least: 28 per element (the Triton step), 32 for torch's
        # (it writes the unscaled gradient back)
        gbs = n_large * (28 if triton_large else 32) / (step_ms * 1e-3) / 1e9
        print(f"{label:12s} BLOCK {block:5d} warps {warps}: norm {norm_ms:6.3f} ms, step {step_ms:6.3f} ms "
              f"(all tensors; large ones alone would stream at >= {gbs:5.0f} GB/s)")
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
