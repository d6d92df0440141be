"""CPU tests of the Mamba mixer and its ops: the reference scan against an independent naive
recurrence, the chunked scan against the sequential spec, and the module's layout, decoding,
masking and inner-MoE placements. Small shapes: the file runs in seconds on 2 cores."""
import itertools
import math
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moebench.models.mamba as mamba_mod
from moebench.config import INNER_PLACES, ModelConfig
from moebench.env import mamba_ssm_version
from moebench.impl import resolve_mixer
from moebench.models.mamba import Mamba
from moebench.ops import scan as scan_ops
from moebench.ops.conv import causal_conv1d, causal_conv1d_ref, causal_conv1d_update_ref
from moebench.ops.scan import (
    HAS_MAMBA_KERNELS,
    KERNEL_IMPORT_ERROR,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
    selective_state_update_ref,
)

INNER_COMBOS = [c for r in (1, 2, 3) for c in itertools.combinations(INNER_PLACES, r)]  # the 7 of table 3


def assert_close(actual, expected, rtol, name=""):
    """Relative error in norm, with max/mean absolute differences in the message."""
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    rel = (diff.norm() / expected.norm().clamp_min(1e-30)).item()
    assert rel <= rtol, (f"{name}: rel err {rel:.3e} > {rtol:.0e}; "
                         f"max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}")


def scan_inputs(Bsz=2, D=6, N=4, L=45, dtype=torch.float32, seed=0, delta_shift=-1.0):
    """Random inputs shaped like the mixer's: A < 0, delta before softplus around delta_shift."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(u=r(Bsz, D, L), delta=r(Bsz, D, L) * 0.5 + delta_shift, A=-torch.exp(r(D, N) * 0.5 + 0.5),
             B=r(Bsz, N, L), C=r(Bsz, N, L), D=r(D), z=r(Bsz, D, L), delta_bias=r(D) * 0.3)
    return {k: v.to(dtype) for k, v in t.items()}


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Written independently of the package: float64, loops over batch and time, softplus spelled out."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    Bsz, Dm, L = u.shape
    y = torch.empty(Bsz, Dm, L, dtype=torch.float64)
    last = torch.empty(Bsz, Dm, A.shape[1], dtype=torch.float64)
    for b in range(Bsz):
        h = torch.zeros_like(A)
        for t in range(L):
            dt = torch.log1p(torch.exp(delta[b, :, t] + delta_bias))
            h = torch.exp(dt[:, None] * A) * h + (dt * u[b, :, t])[:, None] * B[b, :, t][None, :]
            gate = z[b, :, t] * torch.sigmoid(z[b, :, t])
            y[b, :, t] = (h @ C[b, :, t] + D * u[b, :, t]) * gate
        last[b] = h
    return y, last


def call_scan(fn, t, **kw):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], z_BDL=t["z"], delta_bias_D=t["delta_bias"],
              delta_softplus=True, **kw)


# ----------------------------------------------------------------------------- ops


def test_ref_scan_matches_naive_recurrence():
    t = scan_inputs(L=23, dtype=torch.float64, seed=1)
    y, last = call_scan(selective_scan_ref, t, return_last_state=True)
    y_naive, last_naive = naive_scan(**t)
    assert_close(y, y_naive, 1e-12, "y")
    assert_close(last, last_naive, 1e-12, "last state")


def test_ref_scan_optional_args_and_dtype():
    t = scan_inputs(L=9, seed=2)
    y = selective_scan_ref(t["u"].bfloat16(), t["delta"], t["A"], t["B"], t["C"], delta_softplus=False)
    assert y.dtype == torch.bfloat16  # output in u's dtype, state math in fp32
    y32 = selective_scan_ref(t["u"].bfloat16().float(), t["delta"], t["A"], t["B"], t["C"], delta_softplus=False)
    assert_close(y.float(), y32, 1e-2, "bf16 u")


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("L,chunk", [(1, 32), (7, 32), (32, 32), (45, 8), (100, 32), (64, 16)])
def test_chunked_matches_sequential_fwd_bwd(dtype, rtol, L, chunk):
    t = {k: v.requires_grad_() for k, v in scan_inputs(L=L, dtype=dtype, seed=L + chunk).items()}
    grad_out = torch.randn(t["u"].shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    outs, grads = [], []
    for fn in (selective_scan_ref, lambda *a, **k: selective_scan_chunked(*a, chunk=chunk, **k)):
        y, last = call_scan(fn, t, return_last_state=True)
        grads.append(torch.autograd.grad((y * grad_out).sum() + last.sum(), list(t.values())))
        outs += [(y, last)]
    assert_close(outs[1][0], outs[0][0], rtol, "y")
    assert_close(outs[1][1], outs[0][1], rtol, "last state")
    for name, g_chunk, g_seq in zip(t, grads[1], grads[0]):
        assert_close(g_chunk, g_seq, rtol, f"grad {name}")


def test_chunked_scan_stable_for_large_steps():
    # Δ·A down to about -1e4 per step, and -1e5 summed over a chunk: exp must only see values <= 0
    t = {k: v.requires_grad_() for k, v in scan_inputs(L=70, seed=3, delta_shift=60.0).items()}
    y, last = call_scan(selective_scan_chunked, t, return_last_state=True)
    y_seq = call_scan(selective_scan_ref, t)
    (y.square().sum() + last.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(v.grad).all() for v in t.values())
    assert_close(y, y_seq, 1e-5, "y")


def test_dispatch_ref_is_chunked_on_cpu():
    t = scan_inputs(L=20, seed=4)
    assert torch.equal(call_scan(selective_scan, t, impl="ref"), call_scan(selective_scan_chunked, t))


def test_state_update_ref_steps_equal_scan():
    t = scan_inputs(L=12, dtype=torch.float64, seed=5)
    y_scan, last = call_scan(selective_scan_ref, t, return_last_state=True)
    state = torch.zeros_like(last)
    for i in range(12):
        y_i = selective_state_update_ref(state, t["u"][:, :, i], t["delta"][:, :, i], t["A"], t["B"][:, :, i],
                                         t["C"][:, :, i], t["D"], t["z"][:, :, i], t["delta_bias"])
        assert_close(y_i, y_scan[:, :, i], 1e-12, f"y step {i}")
    assert_close(state, last, 1e-12, "state")


@pytest.mark.parametrize("W", [2, 4])
def test_conv_ref_and_update(W):
    g = torch.Generator().manual_seed(W)
    x, w, b = torch.randn(2, 5, 11, generator=g), torch.randn(5, W, generator=g), torch.randn(5, generator=g)
    conv = nn.Conv1d(5, 5, W, groups=5, padding=W - 1)  # mamba_ssm's fallback: pad both sides, keep the first L
    with torch.no_grad():
        conv.weight.copy_(w[:, None]), conv.bias.copy_(b)
        expected = F.silu(conv(x)[..., :11])
    y = causal_conv1d_ref(x, w, b, "silu")
    assert_close(y, expected, 1e-6, "conv")
    assert torch.equal(causal_conv1d(x, w, b, "silu", impl="ref"), y)
    for S in (W, W - 1):  # mamba_ssm keeps W inputs; causal-conv1d also allows W-1
        state = torch.zeros(2, 5, S)
        steps = [causal_conv1d_update_ref(x[:, :, i], state, w, b, "silu") for i in range(11)]
        assert_close(torch.stack(steps, -1), y, 1e-6, f"conv update, state length {S}")
        assert torch.equal(state, x[:, :, -S:])


def test_kernel_detection_and_resolve_mixer():
    assert isinstance(HAS_MAMBA_KERNELS, bool)
    assert (KERNEL_IMPORT_ERROR is None) == HAS_MAMBA_KERNELS
    assert mamba_ssm_version() is None or isinstance(mamba_ssm_version(), str)
    cpu = torch.device("cpu")
    assert resolve_mixer("ref", cpu) == "ref"
    assert resolve_mixer("auto", cpu) == "ref"
    assert resolve_mixer("auto", "cpu") == "ref"
    with pytest.raises(RuntimeError, match="impl='fast' is unavailable"):
        resolve_mixer("fast", cpu)
    with pytest.raises(ValueError):
        resolve_mixer("cuda", cpu)
    with pytest.raises(RuntimeError):
        Mamba(16, impl="fast", device="cpu")
    x = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="impl='fast' is unavailable"):   # the ops take resolved impls
        causal_conv1d(x, torch.zeros(4, 4), impl="fast")
    with pytest.raises(ValueError, match="resolved"):
        causal_conv1d(x, torch.zeros(4, 4), impl="auto")


# ----------------------------------------------------------------------------- module

# mamba_ssm.Mamba(d_model=64) (d_state 16, d_conv 4, expand 2, dt_rank ceil(64/16) = 4)
MAMBA_SSM_STATE_DICT_64 = {
    "A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,), "x_proj.weight": (36, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
    "out_proj.weight": (64, 128),
}


def test_state_dict_layout_matches_mamba_ssm():
    m = Mamba(64)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_STATE_DICT_64
    m16 = Mamba(64, dtype=torch.bfloat16)
    assert m16.A_log.dtype == m16.D.dtype == torch.float32  # kept fp32, as in mamba_ssm
    assert m16.in_proj.weight.dtype == torch.bfloat16
    Mamba(64).load_state_dict(m.state_dict())


def test_init_matches_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit
    dt = F.softplus(m.dt_proj.bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5), (dt.min(), dt.max())
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    assert m.conv1d.groups == 128 and m.conv1d.padding == (3,) and m.conv1d.bias is not None
    assert m.in_proj.bias is None and m.x_proj.bias is None and m.out_proj.bias is None


@pytest.mark.parametrize("d_model,expand,d_inner", [(48, 2 / 3, 32), (48, 4 / 3, 64), (48, 8 / 3, 128),
                                                    (48, 10 / 3, 160), (40, 2 / 3, 27)])
def test_fractional_expand(d_model, expand, d_inner):
    cfg = ModelConfig(name="t", mixer="mamba", ffn="none", n_layer=1, d_model=d_model, expand=expand)
    assert cfg.d_inner == d_inner
    m = Mamba.from_config(cfg, layer_idx=0, impl="ref")
    assert m.d_inner == d_inner and m.in_proj.weight.shape == (2 * d_inner, d_model)
    assert m.dt_rank == math.ceil(d_model / 16)
    y, aux = m(torch.randn(2, 5, d_model))
    assert y.shape == (2, 5, d_model) and aux == []


def simple_mamba_forward(m: Mamba, x_BLD):
    """The mixer assembled from its modules the plain way (mamba_ssm's non-fused path without
    kernels), with the sequential scan: checks the module's layouts and splits."""
    L = x_BLD.shape[1]
    x, z = m.in_proj(x_BLD).transpose(1, 2).chunk(2, dim=1)
    u = F.silu(m.conv1d(x)[..., :L])
    dt, Bx, Cx = m.x_proj(u.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    y = selective_scan_ref(u, m.dt_proj(dt).transpose(1, 2), -torch.exp(m.A_log), Bx.transpose(1, 2),
                           Cx.transpose(1, 2), m.D, z_BDL=z, delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def test_module_forward_backward_cpu():
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, impl="ref")
    assert m.impl == "ref"
    x = torch.randn(2, 40, 32, requires_grad=True)
    y, aux = m(x)
    assert y.shape == x.shape and aux == []
    assert_close(y, simple_mamba_forward(m, x), 1e-5, "module vs plain assembly")
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_decode_steps_equal_forward():
    torch.manual_seed(1)
    m = Mamba(32, d_state=8, impl="ref").eval()
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        y_full, _ = m(x)
        state = m.allocate_state(2)
        y_steps = torch.stack([m.step(x[:, t], state)[0] for t in range(13)], dim=1)
        assert_close(y_steps, y_full, 1e-5, "step by step")
        for k in (1, 3, 4, 9):  # prefill shorter and longer than d_conv
            y_pre, _, state = m(x[:, :k], return_state=True)
            assert_close(y_pre, y_full[:, :k], 1e-5, f"prefill {k}")
            y_rest = [m.step(x[:, t], state)[0] for t in range(k, 13)]
            assert_close(torch.cat([y_pre, torch.stack(y_rest, 1)], 1), y_full, 1e-5, f"prefill {k} + steps")


def test_valid_mask_invariance():
    torch.manual_seed(2)
    m = Mamba(32, d_state=8, impl="ref")
    x = torch.randn(3, 20, 32)
    valid = torch.rand(3, 20) > 0.3
    valid[:, 0] = False  # padded on the left, as well as scattered holes
    x2 = x.clone()
    x2[~valid] = torch.randn(int((~valid).sum()), 32) * 100
    x2[0, 0, 0] = float("nan")
    y1, _ = m(x, valid_BL=valid)
    y2, _ = m(x2, valid_BL=valid)
    assert torch.equal(y1[valid], y2[valid])
    y3, _ = m(x2)  # without the mask the change leaks into later positions: the test has teeth
    assert not torch.allclose(y1[valid], y3[valid])


# ----------------------------------------------------------------------------- inner MoE


class _StandInAux(NamedTuple):
    lb_loss: torch.Tensor
    dropped_frac: torch.Tensor
    tokens_per_expert: torch.Tensor


class _StandInMoE(nn.Module):
    """The moe.py contract, token-wise and deterministic: checks the mixer's wiring only."""

    def __init__(self, d_in, d_hidden, d_out, n_expert, top_k=1, capacity_factor=1.0, aux_loss_coef=0.01,
                 activation="relu", impl="auto", routing="auto", decode=False):
        super().__init__()
        self.w1, self.w2, self.n_expert, self.seen = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out), n_expert, []

    def forward(self, x_TD, valid_T=None, need_aux=True):
        assert x_TD.dim() == 2
        self.seen.append(None if valid_T is None else valid_T.shape)
        y = self.w2(F.relu(self.w1(x_TD)))
        zero = y.sum() * 0
        return y, _StandInAux(zero, zero.detach(), torch.zeros(self.n_expert)) if need_aux else None


MOE_KWARGS = dict(n_expert=2, d_hidden=16, top_k=1, capacity_factor=2.0, aux_loss_coef=0.01, activation="relu",
                  impl="loop")  # the MoE's own impl names


@pytest.mark.parametrize("places", INNER_COMBOS, ids="+".join)
def test_inner_moe_wiring_with_stand_in(places, monkeypatch):
    monkeypatch.setattr(mamba_mod, "MoE", _StandInMoE)
    torch.manual_seed(3)
    m = Mamba(24, d_state=4, impl="ref", inner_places=places, inner_moe_kwargs=MOE_KWARGS).eval()
    children = {n for n, _ in m.named_children()}
    expected = {"conv1d", "x_proj", "dt_proj"} | {f"{p}_moe" for p in places}
    if "conv" not in places and "gate" not in places:
        expected.add("in_proj")
    else:
        expected |= {f"in_proj_{b}" for p, b in (("conv", "x"), ("gate", "z")) if p not in places}
    expected |= set() if "out" in places else {"out_proj"}
    assert children == expected
    x = torch.randn(2, 9, 24, requires_grad=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    y, aux = m(x, valid_BL=valid)
    assert len(aux) == len(places) and all(getattr(m, f"{p}_moe").seen == [(18,)] for p in places)
    (y.square().mean() + sum(a.lb_loss for a in aux)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():  # decoding runs the MoEs on one token per sequence
        state = m.allocate_state(2)
        y_steps = torch.stack([m.step(x[:, t], state)[0] for t in range(9)], 1)
    assert_close(y_steps, y, 1e-5, "inner MoE decode")


@pytest.mark.parametrize("places", INNER_COMBOS, ids="+".join)
def test_inner_moe_placements_real_moe(places):
    torch.manual_seed(4)
    m = Mamba(24, d_state=4, impl="ref", inner_places=places, inner_moe_kwargs=MOE_KWARGS)
    x = torch.randn(2, 32, 24, requires_grad=True)
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, :5] = False
    y, aux = m(x, valid_BL=valid)
    assert y.shape == x.shape and len(aux) == len(places)
    for a in aux:
        assert a.lb_loss.dim() == 0 and a.tokens_per_expert.shape == (2,)
    (y[valid].square().mean() + sum(a.lb_loss for a in aux)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    x2 = x.detach().clone()
    x2[~valid] = 100.0  # masked tokens neither leak through the scan nor take expert capacity
    with torch.no_grad():
        assert torch.equal(m(x2, valid_BL=valid)[0][valid], y.detach()[valid])


def test_inner_moe_real_decode_dropless():
    torch.manual_seed(5)
    kw = dict(MOE_KWARGS, capacity_factor=None)  # generate.py decodes dropless
    m = Mamba(24, d_state=4, impl="ref", inner_places=INNER_PLACES, inner_moe_kwargs=kw).eval()
    x = torch.randn(2, 11, 24)
    with torch.no_grad():
        y_full, _ = m(x)
        y_pre, _, state = m(x[:, :6], return_state=True)
        y_rest = torch.stack([m.step(x[:, t], state)[0] for t in range(6, 11)], 1)
    assert_close(torch.cat([y_pre, y_rest], 1), y_full, 1e-5, "inner MoE prefill + steps")


def test_from_config_inner_every_other_layer():
    cfg = ModelConfig(name="t", mixer="mamba", ffn="none", n_layer=2, d_model=32, inner_moe=("gate", "conv"),
                      inner_every=2, inner_n_expert=4, inner_d_hidden=16, capacity_factor=2.0)
    m0, m1 = Mamba.from_config(cfg, 0, impl="ref"), Mamba.from_config(cfg, 1, impl="ref")
    assert m0.inner_places == ("conv", "gate") and m1.inner_places == ()
    assert hasattr(m0, "conv_moe") and hasattr(m0, "gate_moe") and hasattr(m0, "out_proj")
    assert not hasattr(m0, "in_proj") and hasattr(m1, "in_proj")
    y, aux = m0(torch.randn(2, 8, 32))
    assert y.shape == (2, 8, 32) and len(aux) == 2


def test_scan_module_has_no_global_side_effects():
    # the reference scan must not leave autocast disabled behind it
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call_scan(selective_scan_chunked, scan_inputs(L=5))
        assert torch.is_autocast_enabled("cpu")
    assert scan_ops.kernels.selective_scan_fn is None or HAS_MAMBA_KERNELS
