"""One decode step of a Mamba residual sublayer, out = x + mixer(norm(x)), in three launches:

    1. norm + in_proj + causal conv update + x_proj's partial products over each channel block:
       x_BD -> u_BI = silu(conv(x-half)), z_BI, part_PBE                               (conv state shifted)
    2. the sum of x_proj's partials + dt_proj + selective state update + gate -> y_BI   (ssm state updated)
    3. out_proj + residual:   out_BD = x_BD + y_BI @ out_proj.weight.T

The unfused step (Block.step -> Mamba.step) takes eight: a norm, four GEMMs, the conv and state
kernels of causal-conv1d and mamba-ssm, and the residual add. At decode (a few tokens, weights of a
few MB) each of those is a few µs of launch latency, more than its work.

Rounding follows the unfused step: the norm's output, in_proj's output, x_proj's and dt_proj's
outputs are rounded to the activations' dtype; the conv, the softplus, the recurrence and the gate
run in fp32 (as the causal-conv1d and mamba-ssm kernels do); out_proj and the residual add round
once (the unfused step rounds out_proj's output, then the sum). The ssm state is fp32; the conv
state is in the activations' dtype.

x_proj (E = R + 2N columns) reduces over all I channels, which no program of kernel 1 holds: each
writes its block's partial product in fp32, and every program of kernel 2 sums the P partials of its
tokens in a fixed order (deterministic, no atomics); recomputing x_proj in every program of kernel 2
would be a long K loop over u and the weights. Shape suffixes: B tokens, D d_model, I d_inner,
N d_state, R dt_rank, W d_conv. On a CPU the kernels run under Triton's interpreter (as the tests do).
"""
from __future__ import annotations

import torch

from moebench.ops.moe_decode import HAS_TRITON, MAX_DECODE_T, norm_args

# Tokens (b) and channels (i) or outputs (n) per program of each kernel. Static (a CUDA graph
# captures one configuration); scripts/bench_mamba_decode.py times alternatives on a GPU.
BLOCKS = dict(in_b=16, in_i=32, in_warps=4, ssm_i=64, ssm_warps=4, out_b=16, out_n=32)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from moebench.ops.lazy_op import lazy_triton_op

    from moebench.ops.moe_decode import _dot_args

    @triton.jit
    def _in_conv_kernel(x_ptr, nw_ptr, nb_ptr, w_ptr, cw_ptr, cb_ptr, conv_ptr, xw_ptr, u_ptr, z_ptr, part_ptr,
                        B, D, I, E, eps, RMS: tl.constexpr, HAS_NB: tl.constexpr, W: tl.constexpr,
                        WP: tl.constexpr, EP: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
        # program (i-block, half, b-block): half 0 = the conv branch (in_proj rows 0..I), 1 = the gate.
        # Whole rows in one load, no K loop: at decode each program's work is a few µs of latency,
        # and every serial load in a loop adds one.
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        half = tl.program_id(1)
        b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        k = tl.arange(0, BLOCK_D)
        i_ok, b_ok, k_ok = i < I, b < B, k < D
        w = tl.load(w_ptr + (half * I + i).to(tl.int64)[None, :] * D + k[:, None],
                    mask=i_ok[None, :] & k_ok[:, None], other=0.0)
        m = b_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + b.to(tl.int64)[:, None] * D + k[None, :], mask=m, other=0.0).to(tl.float32)
        # the norm in fp32, mean then squared deviations (as a norm kernel), output in x's dtype
        if RMS:
            dev = a
        else:
            dev = tl.where(m, a - (tl.sum(a, axis=1) / D)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / D + eps)
        a = dev * rstd[:, None] * tl.load(nw_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_NB:
            a += tl.load(nb_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        a = a.to(x_ptr.dtype.element_ty)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        xz = tl.dot(a, w, input_precision=PRECISION).to(u_ptr.dtype.element_ty)
        bi = b.to(tl.int64)[:, None] * I + i[None, :]
        ok = b_ok[:, None] & i_ok[None, :]
        if half == 1:
            tl.store(z_ptr + bi, xz, mask=ok)
        else:
            # shift x into the conv state (B, I, W) and filter the window (W taps, fp32 as causal-conv1d)
            j = tl.arange(0, WP)
            s_ptr = conv_ptr + bi[:, :, None] * W + j[None, None, :]
            s_ok = ok[:, :, None] & (j < W)[None, None, :]
            win = tl.load(s_ptr + 1, mask=ok[:, :, None] & (j < W - 1)[None, None, :], other=0.0)
            win = tl.where((j == W - 1)[None, None, :], xz.to(conv_ptr.dtype.element_ty)[:, :, None], win)
            tl.store(s_ptr, win, mask=s_ok)
            taps = tl.load(cw_ptr + i[:, None] * W + j[None, :], mask=i_ok[:, None] & (j < W)[None, :], other=0.0)
            c = tl.sum(win.to(tl.float32) * taps.to(tl.float32)[None, :, :], axis=2)
            c += tl.load(cb_ptr + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
            u = tl.where(ok, c / (1.0 + tl.exp(-c)), 0.0).to(u_ptr.dtype.element_ty)
            tl.store(u_ptr + bi, u, mask=ok)
            # this block's share of x_proj (u @ x_proj.weight.T over channels i), summed in kernel 2
            e = tl.arange(0, EP)
            wx = tl.load(xw_ptr + e[None, :] * I + i[:, None], mask=(e < E)[None, :] & i_ok[:, None], other=0.0)
            if UPCAST:
                u, wx = u.to(tl.float32), wx.to(tl.float32)
            part = tl.dot(u, wx, input_precision=PRECISION)
            row = tl.program_id(0).to(tl.int64) * B + b
            tl.store(part_ptr + row[:, None] * E + e[None, :], part, mask=b_ok[:, None] & (e < E)[None, :])

    @triton.jit
    def _ssm_kernel(part_ptr, u_ptr, z_ptr, dtw_ptr, dtb_ptr, A_ptr, D_ptr, ssm_ptr, y_ptr, B, I, R, N, P,
                    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr):
        # program (i-block, token): 2-D tiles (channels × state), as mamba-ssm's state update; the
        # token's few x_proj and dt_proj products need no tl.dot (and no 16-row minimum)
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        b = tl.program_id(1).to(tl.int64)
        p, r, n = tl.arange(0, BLOCK_P), tl.arange(0, RP), tl.arange(0, NP)
        i_ok, p_ok, r_ok, n_ok = i < I, p < P, r < R, n < N
        # x_proj's row (dt_r, B, C) of this token: the sum of kernel 1's P partial products
        E = R + 2 * N
        row = (p.to(tl.int64) * B + b)[:, None] * E
        dt_r = tl.sum(tl.load(part_ptr + row + r[None, :], mask=p_ok[:, None] & r_ok[None, :], other=0.0), axis=0)
        Bm = tl.sum(tl.load(part_ptr + row + R + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0), axis=0)
        Cm = tl.sum(tl.load(part_ptr + row + R + N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0), axis=0)
        dtype = u_ptr.dtype.element_ty
        dt_r = dt_r.to(dtype).to(tl.float32)
        Bm = Bm.to(dtype).to(tl.float32)
        Cm = Cm.to(dtype).to(tl.float32)
        # dt of channels i: dt_proj (no bias: added in fp32 below, as the state update does), softplus
        wdt = tl.load(dtw_ptr + i[:, None] * R + r[None, :], mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        dt = tl.sum(wdt.to(tl.float32) * dt_r[None, :], axis=1).to(dtype).to(tl.float32)
        dt += tl.load(dtb_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)       # F.softplus, threshold 20
        u = tl.load(u_ptr + b * I + i, mask=i_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * I + i, mask=i_ok, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + i[:, None] * N + n[None, :], mask=i_ok[:, None] & n_ok[None, :], other=0.0)
        s_ptr = ssm_ptr + (b * I + i)[:, None] * N + n[None, :]
        s_ok = i_ok[:, None] & n_ok[None, :]
        h = tl.load(s_ptr, mask=s_ok, other=0.0).to(tl.float32)
        h = h * tl.exp(dt[:, None] * A) + (dt * u)[:, None] * Bm[None, :]
        tl.store(s_ptr, h.to(ssm_ptr.dtype.element_ty), mask=s_ok)
        y = tl.sum(h * Cm[None, :], axis=1) + tl.load(D_ptr + i, mask=i_ok, other=0.0).to(tl.float32) * u
        tl.store(y_ptr + b * I + i, (y * z / (1.0 + tl.exp(-z))).to(y_ptr.dtype.element_ty), mask=i_ok)

    @triton.jit
    def _out_kernel(y_ptr, w_ptr, x_ptr, out_ptr, B, I, D, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[b, n] = x[b, n] + y[b] @ w[n]: out_proj with the residual added before the one rounding
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        n_ok, b_ok = n < D, b < B
        bn = b.to(tl.int64)[:, None] * D + n[None, :]
        acc = tl.load(x_ptr + bn, mask=b_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < I
            a = tl.load(y_ptr + b.to(tl.int64)[:, None] * I + k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + n.to(tl.int64)[None, :] * I + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        tl.store(out_ptr + bn, acc.to(out_ptr.dtype.element_ty), mask=b_ok[:, None] & n_ok[None, :])

    @lazy_triton_op("moebench::mamba_decode_residual", mutates_args=("conv_state_BIW", "ssm_state_BIN"))
    def _mamba_decode_residual_op(x_BD: torch.Tensor, norm_w_D: torch.Tensor, norm_b_D: torch.Tensor | None,
                                  eps: float, rms: bool, in_w_ED: torch.Tensor, conv_w_IW: torch.Tensor,
                                  conv_b_I: torch.Tensor, xproj_w_EI: torch.Tensor, dtproj_w_IR: torch.Tensor,
                                  dtproj_b_I: torch.Tensor, A_IN: torch.Tensor, D_I: torch.Tensor,
                                  out_w_DI: torch.Tensor, conv_state_BIW: torch.Tensor,
                                  ssm_state_BIN: torch.Tensor) -> torch.Tensor:
        (B, D), (I, N), R, W = x_BD.shape, A_IN.shape, dtproj_w_IR.shape[1], conv_w_IW.shape[1]
        u_BI = torch.empty(B, I, dtype=x_BD.dtype, device=x_BD.device)
        z_BI = torch.empty_like(u_BI)
        y_BI = torch.empty_like(u_BI)
        dots = _dot_args(x_BD.dtype, _in_conv_kernel)
        BLOCK_D, E = triton.next_power_of_2(D), R + 2 * N
        cfg = BLOCKS
        P = triton.cdiv(I, cfg["in_i"])
        part_PBE = torch.empty(P, B, E, dtype=torch.float32, device=x_BD.device)
        wrap_triton(_in_conv_kernel)[(P, 2, triton.cdiv(B, cfg["in_b"]))](
            x_BD, norm_w_D, norm_b_D if norm_b_D is not None else norm_w_D, in_w_ED, conv_w_IW, conv_b_I,
            conv_state_BIW, xproj_w_EI, u_BI, z_BI, part_PBE, B, D, I, E, eps, RMS=rms, HAS_NB=norm_b_D is not None,
            W=W, WP=triton.next_power_of_2(W), EP=max(16, triton.next_power_of_2(E)), BLOCK_B=cfg["in_b"],
            BLOCK_D=BLOCK_D, BLOCK_I=cfg["in_i"], num_warps=cfg["in_warps"] * max(1, BLOCK_D // 512), **dots)
        wrap_triton(_ssm_kernel)[(triton.cdiv(I, cfg["ssm_i"]), B)](
            part_PBE, u_BI, z_BI, dtproj_w_IR, dtproj_b_I, A_IN, D_I, ssm_state_BIN, y_BI, B, I, R, N, P,
            BLOCK_P=triton.next_power_of_2(P), BLOCK_I=cfg["ssm_i"], RP=triton.next_power_of_2(R),
            NP=triton.next_power_of_2(N), num_warps=cfg["ssm_warps"])
        # (torch.addmm would copy x into its output first: one more launch)
        out_BD = torch.empty_like(x_BD)
        wrap_triton(_out_kernel)[(triton.cdiv(D, cfg["out_n"]), triton.cdiv(B, cfg["out_b"]))](
            y_BI, out_w_DI, x_BD, out_BD, B, I, D, BLOCK_B=cfg["out_b"], BLOCK_K=min(512, triton.next_power_of_2(I)),
            BLOCK_N=cfg["out_n"], num_warps=4, **dots)
        return out_BD


def mamba_decode_residual(x_BD: torch.Tensor, norm: torch.nn.Module, mixer, state) -> torch.Tensor:
    """x_BD + mixer(norm(x_BD)) for one token per sequence, the mixer's state (conv_state_BIW,
    ssm_state_BIN) updated in place. norm: nn.LayerNorm (with or without bias) or nn.RMSNorm over D;
    mixer: a moebench Mamba without inner MoEs, weights in x's dtype except A_log and D (fp32).
    Forward only (decoding, no gradient); 1 <= B <= MAX_DECODE_T."""
    if not HAS_TRITON:
        raise RuntimeError("mamba_decode_residual needs triton")
    if mixer.inner_places:
        raise ValueError("mamba_decode_residual takes a Mamba mixer without inner MoEs")
    conv_state_BIW, ssm_state_BIN = state
    (B, D), I, W = x_BD.shape, mixer.d_inner, mixer.d_conv
    if not 1 <= B <= MAX_DECODE_T or D != mixer.d_model:
        raise ValueError(f"mamba_decode_residual: x {tuple(x_BD.shape)}; 1..{MAX_DECODE_T} tokens of width {mixer.d_model}")
    if tuple(conv_state_BIW.shape) != (B, I, W) or tuple(ssm_state_BIN.shape) != (B, I, mixer.d_state):
        raise ValueError(f"state shapes {tuple(conv_state_BIW.shape)}, {tuple(ssm_state_BIN.shape)} for "
                         f"batch {B}, d_inner {I}, d_conv {W}, d_state {mixer.d_state}")
    if not (conv_state_BIW.is_contiguous() and ssm_state_BIN.is_contiguous()):
        raise ValueError("the decoding states must be contiguous (they are updated in place)")
    weights = (norm.weight, mixer.in_proj.weight, mixer.conv1d.weight, mixer.x_proj.weight,
               mixer.dt_proj.weight, mixer.out_proj.weight)
    if any(w.dtype != x_BD.dtype for w in weights) or conv_state_BIW.dtype != x_BD.dtype:
        raise TypeError(f"mamba_decode_residual wants the weights and conv state in x's dtype {x_BD.dtype} "
                        f"(generate.cast_for_inference), got {sorted({str(w.dtype) for w in weights})}, "
                        f"conv state {conv_state_BIW.dtype}")
    norm_w, bias, eps, rms = norm_args(norm)
    _mamba_decode_residual_op.register()                     # the op exists from its first call on (ops/lazy_op.py)
    return torch.ops.moebench.mamba_decode_residual(
        x_BD.contiguous(), norm_w, bias, eps, rms, mixer.in_proj.weight,
        mixer.conv1d.weight[:, 0].contiguous(), mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
        mixer.dt_proj.bias, mixer._A_for_decoding(), mixer.D, mixer.out_proj.weight, conv_state_BIW, ssm_state_BIN)
