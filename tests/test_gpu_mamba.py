"""GPU tests: the mamba_ssm / causal-conv1d kernels against the plain-torch reference, on fresh
random inputs with the same parameters. Errors are relative, ‖a−b‖/‖b‖, and are printed:

    pytest -m gpu tests/test_gpu_mamba.py -s
"""
import pytest
import torch

from moebench.models.mamba import Mamba
from moebench.ops import scan as scan_ops
from moebench.ops.conv import causal_conv1d, causal_conv1d_update
from moebench.impl import resolve_mixer
from moebench.ops.scan import HAS_MAMBA_KERNELS, KERNEL_IMPORT_ERROR, selective_scan, selective_state_update

from conftest import check, rel

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if not HAS_MAMBA_KERNELS:
    pytest.skip(f"mamba_ssm/causal-conv1d kernels unavailable: {KERNEL_IMPORT_ERROR}", allow_module_level=True)

CUDA = torch.device("cuda")
TOL = {"fp32": 1e-4, "bf16": 1e-2}


def test_resolve_impl_on_cuda():
    assert resolve_mixer("auto", CUDA) == "fast" and resolve_mixer("fast", "cuda") == "fast"
    assert Mamba(64, device=CUDA).impl == "fast"
    with torch.device("cuda"):  # how lm.build_model constructs: device from the context
        assert Mamba(64).impl == "fast"


# ----------------------------------------------------------------------------- ops


def _scan_inputs(Bsz, D, N, L, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=CUDA, generator=g)  # noqa: E731
    return dict(u=r(Bsz, D, L), delta=r(Bsz, D, L) * 0.5 - 1, A=-torch.exp(r(D, N) * 0.5 + 0.5),
                B=r(Bsz, N, L), C=r(Bsz, N, L), D=r(D), z=r(Bsz, D, L), delta_bias=r(D) * 0.3)


@pytest.mark.parametrize("L", [1, 64, 257, 2048])
def test_selective_scan_kernel_vs_ref(L):
    t = {k: v.requires_grad_() for k, v in _scan_inputs(2, 96, 16, L, seed=L).items()}
    g_out = torch.randn(2, 96, L, device=CUDA)
    res = {}
    for impl in ("fast", "ref"):
        y, last = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                 delta_softplus=True, return_last_state=True, impl=impl)
        grads = torch.autograd.grad((y * g_out).sum(), list(t.values()))  # the kernel has no d(last state)
        res[impl] = (y, last, grads)
    errors = {"y": rel(res["fast"][0], res["ref"][0]), "last_state": rel(res["fast"][1], res["ref"][1])}
    errors |= {f"d{k}": rel(a, b) for k, a, b in zip(t, res["fast"][2], res["ref"][2])}
    check(f"selective_scan fp32 L={L}", errors, TOL["fp32"])


def test_causal_conv1d_kernel_vs_ref():
    x = torch.randn(2, 96, 300, device=CUDA, requires_grad=True)
    w = torch.randn(96, 4, device=CUDA, requires_grad=True)
    b = torch.randn(96, device=CUDA, requires_grad=True)
    g_out = torch.randn(2, 96, 300, device=CUDA)
    res = {}
    for impl in ("fast", "ref"):
        y = causal_conv1d(x, w, b, "silu", impl=impl)
        res[impl] = (y, *torch.autograd.grad((y * g_out).sum(), (x, w, b)))
    check("causal_conv1d fp32", {k: rel(a, b_) for k, a, b_ in zip(("y", "dx", "dw", "db"), res["fast"], res["ref"])},
          TOL["fp32"])


def test_step_kernels_vs_ref():
    t = _scan_inputs(3, 192, 16, 1, seed=1)
    x, dt, z, B, C = (t[k][..., 0] for k in ("u", "delta", "z", "B", "C"))
    state0 = torch.randn(3, 192, 16, device=CUDA)
    states, ys = {}, {}
    for impl in ("fast", "ref"):
        states[impl] = state0.clone()
        ys[impl] = selective_state_update(states[impl], x, dt, t["A"], B, C, t["D"], z, t["delta_bias"],
                                          dt_softplus=True, impl=impl)
    w, bias = torch.randn(192, 4, device=CUDA), torch.randn(192, device=CUDA)
    conv0 = torch.randn(3, 192, 4, device=CUDA)
    convs, conv_ys = {}, {}
    for impl in ("fast", "ref"):
        convs[impl] = conv0.clone()
        conv_ys[impl] = causal_conv1d_update(x, convs[impl], w, bias, "silu", impl=impl)
    check("step kernels fp32", {"ssm y": rel(ys["fast"], ys["ref"]), "ssm state": rel(states["fast"], states["ref"]),
                                "conv y": rel(conv_ys["fast"], conv_ys["ref"]),
                                "conv state": rel(convs["fast"], convs["ref"])}, TOL["fp32"])


# ----------------------------------------------------------------------------- module


def _run(m: Mamba, x, g_out, impl, path, autocast):
    """Output, input gradient and parameter gradients of one pass with the given impl."""
    m.impl = impl
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        if path == "fused":
            y, _ = m(x)
            state = ()
        else:  # return_state takes the unfused kernels: causal_conv1d_fn + selective_scan_fn
            y, _, state = m(x, return_state=True)
    (y.float() * g_out).sum().backward()
    grads = {f"d{n}": p.grad.detach().clone() for n, p in m.named_parameters()}
    return {"y": y.detach(), "dx": x.grad.detach(), **grads, **{f"state{i}": s for i, s in enumerate(state)}}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("d_model,expand,L", [(96, 2.0, 257), (128, 4 / 3, 512)])  # d_inner 192 and 171
def test_module_fast_vs_ref(d_model, expand, L, path, dtype, monkeypatch):
    torch.manual_seed(0)
    m = Mamba(d_model, expand=expand, impl="fast", device=CUDA)
    calls = []
    inner_fn = scan_ops.kernels.mamba_inner_fn
    monkeypatch.setattr(scan_ops.kernels, "mamba_inner_fn", lambda *a, **k: calls.append(1) or inner_fn(*a, **k))
    x, g_out = torch.randn(2, L, d_model, device=CUDA), torch.randn(2, L, d_model, device=CUDA)
    fast = _run(m, x, g_out, "fast", path, dtype == "bf16")
    assert len(calls) == (1 if path == "fused" else 0)
    ref = _run(m, x, g_out, "ref", path, dtype == "bf16")
    check(f"Mamba {path} {dtype} d_model={d_model} d_inner={m.d_inner} L={L}",
          {k: rel(fast[k], ref[k]) for k in ref}, TOL[dtype])


def test_inner_moe_fast_vs_ref():
    torch.manual_seed(0)
    # only the input-side MoEs: their routers see the same input on both paths, so no routing flips
    kw = dict(n_expert=4, d_hidden=64, top_k=1, capacity_factor=2.0, aux_loss_coef=0.01, activation="relu",
              impl="auto")
    m = Mamba(96, impl="fast", inner_places=("conv", "gate"), inner_moe_kwargs=kw, device=CUDA)
    x, g_out = torch.randn(2, 200, 96, device=CUDA), torch.randn(2, 200, 96, device=CUDA)
    fast, ref = _run(m, x, g_out, "fast", "fused", False), _run(m, x, g_out, "ref", "fused", False)
    check("Mamba inner MoE conv+gate fp32", {k: rel(fast[k], ref[k]) for k in ref}, TOL["fp32"])


def test_state_dict_round_trip_with_mamba_ssm():
    from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM
    torch.manual_seed(0)
    ours = Mamba(96, impl="fast", device=CUDA)
    theirs = MambaSSM(d_model=96, d_state=16, d_conv=4, expand=2, device=CUDA)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 300, 96, device=CUDA)
    with torch.no_grad():
        y_theirs = theirs(x)
        errors = {"ours fast vs mamba_ssm": rel(ours(x)[0], y_theirs)}
        ours.impl = "ref"
        errors["ours ref vs mamba_ssm"] = rel(ours(x)[0], y_theirs)
        other = Mamba(96, impl="fast", device=CUDA)
        other.load_state_dict(theirs.state_dict())
        errors["mamba_ssm weights in ours"] = rel(other(x)[0], y_theirs)
    check("state dict round trip fp32", errors, TOL["fp32"])


def test_init_draws_match_mamba_ssm():
    """Same seed, same modules created in the same order: the same initial weights."""
    from mamba_ssm.modules.mamba_simple import Mamba as MambaSSM
    torch.manual_seed(123)
    ours = Mamba(96, device=CUDA)
    torch.manual_seed(123)
    theirs = MambaSSM(d_model=96, device=CUDA)
    sd_theirs = theirs.state_dict()
    differ = [k for k, v in ours.state_dict().items() if not torch.equal(v, sd_theirs[k])]
    print(f"\n[init] parameters differing from mamba_ssm.Mamba with the same seed: {differ or 'none'}")
    assert not differ


def test_decode_fast_matches_forward_and_ref():
    torch.manual_seed(0)
    m = Mamba(96, impl="fast", device=CUDA).eval()
    x = torch.randn(2, 40, 96, device=CUDA)
    errors = {}
    with torch.no_grad():
        y_full, _ = m(x)
        for impl in ("fast", "ref"):
            m.impl = impl
            state = m.allocate_state(2)
            y_steps = torch.stack([m.step(x[:, t], state)[0] for t in range(40)], 1)
            errors[f"{impl} steps vs fast forward"] = rel(y_steps, y_full)
            y_pre, _, state = m(x[:, :17], return_state=True)
            y_rest = torch.stack([m.step(x[:, t], state)[0] for t in range(17, 40)], 1)
            errors[f"{impl} prefill 17 + steps vs fast forward"] = rel(torch.cat([y_pre, y_rest], 1), y_full)
    check("decode fp32", errors, TOL["fp32"])
