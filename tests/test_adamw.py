"""optim.AdamW's Triton step for large tensors (moebench/ops/adamw.py) and optim.grad_norm against
torch's AdamW and get_total_norm. On a CPU the kernels run under Triton's interpreter (conftest.py),
on a GPU machine compiled, on CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moebench.ops import adamw as adamw_ops
from moebench.optim import AdamW, clip_grad_norm, grad_norm

pytestmark = pytest.mark.usefixtures("triton_runs")   # conftest.py: a GPU, or the interpreter on a CPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _model():
    torch.manual_seed(0)
    # 5000-element weights are "large" at large=4096 (not a multiple of the kernel's block: a ragged tail)
    return nn.Sequential(nn.Linear(50, 100), nn.ReLU(), nn.Linear(100, 7)).to(DEV)


def _train(triton_large: bool, grad_mult: float, steps: int = 4, reload: bool = False):
    model = _model()
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    opt = AdamW(groups, lr=3e-2, betas=(0.9, 0.95), eps=1e-8, fused=True,
                triton_large=triton_large, large=4096)
    params = list(model.parameters())
    for s in range(steps):
        x = torch.randn(32, 50, generator=torch.Generator().manual_seed(s)).to(DEV)
        (model(x).square().mean() * grad_mult).backward()
        clip_grad_norm(opt, params, 0.5)
        for g in opt.param_groups:
            g["lr"] = 3e-2 * (s + 1) / steps          # a schedule: lr changes every step
        opt.step()
        opt.zero_grad(set_to_none=True)
        if reload and s == 1:                          # a checkpoint round trip mid-run
            sd = opt.state_dict()
            opt = AdamW(groups, lr=3e-2, betas=(0.9, 0.95), eps=1e-8, fused=True,
                        triton_large=triton_large, large=4096)
            opt.load_state_dict(sd)
    return model, opt


@pytest.mark.parametrize("grad_mult", [1e-3, 100.0])   # clipping off, on
def test_triton_step_equals_torch(grad_mult):
    ref, ref_opt = _train(False, grad_mult)
    got, got_opt = _train(True, grad_mult)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    for p_got, p_ref in zip(got.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            want = ref_opt.state[p_ref][key].cpu()
            torch.testing.assert_close(got_opt.state[p_got][key].cpu(), want,
                                       rtol=2e-5, atol=1e-5 * float(want.abs().max()))
    assert got_opt._large_params() == []             # no gradients left after zero_grad


def test_triton_step_survives_state_dict_round_trip():
    ref, _ = _train(False, 1.0, reload=True)
    got, _ = _train(True, 1.0, reload=True)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_large_params_are_the_big_fp32_ones_and_grads_are_untouched():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2, fused=True, triton_large=True, large=4096)
    (model(torch.randn(4, 50, device=DEV)).sum()).backward()
    assert [p.shape for _, p in opt._large_params()] == [model[0].weight.shape]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.grad_scale = torch.tensor(4.0, device=DEV)
    opt.step()
    # the Triton step divides by grad_scale as it reads and never writes the gradient back
    torch.testing.assert_close(model[0].weight.grad, grads[0], rtol=0, atol=0)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("n", [1, 8191, 8192, 20001])
def test_grad_norm_equals_get_total_norm(n):
    g = torch.Generator().manual_seed(n)
    grads = [torch.randn(n, generator=g).to(DEV), torch.randn(3, 5, generator=g).to(DEV),
             torch.randn(40, 250, generator=g).to(DEV)]
    want = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(grad_norm(grads, triton_large=True, large=4096), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(adamw_ops.sum_of_squares(grads[0]), grads[0].square().sum(), rtol=1e-5, atol=1e-6)
