import math

import pytest
import torch

from moebench.errors import UserError
from moebench.models.lm import build_model, describe
from moebench.registry import VARIANTS, get

# (total, active) non-embedding parameters in millions, from the paper (tables 1, 4, 5, 6)
PAPER_PARAMS = {
    "Mamba_25M": (27, 27),
    "MoE-Mamba_25M": (542, 26),
    "Transformer-MoE_25M": (545, 25),
    "Transformer_25M": (25, 25),
    "MoE-Mamba_25M-e1": (26, 26),
    "MoE-Mamba_25M-e4": (64, 26),
    "MoE-Mamba_25M-e8": (114, 26),
    "MoE-Mamba_25M-e16": (215, 26),
    "MoE-Mamba_25M-e32": (416, 26),
    "Mamba_100M": (121, 121),
    "MoE-Mamba_100M": (2439, 117),
    "Transformer-MoE_100M": (2454, 114),
}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_parameter_counts_match_paper(name):
    d = describe(get(name))
    total, active = PAPER_PARAMS[name]
    # the paper rounds to whole millions: within 2% or the rounding, whichever is larger
    for ours, paper in ((d["total_params"] / 1e6, total), (d["active_params"] / 1e6, active)):
        assert abs(ours - paper) <= max(0.02 * paper, 0.5), f"{name}: ours {ours:.2f}M vs paper {paper}M"


def test_ratio_variants_keep_active_params():
    # table 2: every ratio has about 26M active parameters
    for r in ("1to5", "2to4", "3to3", "4to2", "5to1"):
        active = describe(get(f"MoE-Mamba_25M-ratio{r}"))["active_params"] / 1e6
        assert 24.5 < active < 27.5, (r, active)
    assert get("MoE-Mamba_25M-ratio1to5").d_inner == 341    # round(2/3 * 512)
    assert get("MoE-Mamba_25M-ratio5to1").d_inner == 1707   # round(10/3 * 512)


def test_inner_moe_expert_split():
    cfg = get("InnerMoE_25M-conv+gate+out-all")
    model = build_model(cfg, impl="mixer=ref,moe=loop", device="meta")
    mixer = model.blocks[0].mixer
    assert [mixer.conv_moe.n_expert, mixer.gate_moe.n_expert, mixer.out_moe.n_expert] == [8, 8, 8]
    every2 = build_model(get("InnerMoE_25M-conv+gate-every2"), impl="mixer=ref,moe=loop", device="meta")
    assert every2.blocks[0].mixer.conv_moe.n_expert == 24
    assert not hasattr(every2.blocks[1].mixer, "conv_moe")
    assert len(VARIANTS) >= 14 + 14


def test_unknown_variant_suggests():
    with pytest.raises(UserError, match="did you mean MoE-Mamba_25M"):
        get("MoE-Mamba_25")


@pytest.mark.parametrize("name", list(VARIANTS), ids=list(VARIANTS))
def test_tiny_twin_forward_backward(name):
    torch.manual_seed(0)
    cfg = get(name + "@tiny")
    model = build_model(cfg, impl="ref")
    idx = torch.randint(0, cfg.vocab_size, (2, 64))  # enough tokens that every MoE has capacity >= 1
    out = model(idx, idx.roll(-1, 1))
    assert math.isfinite(out.loss.item())
    (out.loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    n_moe = sum(1 for m in model.modules() if hasattr(m, "router_DE"))
    assert len(out.moe_aux) == n_moe
