"""optim.clip_grad_norm: clip_grad_norm_'s clipping, folded into fused AdamW's step as grad_scale."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moebench.optim import clip_grad_norm


def _train(fused: bool, grad_mult: float, steps: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), fused=fused)
    params = list(model.parameters())
    norms = []
    for s in range(steps):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(s))
        (model(x).square().mean() * grad_mult).backward()
        if fused:
            norms.append(clip_grad_norm(opt, params, 0.5))
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, 0.5))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, torch.stack(norms)


@pytest.mark.parametrize("grad_mult", [1e-3, 30.0, 1000.0])   # clipping off, on, on hard
def test_fused_clip_equals_clip_grad_norm(grad_mult):
    ref, ref_norms = _train(False, grad_mult)
    got, got_norms = _train(True, grad_mult)
    torch.testing.assert_close(got_norms, ref_norms)
    if grad_mult > 1e-2:
        assert (ref_norms > 0.5).all(), "the case must actually clip"
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unfused_optimizer_clips_in_place():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    opt = torch.optim.AdamW([p], fused=False)
    norm = clip_grad_norm(opt, [p], 1.0)
    assert float(norm) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert getattr(opt, "grad_scale", None) is None
