"""Mamba-2 on CPU: the chunked SSD (the reference path) against a naive recurrence written out here,
forward and backward; decode steps against the full forward; the gated norm; the mixer's layout,
padding and the Mamba-2 variants. The fast path (mamba-ssm's Triton kernels) against this reference
is tests/test_gpu_mamba2.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moebench.config import ModelConfig
from moebench.models.lm import build_model, describe
from moebench.models.mamba2 import Mamba2
from moebench.ops.ssd import rmsnorm_gated_ref, ssd, ssd_chunked, ssd_sequential, ssd_step_ref
from moebench.registry import get

pytestmark = pytest.mark.usefixtures("one_thread")


def ssd_inputs(Bsz=2, L=37, H=4, P=3, G=2, N=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=r(Bsz, L, H, P), dt=r(Bsz, L, H) - 1, A=-torch.exp(r(H)), B=r(Bsz, L, G, N), C=r(Bsz, L, G, N),
                D=r(H), dt_bias=r(H) * 0.3, h0=r(Bsz, H, P, N))


def naive_ssd(x, dt, A, B, C, D, dt_bias, h0):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T per head; y_t = h_t C_t + D x_t; head h reads group
    h // (H / G). Scalar loops over batch and head: independent of the vectorised code."""
    Bsz, L, H, P = x.shape
    G = B.shape[2]
    y = torch.zeros_like(x)
    h = h0.clone()
    for b in range(Bsz):
        for hd in range(H):
            g = hd // (H // G)
            for t in range(L):
                d = F.softplus(dt[b, t, hd] + dt_bias[hd])
                h[b, hd] = torch.exp(d * A[hd]) * h[b, hd] + d * torch.outer(x[b, t, hd], B[b, t, g])
                y[b, t, hd] = h[b, hd] @ C[b, t, g] + D[hd] * x[b, t, hd]
    return y, h


def call(fn, t, **kw):
    return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], initial_state_BHPN=t["h0"],
              return_final_state=True, **kw)


def test_sequential_matches_naive_recurrence():
    t = ssd_inputs(L=9)
    y, h = call(ssd_sequential, t)
    y_n, h_n = naive_ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], t["h0"])
    torch.testing.assert_close(y, y_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_n, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-11)], ids=["fp32", "fp64"])  # fp32: sums of ~200 terms
@pytest.mark.parametrize("L,chunk", [(1, 8), (7, 8), (32, 8), (37, 16), (100, 64), (64, 1)])
def test_chunked_matches_sequential_fwd_bwd(dtype, tol, L, chunk):
    t = {k: v.requires_grad_() for k, v in ssd_inputs(L=L, dtype=dtype, seed=L).items()}
    g_y = torch.randn(t["x"].shape, dtype=dtype)
    g_h = torch.randn(t["h0"].shape, dtype=dtype)
    out = {}
    for name, fn, kw in (("seq", ssd_sequential, {}), ("chunked", ssd_chunked, {"chunk_size": chunk})):
        y, h = call(fn, t, **kw)
        grads = torch.autograd.grad((y * g_y).sum() + (h * g_h).sum(), list(t.values()))
        out[name] = (y, h, *grads)
    for label, a, b in zip(["y", "h"] + [f"d{k}" for k in t], out["chunked"], out["seq"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, label=label: f"{label}: {m}")


def test_chunked_is_stable_for_long_strong_decay():
    """Large dt·A over a long chunk: every exp is of a non-positive number, nothing overflows."""
    t = ssd_inputs(L=256, dtype=torch.float32)
    t["dt"] = t["dt"] + 6
    y, h = call(ssd_chunked, t, chunk_size=64)
    y_s, h_s = call(ssd_sequential, t)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_s, rtol=1e-4, atol=1e-4)


def test_steps_equal_the_scan():
    t = ssd_inputs(L=13)
    y, h = call(ssd_sequential, t)
    state = t["h0"].clone()
    ys = [ssd_step_ref(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"], t["dt_bias"])
          for i in range(13)]
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, h, rtol=1e-12, atol=1e-12)


def test_dispatch_ref_runs_on_cpu_and_fast_refuses():
    t = ssd_inputs(L=20)
    y = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], impl="ref")
    torch.testing.assert_close(y, call(ssd_sequential, {**t, "h0": torch.zeros_like(t["h0"])})[0])
    with pytest.raises(RuntimeError, match="impl='fast' is unavailable"):
        ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], impl="fast")


def test_gated_rmsnorm_per_group():
    g = torch.Generator().manual_seed(0)
    y, z, w = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g), torch.randn(12, generator=g)
    out = rmsnorm_gated_ref(y, z, w, eps=1e-5, group_size=4)
    gated = y * z * torch.sigmoid(z)
    for k in range(3):
        part = gated[:, 4 * k:4 * k + 4]
        want = part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5) * w[4 * k:4 * k + 4]
        torch.testing.assert_close(out[:, 4 * k:4 * k + 4], want)


# ----------------------------------------------------------------------------- the mixer

def test_state_dict_has_mamba_ssm_names_and_shapes():
    """mamba_ssm.Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2) holds these; test_gpu_mamba2
    loads our state dict into it."""
    m = Mamba2(64, d_state=16, headdim=16, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    I, H, E = 128, 8, 128 + 2 * 2 * 16
    assert shapes == {"in_proj.weight": (2 * I + 2 * 2 * 16 + H, 64), "conv1d.weight": (E, 1, 4), "conv1d.bias": (E,),
                      "dt_bias": (H,), "A_log": (H,), "D": (H,), "norm.weight": (I,), "out_proj.weight": (64, I)}
    assert 1e-3 <= F.softplus(m.dt_bias).min() and F.softplus(m.dt_bias).max() <= 0.1 + 1e-6
    assert (-torch.exp(m.A_log) <= -1).all() and (-torch.exp(m.A_log) >= -16).all()


def test_bad_head_split_is_refused():
    with pytest.raises(ValueError, match="heads"):
        Mamba2(64, headdim=48)
    with pytest.raises(ValueError, match="Mamba-2"):
        ModelConfig(name="x", mixer="mamba2", ffn="none", n_layer=2, d_model=64, headdim=48)


def test_decode_steps_equal_forward():
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, headdim=8, ngroups=2).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        y_full, _ = m(x)
        y_pre, _, state = m(x[:, :4], return_state=True)
        torch.testing.assert_close(y_pre, y_full[:, :4])
        for i in range(4, 11):
            y_i, state = m.step(x[:, i], state)
            torch.testing.assert_close(y_i, y_full[:, i], rtol=1e-10, atol=1e-10)


def test_padding_cannot_reach_other_positions():
    """valid_BL=False positions are zeroed before the mixer: what they hold changes no output at a valid
    position, and a left-padded sequence ends as the unpadded one given a zero state."""
    torch.manual_seed(0)
    m = Mamba2(32, d_state=8, headdim=8).double()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[:, :3] = False
    noise = x.clone()
    noise[:, :3] = torch.randn(1, 3, 32, dtype=torch.float64) * 100
    with torch.no_grad():
        y1, _ = m(x, valid)
        y2, _ = m(noise, valid)
        torch.testing.assert_close(y1[:, 3:], y2[:, 3:])


def test_variants_match_mamba_1_in_size_and_train_on_cpu():
    for a, b in (("Mamba2_25M", "Mamba_25M"), ("MoE-Mamba2_25M", "MoE-Mamba_25M-e32")):
        pa, pb = describe(get(a))["active_params"], describe(get(b))["active_params"]
        assert abs(pa / pb - 1) < 0.03, (a, pa, b, pb)
    cfg = get("MoE-Mamba2_25M@tiny")
    assert cfg.mixer == "mamba2" and cfg.d_inner // cfg.headdim == 8 and "headdim" in cfg.to_dict()
    assert "headdim" not in get("Mamba_25M").to_dict()        # Mamba-1 rows and hashes unchanged
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 1000, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
