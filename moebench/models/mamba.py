"""Mamba-1 mixer (Gu & Dao 2023) with the parameter layout and initialisation of mamba_ssm.Mamba,
so that a state dict loads into either, plus the inner-MoE variants of MoE-Mamba (Pióro et al.
2024, sec. 4.4, table 3).

Shape suffixes: B batch, L sequence, D d_model, I d_inner, N d_state, R dt_rank, W d_conv,
T tokens (B*L). The scan's input matrix is named `Bx` (not the batch size B).

    x ─in_proj─┬─ x_I ─conv1d─silu─ u ─x_proj→ (dt, Bx, Cx) ─ selective scan ─ y ─┬─ ⊙ ─out_proj─ out
               └─ z_I ────────────────────────────────────────────── silu(z) ───┘
Inner MoE (paper fig. 3): "conv" replaces the x half of in_proj, "gate" the z half, "out" out_proj.
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from moebench.config import INNER_PLACES, ModelConfig
from moebench.impl import Impl, resolve, resolve_mixer
from moebench.models.moe import MoE
from moebench.ops.conv import causal_conv1d, causal_conv1d_update
from moebench.ops.scan import kernels, selective_scan, selective_state_update

# dt initialisation of mamba_ssm.Mamba (dt_init="random", dt_scale=1.0)
DT_MIN, DT_MAX, DT_INIT_FLOOR, DT_SCALE = 1e-3, 1e-1, 1e-4, 1.0


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2.0,
                 dt_rank: int | None = None, impl: str = "auto", inner_places: tuple[str, ...] = (),
                 inner_moe_kwargs: dict | None = None, decode_kernels: bool = False, device=None, dtype=None):
        """impl ('auto' | 'fast' | 'ref') is resolved here, once (moebench/impl.py). decode_kernels:
        Block.step takes this mixer's residual sublayer through ops/mamba_decode.py (not with inner
        MoEs); a model passes its Impl's choices."""
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = round(expand * d_model)  # round, not int(): 4/3 * 96 must give 128
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank in (None, "auto") else dt_rank
        if not set(inner_places) <= set(INNER_PLACES):
            raise ValueError(f"inner_places must be a subset of {INNER_PLACES}, got {inner_places}")
        self.inner_places = tuple(p for p in INNER_PLACES if p in inner_places)
        self._moe_in = "conv" in self.inner_places or "gate" in self.inner_places  # in_proj is split
        self.impl = resolve_mixer(impl, device, d_conv)
        self.decode_kernels = decode_kernels and not self.inner_places

        # Modules are created in mamba_ssm.Mamba's order so that, with the same seed, a vanilla
        # mixer draws the same initial weights.
        if self._moe_in:
            for place, name in (("conv", "x"), ("gate", "z")):
                if place in self.inner_places:
                    setattr(self, f"{place}_moe", self._moe(d_model, d_inner, inner_moe_kwargs, factory))
                else:
                    setattr(self, f"in_proj_{name}", nn.Linear(d_model, d_inner, bias=False, **factory))
        else:
            self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False, **factory)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=True, **factory)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)

        # dt_proj.weight keeps the variance of dt at init; its bias puts softplus(bias) = dt
        # log-uniformly in [DT_MIN, DT_MAX] (inverse softplus: dt + log(1 - exp(-dt)))
        dt_init_std = dt_rank**-0.5 * DT_SCALE
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(d_inner, **factory) * (math.log(DT_MAX) - math.log(DT_MIN))
                       + math.log(DT_MIN)).clamp(min=DT_INIT_FLOOR)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # an LM-level init that zeroes Linear biases must skip it

        # S4D-real init A = -(1, ..., N) per channel; A_log and D stay fp32 whatever `dtype` is, as in mamba_ssm
        A_DN = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A_DN))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner, device=device))
        self.D._no_weight_decay = True

        if "out" in self.inner_places:
            self.out_moe = self._moe(d_inner, d_model, inner_moe_kwargs, factory)
        else:
            self.out_proj = nn.Linear(d_inner, d_model, bias=False, **factory)

    @staticmethod
    def _moe(d_in: int, d_out: int, kw: dict | None, factory: dict) -> MoE:
        if not kw:
            raise ValueError("inner_places needs inner_moe_kwargs (n_expert, d_hidden, top_k, ...)")
        kw = dict(kw)
        moe = MoE(d_in, kw.pop("d_hidden"), d_out, kw.pop("n_expert"), **kw)
        factory = {k: v for k, v in factory.items() if v is not None}
        return moe.to(**factory) if factory else moe

    @classmethod
    def from_config(cls, cfg: ModelConfig, layer_idx: int, impl: Impl | str = "auto", device=None,
                    dtype=None) -> "Mamba":
        """The mixer of block `layer_idx`, with the model's Impl (a request string is resolved here)."""
        impl = resolve(cfg, device, impl)
        places = cfg.inner_places_of(layer_idx)
        moe_kwargs = None
        if places:  # inner_n_expert is per modified block, split evenly over its MoEs
            moe_kwargs = dict(n_expert=cfg.inner_n_expert // len(places), d_hidden=cfg.inner_d_hidden,
                              top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                              aux_loss_coef=cfg.aux_loss_coef, activation=cfg.activation, impl=impl.moe,
                              routing=impl.routing or "torch", decode=impl.decode)
        return cls(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, dt_rank=cfg.dt_rank,
                   impl=impl.mixer, inner_places=places, inner_moe_kwargs=moe_kwargs, decode_kernels=impl.decode,
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"impl={self.impl!r}, d_inner={self.d_inner}, inner_places={self.inner_places}, "
                f"decode_kernels={self.decode_kernels}")

    def _in_proj(self, x_TD: torch.Tensor, valid_T, aux: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The x and z branches (T, I) when at least one of them is an MoE."""
        out = []
        for place, name in (("conv", "x"), ("gate", "z")):
            if place in self.inner_places:
                y_TI, a = getattr(self, f"{place}_moe")(x_TD, valid_T, need_aux=aux is not None)
                if aux is not None:
                    aux.append(a)
            else:
                y_TI = getattr(self, f"in_proj_{name}")(x_TD)
            out.append(y_TI)
        return out[0], out[1]

    def _out_proj(self, y_TI: torch.Tensor, valid_T, aux: list) -> torch.Tensor:
        if "out" in self.inner_places:
            out_TD, a = self.out_moe(y_TI, valid_T, need_aux=aux is not None)
            if aux is not None:
                aux.append(a)
            return out_TD
        return self.out_proj(y_TI)

    def forward(self, x_BLD: torch.Tensor, valid_BL: torch.Tensor | None = None, return_state: bool = False):
        """Returns (y_BLD, aux_list) or, with return_state, (y_BLD, aux_list, (conv_state, ssm_state)).

        valid_BL (bool, False = padding): the mixer's input is zeroed there, so what those
        positions hold cannot reach other positions; inner MoEs get the flat mask to ignore them.
        """
        Bsz, L, _ = x_BLD.shape
        I, N, R = self.d_inner, self.d_state, self.dt_rank
        valid_T = None
        if valid_BL is not None:
            valid_BL = valid_BL.to(torch.bool)
            x_BLD = x_BLD.masked_fill(~valid_BL[..., None], 0)  # masked_fill, so NaN padding stays out too
            valid_T = valid_BL.reshape(-1)
        aux: list = []
        A_DN = -torch.exp(self.A_log.float())
        x_TD = x_BLD.reshape(Bsz * L, self.d_model)
        if not self._moe_in:
            # one matmul straight into (B, 2I, L) with L contiguous, the kernels' layout (as mamba_ssm)
            xz_BEL = (self.in_proj.weight @ x_TD.t()).view(2 * I, Bsz, L).transpose(0, 1)
            if self.impl == "fast" and not self.inner_places and not return_state:
                # fused conv + scan + out_proj of mamba_ssm.Mamba; it casts for autocast itself
                y_BLD = kernels.mamba_inner_fn(
                    xz_BEL, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                    self.out_proj.weight, self.out_proj.bias, A_DN, None, None, self.D.float(),
                    delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
                return y_BLD, aux
            x_BIL, z_BIL = xz_BEL.chunk(2, dim=1)
        else:
            x_TI, z_TI = self._in_proj(x_TD, valid_T, aux)
            x_BIL = x_TI.view(Bsz, L, I).transpose(1, 2).contiguous()
            z_BIL = z_TI.view(Bsz, L, I).transpose(1, 2).contiguous()

        u_BIL = causal_conv1d(x_BIL, self.conv1d.weight[:, 0], self.conv1d.bias, "silu", impl=self.impl)
        x_dbl_TE = self.x_proj(u_BIL.transpose(1, 2).reshape(Bsz * L, I))
        dt_TR, Bx_TN, Cx_TN = torch.split(x_dbl_TE, [R, N, N], dim=-1)
        dt_BIL = (self.dt_proj.weight @ dt_TR.t()).view(I, Bsz, L).transpose(0, 1)  # bias is added in the scan
        Bx_BNL = Bx_TN.view(Bsz, L, N).transpose(1, 2).contiguous()
        Cx_BNL = Cx_TN.view(Bsz, L, N).transpose(1, 2).contiguous()
        scan = selective_scan(u_BIL, dt_BIL, A_DN, Bx_BNL, Cx_BNL, self.D.float(), z_BDL=z_BIL,
                              delta_bias_D=self.dt_proj.bias.float(), delta_softplus=True,
                              return_last_state=return_state, impl=self.impl)
        y_BIL, ssm_state_BIN = scan if return_state else (scan, None)
        out_TD = self._out_proj(y_BIL.transpose(1, 2).reshape(Bsz * L, I), valid_T, aux)
        y_BLD = out_TD.view(Bsz, L, self.d_model)
        if not return_state:
            return y_BLD, aux
        # the conv state is the last W inputs of the conv (zeros in front when L < W)
        conv_state_BIW = F.pad(x_BIL, (self.d_conv - L, 0))
        return y_BLD, aux, (conv_state_BIW.contiguous(), ssm_state_BIN.contiguous())

    def allocate_state(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero decoding state: (conv_state (batch, I, W), ssm_state (batch, I, N)).

        dtype is the activations' dtype (default conv1d's), which the conv kernel wants for its
        state. The ssm state is at least fp32 whatever dtype says: it accumulates over every step,
        and the state-update kernel reads and writes any float dtype."""
        device = device if device is not None else self.conv1d.weight.device
        dtype = dtype or self.conv1d.weight.dtype
        conv_state_BIW = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm_state_BIN = torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                    dtype=torch.promote_types(dtype, torch.float32))
        return conv_state_BIW, ssm_state_BIN

    def _A_for_decoding(self) -> torch.Tensor:
        """-exp(A_log), computed once per version of A_log while no gradient is needed: two kernels
        fewer per layer and decode step (A_log changes only in an optimizer step)."""
        if torch.is_grad_enabled() and self.A_log.requires_grad:
            return -torch.exp(self.A_log.float())
        key = (self.A_log._version, self.A_log.data_ptr(), self.A_log.device)
        cache = getattr(self, "_A_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                self._A_cache = cache = (key, -torch.exp(self.A_log.float()))
        return cache[1]

    def step(self, x_BD: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One token: returns (y_BD, state), the state updated in place. Inner MoEs route the B
        tokens of this step together (their aux outputs are dropped: decoding does not train)."""
        conv_state_BIW, ssm_state_BIN = state
        N, R = self.d_state, self.dt_rank
        if self._moe_in:
            x_BI, z_BI = self._in_proj(x_BD, None, None)
        else:
            x_BI, z_BI = self.in_proj(x_BD).chunk(2, dim=-1)
        u_BI = causal_conv1d_update(x_BI, conv_state_BIW, self.conv1d.weight[:, 0], self.conv1d.bias, "silu",
                                    impl=self.impl)
        dt_BR, Bx_BN, Cx_BN = torch.split(self.x_proj(u_BI), [R, N, N], dim=-1)
        dt_BI = F.linear(dt_BR, self.dt_proj.weight)  # bias is added in the state update
        A_DN = self._A_for_decoding()
        y_BI = selective_state_update(ssm_state_BIN, u_BI, dt_BI, A_DN, Bx_BN, Cx_BN, self.D, z_BI,
                                      dt_bias_D=self.dt_proj.bias, dt_softplus=True, impl=self.impl)
        return self._out_proj(y_BI, None, None), (conv_state_BIW, ssm_state_BIN)
