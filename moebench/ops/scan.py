"""Selective scan of Mamba-1 (Gu & Dao 2023, alg. 2): mamba_ssm's CUDA kernels, or plain torch.

    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·u_t·B_t        y_t = C_t·h_t + D·u_t        y_t *= silu(z_t)

Shape suffixes: B batch, D channels (d_inner), L sequence, N state size (d_state).
Note the scan's `B_BNL` (input matrix) is not the batch size `B` of the suffixes.

Three implementations with identical math:
  selective_scan_ref      sequential loop over L: the spec, slow on purpose
  selective_scan_chunked  two-level chunked scan in plain torch: the CPU path ("ref")
  selective_scan_fn       mamba_ssm's fused CUDA kernel ("fast")
"""
from __future__ import annotations

import types
from typing import Literal

import torch
import torch.nn.functional as F

Impl = Literal["fast", "ref"]

# mamba_ssm 2.3.2 raises at import when its extension or CUDA is missing, and not always an
# ImportError (triton, a bad .so, a driver mismatch), so any exception means "no kernels".
kernels = types.SimpleNamespace(selective_scan_fn=None, mamba_inner_fn=None, selective_state_update=None,
                                causal_conv1d_fn=None, causal_conv1d_update=None)
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    kernels = types.SimpleNamespace(selective_scan_fn=selective_scan_fn, mamba_inner_fn=mamba_inner_fn,
                                    selective_state_update=selective_state_update,
                                    causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update)
    KERNEL_IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 (see above)
    KERNEL_IMPORT_ERROR = f"{type(e).__name__}: {e}"
HAS_MAMBA_KERNELS: bool = KERNEL_IMPORT_ERROR is None


def use_kernels(impl: Impl, x: torch.Tensor, import_error: str | None = KERNEL_IMPORT_ERROR) -> bool:
    """Whether a call with a resolved impl ('fast' or 'ref', moebench/impl.py) takes the kernels; a
    'fast' call with a tensor off CUDA, or kernels that failed to import (import_error: these ops',
    by default mamba-ssm's and causal-conv1d's), gets a clear error instead of a kernel's."""
    if impl == "ref":
        return False
    if impl != "fast":
        raise ValueError(f"impl must be 'fast' or 'ref' (resolved by moebench.impl), got {impl!r}")
    if import_error is not None or x.device.type != "cuda":
        why = import_error if import_error is not None else f"tensor on {x.device}, the kernels need CUDA"
        raise RuntimeError(f"impl='fast' is unavailable ({why}); use impl='ref'")
    return True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation for fp32/bf16/fp16 inputs; fp64 stays fp64 so tests can compare tightly
    return torch.promote_types(dtype, torch.float32)


def _discretize(u_BDL, delta_BDL, A_DN, B_BNL, delta_bias_D, delta_softplus, dtype):
    """log-decay a = Δ·A (<= 0 for A < 0) and input b = Δ·u·B, both (B, D, L, N)."""
    delta_BDL = delta_BDL.to(dtype)
    if delta_bias_D is not None:
        delta_BDL = delta_BDL + delta_bias_D.to(dtype)[:, None]
    if delta_softplus:
        delta_BDL = F.softplus(delta_BDL)  # threshold 20, as the kernel's log1p(exp(x)) for x <= 20
    a_BDLN = delta_BDL[..., None] * A_DN.to(dtype)[:, None, :]
    b_BDLN = (delta_BDL * u_BDL.to(dtype))[..., None] * B_BNL.to(dtype).transpose(1, 2)[:, None]
    return a_BDLN, b_BDLN


def _finish(y_BDL, u_BDL, D_D, z_BDL, dtype):
    if D_D is not None:
        y_BDL = y_BDL + D_D.to(dtype)[:, None] * u_BDL.to(dtype)
    if z_BDL is not None:
        y_BDL = y_BDL * F.silu(z_BDL.to(dtype))
    return y_BDL.to(u_BDL.dtype)


def selective_scan_ref(u_BDL, delta_BDL, A_DN, B_BNL, C_BNL, D_D=None, z_BDL=None, delta_bias_D=None,
                       delta_softplus=True, return_last_state=False):
    """The spec: a loop over L with fp32 accumulation (fp64 for fp64 inputs).

    Same semantics as mamba_ssm's selective_scan_ref for real A and input-dependent B, C:
    returns y in u's dtype, and with return_last_state also h_L (B, D, N) in the compute dtype.
    """
    dtype = _compute_dtype(u_BDL.dtype)
    with torch.autocast(u_BDL.device.type, enabled=False):  # keep the contraction over N in fp32
        a_BDLN, b_BDLN = _discretize(u_BDL, delta_BDL, A_DN, B_BNL, delta_bias_D, delta_softplus, dtype)
        decay_BDLN = torch.exp(a_BDLN)
        C_BNL = C_BNL.to(dtype)
        h_BDN = u_BDL.new_zeros(u_BDL.shape[0], A_DN.shape[0], A_DN.shape[1], dtype=dtype)
        ys = []
        for t in range(u_BDL.shape[2]):
            h_BDN = decay_BDLN[:, :, t] * h_BDN + b_BDLN[:, :, t]
            ys.append(torch.einsum("bdn,bn->bd", h_BDN, C_BNL[:, :, t]))
        y_BDL = _finish(torch.stack(ys, dim=2), u_BDL, D_D, z_BDL, dtype)
    return (y_BDL, h_BDN) if return_last_state else y_BDL


def _linear_scan(a_BDLN: torch.Tensor, b_BDLN: torch.Tensor, chunk: int) -> torch.Tensor:
    """h_t = exp(a_t) h_{t-1} + b_t along L from h_{-1} = 0, without autograd.

    Two levels, O(chunk + L/chunk) torch ops and O(BDLN) work: (1) the recurrence within every
    chunk at once, each chunk started from zero; (2) the state entering chunk c is carried in,
    decayed by exp(cumsum of a within the chunk). Only exp of a <= 0 (or of sums of them) occurs,
    so nothing overflows however large Δ gets.
    """
    Bsz, D, L, N = a_BDLN.shape
    n_chunk = -(-L // chunk)
    pad = n_chunk * chunk - L
    if pad:  # a = 0, b = 0 at the end: the state passes through unchanged
        a_BDLN = F.pad(a_BDLN, (0, 0, 0, pad))
        b_BDLN = F.pad(b_BDLN, (0, 0, 0, pad))
    a_BDCTN = a_BDLN.reshape(Bsz, D, n_chunk, chunk, N)
    b_BDCTN = b_BDLN.reshape(Bsz, D, n_chunk, chunk, N)
    decay_BDCTN = a_BDCTN.exp()
    h_BDCTN = torch.empty_like(b_BDCTN)
    h_BDCTN[:, :, :, 0] = b_BDCTN[:, :, :, 0]
    for t in range(1, chunk):
        torch.addcmul(b_BDCTN[:, :, :, t], decay_BDCTN[:, :, :, t], h_BDCTN[:, :, :, t - 1],
                      out=h_BDCTN[:, :, :, t])
    if n_chunk > 1:
        carry_BDCTN = a_BDCTN.cumsum(3).exp()  # decay from the chunk's start to t, in (0, 1]
        for c in range(1, n_chunk):
            h_BDCTN[:, :, c].addcmul_(carry_BDCTN[:, :, c], h_BDCTN[:, :, c - 1, -1:])
    return h_BDCTN.view(Bsz, D, n_chunk * chunk, N)[:, :, :L]


class _LinearScan(torch.autograd.Function):
    """Autograd through the chunked loops would record O(chunk + L/chunk) small ops and keep a
    copy per op; the gradient of a linear recurrence is the same recurrence run backwards."""

    @staticmethod
    def forward(ctx, a_BDLN, b_BDLN, chunk):
        h_BDLN = _linear_scan(a_BDLN, b_BDLN, chunk)
        ctx.save_for_backward(a_BDLN, h_BDLN)
        ctx.chunk = chunk
        return h_BDLN

    @staticmethod
    def backward(ctx, dh_BDLN):
        a_BDLN, h_BDLN = ctx.saved_tensors
        # g_t = dh_t + exp(a_{t+1}) g_{t+1}: a forward scan over the reversed sequence
        a_next_BDLN = F.pad(a_BDLN.flip(2)[:, :, :-1], (0, 0, 1, 0))
        g_BDLN = _linear_scan(a_next_BDLN, dh_BDLN.flip(2), ctx.chunk).flip(2)
        da_BDLN = None
        if ctx.needs_input_grad[0]:  # d h_t / d a_t = exp(a_t) h_{t-1}
            da_BDLN = g_BDLN * a_BDLN.exp() * F.pad(h_BDLN[:, :, :-1], (0, 0, 1, 0))
        return da_BDLN, g_BDLN, None


def selective_scan_chunked(u_BDL, delta_BDL, A_DN, B_BNL, C_BNL, D_D=None, z_BDL=None, delta_bias_D=None,
                           delta_softplus=True, return_last_state=False, chunk=32):
    """selective_scan_ref computed in chunks of `chunk` steps: same results to rounding, and
    6x to 30x faster on CPU for forward+backward (more for larger B·D·L). chunk=32 was the
    fastest of 16/32/64/128 on 2 CPU cores."""
    dtype = _compute_dtype(u_BDL.dtype)
    with torch.autocast(u_BDL.device.type, enabled=False):
        a_BDLN, b_BDLN = _discretize(u_BDL, delta_BDL, A_DN, B_BNL, delta_bias_D, delta_softplus, dtype)
        h_BDLN = _LinearScan.apply(a_BDLN, b_BDLN, chunk)
        y_BDL = torch.einsum("bdln,bnl->bdl", h_BDLN, C_BNL.to(dtype))
        y_BDL = _finish(y_BDL, u_BDL, D_D, z_BDL, dtype)
    return (y_BDL, h_BDLN[:, :, -1]) if return_last_state else y_BDL


def selective_scan(u_BDL, delta_BDL, A_DN, B_BNL, C_BNL, D_D=None, z_BDL=None, delta_bias_D=None,
                   delta_softplus=True, return_last_state=False, impl: Impl = "ref"):
    """'fast': mamba_ssm's selective_scan_fn (CUDA); 'ref': selective_scan_chunked (any device)."""
    if use_kernels(impl, u_BDL):
        return kernels.selective_scan_fn(u_BDL, delta_BDL, A_DN, B_BNL, C_BNL, D=D_D, z=z_BDL,
                                         delta_bias=delta_bias_D, delta_softplus=delta_softplus,
                                         return_last_state=return_last_state)
    return selective_scan_chunked(u_BDL, delta_BDL, A_DN, B_BNL, C_BNL, D_D, z_BDL, delta_bias_D,
                                  delta_softplus, return_last_state)


def selective_state_update_ref(ssm_state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D=None, z_BD=None,
                               dt_bias_D=None, dt_softplus=True):
    """One decode step of the recurrence: updates ssm_state_BDN in place and returns y_BD.

    Like the triton kernel, computes in fp32 and reads y from the fp32 state before it is stored
    in the state's dtype.
    """
    dtype = _compute_dtype(x_BD.dtype)
    with torch.autocast(x_BD.device.type, enabled=False):
        dt_BD = dt_BD.to(dtype)
        if dt_bias_D is not None:
            dt_BD = dt_BD + dt_bias_D.to(dtype)
        if dt_softplus:
            dt_BD = F.softplus(dt_BD)
        x_f_BD = x_BD.to(dtype)
        decay_BDN = torch.exp(dt_BD[..., None] * A_DN.to(dtype))
        h_BDN = decay_BDN * ssm_state_BDN.to(dtype) + (dt_BD * x_f_BD)[..., None] * B_BN.to(dtype)[:, None, :]
        ssm_state_BDN.copy_(h_BDN)
        y_BD = torch.einsum("bdn,bn->bd", h_BDN, C_BN.to(dtype))
        if D_D is not None:
            y_BD = y_BD + D_D.to(dtype) * x_f_BD
        if z_BD is not None:
            y_BD = y_BD * F.silu(z_BD.to(dtype))
    return y_BD.to(x_BD.dtype)


def selective_state_update(ssm_state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D=None, z_BD=None,
                           dt_bias_D=None, dt_softplus=True, impl: Impl = "ref"):
    """'fast': mamba_ssm's triton selective_state_update; 'ref': selective_state_update_ref."""
    if use_kernels(impl, x_BD):
        return kernels.selective_state_update(ssm_state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z=z_BD,
                                              dt_bias=dt_bias_D, dt_softplus=dt_softplus)
    return selective_state_update_ref(ssm_state_BDN, x_BD, dt_BD, A_DN, B_BN, C_BN, D_D, z_BD,
                                      dt_bias_D, dt_softplus)
