"""Mamba-2's state-space dual layer (Dao & Gu 2024): mamba-ssm's Triton kernels, or plain torch.

Per head h (scalar decay A_h < 0, head dim P, state size N; heads share B and C within a group):

    dt_t = softplus(dt_t + dt_bias)    h_t = exp(dt_t·A) h_{t-1} + dt_t · x_t ⊗ B_t    y_t = h_t C_t + D·x_t

Shape suffixes: B batch, L sequence, H heads, P head dim, G groups, N state size, C chunks, Q chunk
length. The scan's input matrix is `B_BLGN` (not the batch size B of the suffixes).

Three implementations with identical math:
  ssd_sequential   a loop over L: the spec, slow on purpose
  ssd_chunked      the chunked dual form in plain torch (quadratic inside a chunk, recurrent across
                   chunks): the CPU path ("ref")
  mamba_chunk_scan_combined   mamba-ssm's Triton kernels ("fast")
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from moebench.ops.scan import Impl, _compute_dtype, use_kernels

# mamba-ssm's Triton modules can fail at import for reasons other than ImportError (see ops/scan.py)
ssd_kernels = types.SimpleNamespace(chunk_scan=None, state_update=None, rmsnorm=None)
try:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    ssd_kernels = types.SimpleNamespace(chunk_scan=mamba_chunk_scan_combined, state_update=selective_state_update,
                                        rmsnorm=rmsnorm_fn)
    SSD_IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    SSD_IMPORT_ERROR = f"{type(e).__name__}: {e}"
HAS_SSD_KERNELS: bool = SSD_IMPORT_ERROR is None


def _dt(dt, dt_bias_H, dt_softplus, dtype):
    dt = dt.to(dtype)
    if dt_bias_H is not None:
        dt = dt + dt_bias_H.to(dtype)
    return F.softplus(dt) if dt_softplus else dt


def _heads(M_BLGN: torch.Tensor, H: int) -> torch.Tensor:
    """A group's B or C for each of its heads: (..., G, N) -> (..., H, N)."""
    G = M_BLGN.shape[-2]
    return M_BLGN.repeat_interleave(H // G, dim=-2) if G != H else M_BLGN


def ssd_sequential(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H=None, dt_bias_H=None, dt_softplus=True,
                   initial_state_BHPN=None, return_final_state=False):
    """The spec: one step per position, fp32 accumulation (fp64 for fp64 inputs)."""
    dtype = _compute_dtype(x_BLHP.dtype)
    Bsz, L, H, P = x_BLHP.shape
    dt_BLH = _dt(dt_BLH, dt_bias_H, dt_softplus, dtype)
    x, A = x_BLHP.to(dtype), A_H.to(dtype)
    B_BLHN, C_BLHN = _heads(B_BLGN.to(dtype), H), _heads(C_BLGN.to(dtype), H)
    h_BHPN = (x.new_zeros(Bsz, H, P, B_BLGN.shape[-1]) if initial_state_BHPN is None
              else initial_state_BHPN.to(dtype))
    ys = []
    for t in range(L):
        decay_BH = torch.exp(dt_BLH[:, t] * A)
        h_BHPN = (h_BHPN * decay_BH[..., None, None]
                  + (dt_BLH[:, t, :, None] * x[:, t])[..., None] * B_BLHN[:, t, :, None, :])
        ys.append((h_BHPN * C_BLHN[:, t, :, None, :]).sum(-1))
    y_BLHP = torch.stack(ys, dim=1)
    if D_H is not None:
        y_BLHP = y_BLHP + D_H.to(dtype)[:, None] * x
    y_BLHP = y_BLHP.to(x_BLHP.dtype)
    return (y_BLHP, h_BHPN) if return_final_state else y_BLHP


def ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H=None, dt_bias_H=None, dt_softplus=True,
                initial_state_BHPN=None, return_final_state=False, chunk_size: int = 64):
    """The chunked dual form, same result as ssd_sequential. Inside a chunk the output is a masked
    attention-like product, y_i = sum_{j<=i} (C_i·B_j) exp(cum_i - cum_j) dt_j x_j, with cum the
    running sum of dt·A (<= 0, so every exp is a decay); each chunk's final state is carried to the
    next by a loop over the L/Q chunks. Padding to a whole chunk uses dt = 0: no decay, no input."""
    with torch.autocast(x_BLHP.device.type, enabled=False):   # the reference keeps fp32 in its matmuls
        return _ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, dt_softplus, initial_state_BHPN,
                            return_final_state, chunk_size)


def _ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, dt_softplus, initial_state_BHPN,
                 return_final_state, chunk_size):
    dtype = _compute_dtype(x_BLHP.dtype)
    Bsz, L, H, P = x_BLHP.shape
    N = B_BLGN.shape[-1]
    Q = min(chunk_size, L)
    pad = (-L) % Q
    dt_BLH = _dt(dt_BLH, dt_bias_H, dt_softplus, dtype)
    x, A = x_BLHP.to(dtype), A_H.to(dtype)
    B_BLHN, C_BLHN = _heads(B_BLGN.to(dtype), H), _heads(C_BLGN.to(dtype), H)
    if pad:
        x, dt_BLH = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt_BLH, (0, 0, 0, pad))
        B_BLHN, C_BLHN = F.pad(B_BLHN, (0, 0, 0, 0, 0, pad)), F.pad(C_BLHN, (0, 0, 0, 0, 0, pad))
    nC = x.shape[1] // Q
    xdt_BCQHP = (x * dt_BLH[..., None]).view(Bsz, nC, Q, H, P)
    B_BCQHN, C_BCQHN = B_BLHN.view(Bsz, nC, Q, H, N), C_BLHN.view(Bsz, nC, Q, H, N)
    cum_BHCQ = (dt_BLH * A).view(Bsz, nC, Q, H).permute(0, 3, 1, 2).cumsum(-1)

    # inside each chunk: decay from j to i for i >= j, zero above the diagonal
    causal_QQ = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    seg_BHCQQ = (cum_BHCQ[..., :, None] - cum_BHCQ[..., None, :]).masked_fill(~causal_QQ, float("-inf"))
    scores_BCHQQ = torch.einsum("bcihn,bcjhn->bchij", C_BCQHN, B_BCQHN) * seg_BHCQQ.exp().transpose(1, 2)
    y_BCQHP = torch.einsum("bchij,bcjhp->bcihp", scores_BCHQQ, xdt_BCQHP)

    # each chunk's contribution to the state at its end, then the states entering each chunk
    to_end_BHCQ = torch.exp(cum_BHCQ[..., -1:] - cum_BHCQ)
    chunk_BCHPN = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", B_BCQHN, to_end_BHCQ, xdt_BCQHP)
    chunk_decay_BHC = torch.exp(cum_BHCQ[..., -1])
    h_BHPN = x.new_zeros(Bsz, H, P, N) if initial_state_BHPN is None else initial_state_BHPN.to(dtype)
    entering = []
    for c in range(nC):
        entering.append(h_BHPN)
        h_BHPN = h_BHPN * chunk_decay_BHC[:, :, c, None, None] + chunk_BCHPN[:, c]
    entering_BCHPN = torch.stack(entering, dim=1)
    y_BCQHP = y_BCQHP + torch.einsum("bcihn,bchpn,bhci->bcihp", C_BCQHN, entering_BCHPN, cum_BHCQ.exp())

    y_BLHP = y_BCQHP.reshape(Bsz, nC * Q, H, P)[:, :L]
    if D_H is not None:
        y_BLHP = y_BLHP + D_H.to(dtype)[:, None] * x[:, :L]
    y_BLHP = y_BLHP.to(x_BLHP.dtype)
    return (y_BLHP, h_BHPN) if return_final_state else y_BLHP


def ssd(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H=None, dt_bias_H=None, dt_softplus=True,
        return_final_state=False, chunk_size: int = 256, impl: Impl = "ref"):
    """'fast': mamba_ssm's mamba_chunk_scan_combined (CUDA, Triton); 'ref': ssd_chunked (its chunk
    length capped at 64: the quadratic part's memory grows with it, the result does not change)."""
    if use_kernels(impl, x_BLHP, SSD_IMPORT_ERROR):
        out = ssd_kernels.chunk_scan(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, chunk_size, D=D_H, dt_bias=dt_bias_H,
                                     dt_softplus=dt_softplus, return_final_states=return_final_state)
        return out
    return ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, dt_bias_H, dt_softplus,
                       return_final_state=return_final_state, chunk_size=min(chunk_size, 64))


def ssd_step_ref(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H=None, dt_bias_H=None, dt_softplus=True):
    """One decode step: updates state_BHPN in place and returns y_BHP."""
    dtype = torch.promote_types(state_BHPN.dtype, torch.float32)
    H = x_BHP.shape[1]
    dt_BH = _dt(dt_BH, dt_bias_H, dt_softplus, dtype)
    x = x_BHP.to(dtype)
    B_BHN, C_BHN = _heads(B_BGN.to(dtype), H), _heads(C_BGN.to(dtype), H)
    h_BHPN = (state_BHPN.to(dtype) * torch.exp(dt_BH * A_H.to(dtype))[..., None, None]
              + (dt_BH[..., None] * x)[..., None] * B_BHN[:, :, None, :])
    state_BHPN.copy_(h_BHPN)
    y_BHP = (h_BHPN * C_BHN[:, :, None, :]).sum(-1)
    if D_H is not None:
        y_BHP = y_BHP + D_H.to(dtype)[:, None] * x
    return y_BHP.to(x_BHP.dtype)


def ssd_step(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H=None, dt_bias_H=None, dt_softplus=True,
             impl: Impl = "ref"):
    """'fast': mamba_ssm's selective_state_update with the head dimension tied (as Mamba2.step)."""
    if use_kernels(impl, x_BHP, SSD_IMPORT_ERROR):
        P, N = x_BHP.shape[-1], state_BHPN.shape[-1]
        H = x_BHP.shape[1]
        A_HPN = A_H.float()[:, None, None].expand(H, P, N)
        dt_BHP = dt_BH[..., None].expand(*dt_BH.shape, P)
        return ssd_kernels.state_update(
            state_BHPN, x_BHP, dt_BHP, A_HPN, B_BGN, C_BGN,
            D=D_H[:, None].expand(H, P) if D_H is not None else None,
            dt_bias=dt_bias_H[:, None].expand(H, P) if dt_bias_H is not None else None, dt_softplus=dt_softplus)
    return ssd_step_ref(state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H, dt_bias_H, dt_softplus)


def rmsnorm_gated_ref(y_TI, z_TI, weight_I, eps: float = 1e-5, group_size: int | None = None):
    """Mamba-2's output norm (mamba_ssm RMSNormGated, norm_before_gate=False): the gate first,
    y·silu(z), then an RMS norm over each group of `group_size` channels, times the weight."""
    dtype = _compute_dtype(y_TI.dtype)
    y = y_TI.to(dtype) * F.silu(z_TI.to(dtype))
    I = y.shape[-1]
    g = group_size or I
    y_g = y.view(*y.shape[:-1], I // g, g)
    y = (y_g * torch.rsqrt(y_g.pow(2).mean(-1, keepdim=True) + eps)).view_as(y) * weight_I.to(dtype)
    return y.to(y_TI.dtype)


def rmsnorm_gated(y_TI, z_TI, weight_I, eps: float = 1e-5, group_size: int | None = None, impl: Impl = "ref"):
    """'fast': mamba_ssm's Triton rmsnorm_fn; 'ref': rmsnorm_gated_ref."""
    if use_kernels(impl, y_TI, SSD_IMPORT_ERROR):
        return ssd_kernels.rmsnorm(y_TI, weight_I, None, z=z_TI, eps=eps, group_size=group_size,
                                   norm_before_gate=False)
    return rmsnorm_gated_ref(y_TI, z_TI, weight_I, eps, group_size)
