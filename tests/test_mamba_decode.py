"""The fused Mamba decode sublayer (moebench/ops/mamba_decode.py) against the unfused step
(norm, Mamba.step, residual add) it replaces, and inside whole models' decoding. On a CPU the
kernels run under Triton's interpreter (set in conftest.py), so the shapes are tiny."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moebench.generate import cast_for_inference
from moebench.models.mamba import Mamba
from moebench.ops import mamba_decode
from moebench.ops.mamba_decode import mamba_decode_residual

pytestmark = pytest.mark.usefixtures("triton_runs")   # conftest.py: a GPU, or the interpreter on a CPU

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
NORMS = {"layernorm": lambda d: nn.LayerNorm(d), "layernorm-nobias": lambda d: nn.LayerNorm(d, bias=False),
         "rmsnorm": lambda d: nn.RMSNorm(d)}


def sublayer(norm: str, d_model: int, d_state: int, d_conv: int, dtype, seed: int):
    torch.manual_seed(seed)
    mixer = Mamba(d_model, d_state=d_state, d_conv=d_conv, impl="ref").to(DEV)
    norm_mod = NORMS[norm](d_model).to(DEV)
    with torch.no_grad():           # a trained-looking norm: weight and bias away from 1 and 0
        norm_mod.weight.uniform_(0.5, 1.5)
        if getattr(norm_mod, "bias", None) is not None:
            norm_mod.bias.uniform_(-0.5, 0.5)
        mixer.D.uniform_(0.5, 1.5)
    for m in (mixer, norm_mod):
        cast_for_inference(m, dtype)
    return mixer, norm_mod


def random_state(mixer, B: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    conv_BIW, ssm_BIN = mixer.allocate_state(B, DEV, dtype)
    conv_BIW.copy_(torch.randn(conv_BIW.shape, generator=gen))
    ssm_BIN.copy_(torch.randn(ssm_BIN.shape, generator=gen))
    return conv_BIW, ssm_BIN


def unfused(x_BD, norm_mod, mixer, state):
    y_BD, state = mixer.step(norm_mod(x_BD), state)
    return x_BD + y_BD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("B,d_model,d_state,d_conv", [(1, 32, 16, 4), (5, 48, 4, 2), (20, 32, 16, 3)])
def test_matches_unfused_step(B, d_model, d_state, d_conv, norm, dtype):
    """Three steps from a random state: the output and both states equal the unfused step's.
    d_model 48: d_inner 96 is not a multiple of the kernels' 32/64-channel blocks; dt_rank 2-3 and
    d_state 4 are padded to tl.dot's 16."""
    mixer, norm_mod = sublayer(norm, d_model, d_state, d_conv, dtype, seed=B)
    fused_state = random_state(mixer, B, dtype, seed=B + 1)
    ref_state = tuple(s.clone() for s in fused_state)
    gen = torch.Generator().manual_seed(B + 2)
    with torch.no_grad():
        for step in range(3):
            x_BD = (torch.randn(B, d_model, generator=gen) * 2 + 0.5).to(DEV, dtype)
            got = mamba_decode_residual(x_BD, norm_mod, mixer, fused_state)
            want = unfused(x_BD, norm_mod, mixer, ref_state)
            assert got.shape == x_BD.shape and got.dtype == dtype
            torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"output, step {step}: {m}")
            for name, g, w in zip(("conv state", "ssm state"), fused_state, ref_state):
                torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{name}, step {step}: {m}")


def test_rejects_what_it_cannot_run():
    mixer, norm_mod = sublayer("layernorm", 32, 16, 4, torch.float32, seed=0)
    state = mixer.allocate_state(2, DEV, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="tokens of width 32"):
        mamba_decode_residual(torch.zeros(2, 48, device=DEV), norm_mod, mixer, state)
    with torch.no_grad(), pytest.raises(TypeError, match="in x's dtype"):
        mamba_decode_residual(torch.zeros(2, 32, device=DEV, dtype=torch.bfloat16), norm_mod, mixer, state)
    with torch.no_grad(), pytest.raises(ValueError, match="state shapes"):
        mamba_decode_residual(torch.zeros(3, 32, device=DEV), norm_mod, mixer, state)


@pytest.mark.parametrize("name", ["Mamba_25M", "MoE-Mamba_25M"])
def test_model_decoding_takes_the_kernels(name, monkeypatch):
    """Block.step sends every Mamba sublayer through the kernels (decode=on takes them on a CPU too);
    the steps equal the full forward, as the unfused steps do (tests/test_generate.py)."""
    from test_generate import assert_decoding_matches, tiny_model   # tests/ is on sys.path (prepend mode)
    model = tiny_model(name, impl="mixer=ref,moe=loop,decode=on", device=DEV)
    assert all(b.mixer_decode for b in model.blocks)
    calls = []
    real = mamba_decode.mamba_decode_residual
    monkeypatch.setattr(mamba_decode, "mamba_decode_residual", lambda *a: calls.append(1) or real(*a))
    idx_BL = torch.randint(0, 50257, (3, 8), generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad():
        full_BLV = model(idx_BL).logits
    assert not calls, "the full forward must not take the decode kernels"
    assert_decoding_matches(name, model, idx_BL, full_BLV)
    assert len(calls) == len(model.blocks) * (idx_BL.shape[1] - 4)
