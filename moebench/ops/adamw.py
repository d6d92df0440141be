"""AdamW's step and the gradient's sum of squares for large fp32 tensors, in Triton.

Why: MoE-Mamba_25M-e32 has 402M expert parameters beside 70M others, so per training step the
optimizer streams ~15 GB. torch's fused AdamW, given a grad_scale (our folded gradient clipping,
moebench/optim.py), also writes the unscaled gradient back: 4 bytes per parameter that nobody reads.
This kernel does the same arithmetic without that write: per element it reads param, grad, exp_avg,
exp_avg_sq and writes param, exp_avg, exp_avg_sq (28 bytes).

Math as torch's fused AdamW (fp32 opmath, bias corrections in fp64 from the device-side step):
    g = grad / grad_scale;  p -= lr·wd·p;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²
    p -= lr / (1-β1^step) · m / (sqrt(v) / sqrt(1-β2^step) + eps)
It agrees with torch to fp32 rounding, not bitwise (tests/test_adamw.py). On a CPU it runs under
Triton's interpreter, which the tests use.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BLOCK, NUM_WARPS = 4096, 8         # scripts/bench_optim.py measures alternatives
SUMSQ_BLOCK = 8192

if HAS_TRITON:
    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, n, lr, beta1, beta2, one_m_beta1,
                      one_m_beta2, log_beta1, log_beta2, wd, eps, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        # float arguments arrive as fp32: 1-β and log β come from the host's doubles, so that
        # 1 - β2 and the bias corrections 1 - β^step (fp64 here) keep their relative precision
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        step = tl.load(step_ptr).to(tl.float64)
        bc1 = 1.0 - tl.exp(step * log_beta1)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2)).to(tl.float32)
        step_size = (lr / bc1).to(tl.float32)
        p = tl.load(p_ptr + i, mask=ok, other=0.0)
        g = tl.load(g_ptr + i, mask=ok, other=0.0)
        m = tl.load(m_ptr + i, mask=ok, other=0.0)
        v = tl.load(v_ptr + i, mask=ok, other=0.0)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        p = p - (lr * wd) * p
        m = beta1 * m + one_m_beta1 * g
        v = beta2 * v + one_m_beta2 * g * g
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + i, p, mask=ok)
        tl.store(m_ptr + i, m, mask=ok)
        tl.store(v_ptr + i, v, mask=ok)

    @triton.jit
    def _sumsq_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(x * x, axis=0))


def supported(p: torch.Tensor) -> bool:
    """The kernel's tensors: fp32 and contiguous, with triton importable (on CPU: interpreter)."""
    return HAS_TRITON and p.dtype == torch.float32 and p.is_contiguous()


def adamw_step_(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: torch.Tensor, *, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW update of p, exp_avg and exp_avg_sq in place; `step` (a 0-d fp32 tensor on p's
    device) must already count this step. The gradient is divided by grad_scale, never written."""
    assert all(supported(t) for t in (p, grad, exp_avg, exp_avg_sq)), "fp32 contiguous tensors only"
    n = p.numel()
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p, grad, exp_avg, exp_avg_sq, step, grad_scale if grad_scale is not None else step, n,
        float(lr), float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2, math.log(beta1), math.log(beta2),
        float(weight_decay), float(eps),
        HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² in fp32 as a 0-d tensor: per-block partial sums, then one sum (deterministic, no atomics)."""
    assert supported(x), "fp32 contiguous tensors only"
    n = x.numel()
    parts = torch.empty(triton.cdiv(n, SUMSQ_BLOCK), dtype=torch.float32, device=x.device)
    _sumsq_kernel[(parts.numel(),)](x, parts, n, BLOCK=SUMSQ_BLOCK, num_warps=8)
    return parts.sum()
