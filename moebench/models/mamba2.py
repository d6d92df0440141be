"""Mamba-2 mixer (Dao & Gu 2024) with the parameter names and layout of mamba_ssm.Mamba2, so that a
state dict loads into either: multi-head SSD with a scalar decay per head, B and C shared by the
heads of a group, one conv over x, B and C, and a gated RMSNorm before out_proj.

Shape suffixes: B batch, L sequence, D d_model, I d_inner, H heads, P head dim, G groups, N d_state,
E the conv's channels (I + 2GN), W d_conv, T tokens (B*L).

    x ─in_proj─┬─ z ──────────────────────────────────────────────────────────┐
               ├─ (x, B, C) ─conv1d─silu─ (x, B, C) ─ SSD(dt, A, D) ─ y ─ norm(y·silu(z)) ─out_proj─ out
               └─ dt (one per head) ───────────────┘
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moebench.config import ModelConfig
from moebench.impl import Impl, resolve
from moebench.ops.conv import causal_conv1d, causal_conv1d_update
from moebench.ops.ssd import rmsnorm_gated, ssd, ssd_step

# mamba_ssm.Mamba2's defaults: dt log-uniform in [DT_MIN, DT_MAX] at init, A = -U(1, 16)
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT_RANGE = (1.0, 16.0)
NORM_EPS = 1e-5


class GatedRMSNorm(nn.Module):
    """Holds the weight of mamba_ssm's RMSNormGated (state dict key `norm.weight`)."""

    def __init__(self, d: int, group_size: int, eps: float = NORM_EPS, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, impl: str = "ref") -> torch.Tensor:
        return rmsnorm_gated(y, z, self.weight, self.eps, self.group_size, impl=impl)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: float = 2.0, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, impl: str = "ref", device=None, dtype=None):
        """impl is 'fast' (mamba-ssm's Triton SSD kernels, causal-conv1d) or 'ref' (plain torch),
        resolved by moebench/impl.py."""
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = round(expand * d_model)
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise ValueError(f"d_inner {d_inner} must split into heads of {headdim}, and the heads into {ngroups} groups")
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.nheads = nheads = d_inner // headdim
        self.impl = impl
        self.decode_kernels = False          # Block.step's fused decode sublayers are Mamba-1's
        conv_dim = d_inner + 2 * ngroups * d_state
        # order of in_proj's outputs as mamba_ssm: z, x, B, C, dt
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=False, **factory)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=True, **factory)
        # softplus(dt_bias) log-uniform in [DT_MIN, DT_MAX] (inverse softplus: dt + log(1 - exp(-dt)))
        dt = torch.exp(torch.rand(nheads, device=device) * (math.log(DT_MAX) - math.log(DT_MIN))
                       + math.log(DT_MIN)).clamp(min=DT_INIT_FLOOR)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.dt_bias._no_reinit = True
        # A_log and D stay fp32 whatever `dtype` is, as in mamba_ssm
        A_H = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(*A_INIT_RANGE)
        self.A_log = nn.Parameter(torch.log(A_H))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(nheads, device=device))
        self.D._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    @classmethod
    def from_config(cls, cfg: ModelConfig, layer_idx: int, impl: Impl | str = "auto", device=None,
                    dtype=None) -> "Mamba2":
        impl = resolve(cfg, device, impl)
        return cls(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, headdim=cfg.headdim,
                   ngroups=cfg.ngroups, chunk_size=cfg.chunk_size, impl=impl.mixer, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, d_inner={self.d_inner}, nheads={self.nheads}, ngroups={self.ngroups}"

    def _split(self, zxbcdt: torch.Tensor):
        I, GN = self.d_inner, self.ngroups * self.d_state
        return torch.split(zxbcdt, [I, I + 2 * GN, self.nheads], dim=-1)

    def _heads(self, xBC: torch.Tensor):
        """(..., E) -> x (..., H, P), B and C (..., G, N)."""
        I, GN = self.d_inner, self.ngroups * self.d_state
        x, Bm, Cm = torch.split(xBC, [I, GN, GN], dim=-1)
        lead = xBC.shape[:-1]
        return (x.reshape(*lead, self.nheads, self.headdim), Bm.reshape(*lead, self.ngroups, self.d_state),
                Cm.reshape(*lead, self.ngroups, self.d_state))

    def forward(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None, return_state: bool = False):
        """(y_BLD, []) or, with return_state, (y_BLD, [], (conv_state (B, E, W), ssm_state (B, H, P, N))).
        valid_BL False marks padding: the mixer's input is zeroed there (as Mamba-1's)."""
        Bsz, L, _ = x_BLD.shape
        if valid_BL is not None:
            x_BLD = x_BLD.masked_fill(~valid_BL.to(torch.bool)[..., None], 0)
        z_BLI, xBC_BLE, dt_BLH = self._split(self.in_proj(x_BLD))
        xBC_BEL = xBC_BLE.transpose(1, 2)
        u_BLE = causal_conv1d(xBC_BEL.contiguous(), self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                              impl=self.impl).transpose(1, 2)
        x_BLHP, B_BLGN, C_BLGN = self._heads(u_BLE)
        A_H = -torch.exp(self.A_log.float())
        out = ssd(x_BLHP.contiguous(), dt_BLH.contiguous(), A_H, B_BLGN.contiguous(), C_BLGN.contiguous(),
                  self.D, dt_bias_H=self.dt_bias, dt_softplus=True, return_final_state=return_state,
                  chunk_size=self.chunk_size, impl=self.impl)
        y_BLHP, ssm_state = out if return_state else (out, None)
        y_BLI = self.norm(y_BLHP.reshape(Bsz, L, self.d_inner), z_BLI, impl=self.impl)
        y_BLD = self.out_proj(y_BLI)
        if not return_state:
            return y_BLD, []
        conv_state_BEW = F.pad(xBC_BEL, (self.d_conv - L, 0))   # the conv's last W inputs
        ssm_state = ssm_state.to(torch.promote_types(ssm_state.dtype, torch.float32))
        return y_BLD, [], (conv_state_BEW.contiguous(), ssm_state.contiguous())

    def allocate_state(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero decoding state: (conv_state (batch, E, W) in the activations' dtype, ssm_state
        (batch, H, P, N) in fp32 at least: it accumulates over every step)."""
        device = device if device is not None else self.conv1d.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        conv = torch.zeros(batch, self.conv1d.weight.shape[0], self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                          dtype=torch.promote_types(dtype, torch.float32))
        return conv, ssm

    def step(self, x_BD: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token: returns (y_BD, state), the state updated in place."""
        conv_state_BEW, ssm_state_BHPN = state
        z_BI, xBC_BE, dt_BH = self._split(self.in_proj(x_BD))
        u_BE = causal_conv1d_update(xBC_BE, conv_state_BEW, self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                                    impl=self.impl)
        x_BHP, B_BGN, C_BGN = self._heads(u_BE)
        A_H = -torch.exp(self.A_log.float())
        y_BHP = ssd_step(ssm_state_BHPN, x_BHP, dt_BH, A_H, B_BGN, C_BGN, self.D, dt_bias_H=self.dt_bias,
                         dt_softplus=True, impl=self.impl)
        y_BI = self.norm(y_BHP.reshape(x_BD.shape[0], self.d_inner), z_BI, impl=self.impl)
        return self.out_proj(y_BI), (conv_state_BEW, ssm_state_BHPN)
