import pytest
import torch
import torch.nn.functional as F

from moebench import create_mamba_moe
from moebench.models.lm import build_model, chunked_cross_entropy
from moebench.registry import get


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_fused_chunked_cross_entropy_equals_plain(chunk):
    torch.manual_seed(chunk)
    h = torch.randn(100, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (100,))
    ref = F.cross_entropy(h @ w.t(), t)
    gh_ref, gw_ref = torch.autograd.grad(ref * 3, (h, w))
    got = chunked_cross_entropy(h, w, t, chunk)
    gh, gw = torch.autograd.grad(got * 3, (h, w))
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-8)


def test_lm_loss_chunk_matches_full_logits():
    torch.manual_seed(0)
    model = build_model(get("Transformer_25M@tiny"))
    idx = torch.randint(0, 50257, (2, 24))
    full = model(idx, idx.roll(-1, 1))
    chunked = model(idx, idx.roll(-1, 1), return_logits=False, loss_chunk=10)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-5)
    assert chunked.logits is None


def test_create_mamba_moe_shapes_aux_and_router_gradient():
    torch.manual_seed(0)
    model = create_mamba_moe(dim=64, depth=2, d_state=8, d_conv=2, expand=1, num_experts=4,
                             expert_dim=128, max_seq_len=64)
    x = torch.randn(2, 32, 64, requires_grad=True)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert model.aux_loss is not None and model.aux_loss.item() > 0
    y.pow(2).mean().backward()        # the task loss alone must train the router (through p_I)
    for block in model.blocks:
        assert block.ffn.router_DE.grad is not None and block.ffn.router_DE.grad.abs().sum() > 0
    assert len(model.moe_aux) == 2
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randn(1, 65, 64))


def test_create_mamba_moe_mask_isolates_masked_positions():
    torch.manual_seed(0)
    model = create_mamba_moe(dim=64, depth=2, d_state=8, d_conv=4, expand=2, num_experts=4,
                             expert_dim=128, max_seq_len=64)
    model.eval()                      # dropless: routing of one token never depends on another
    x = torch.randn(2, 20, 64)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 3:7] = False
    mask[1, :5] = False               # left padding
    y1 = model(x, mask)
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 64) * 100
    y2 = model(x2, mask)
    torch.testing.assert_close(y1[mask], y2[mask], rtol=1e-5, atol=1e-5)
    assert (y1[~mask] == 0).all()
    # training mode too: masked tokens take no capacity and do not change others' routing
    model.train()
    torch.testing.assert_close(model(x, mask)[mask], model(x2, mask)[mask], rtol=1e-5, atol=1e-5)
