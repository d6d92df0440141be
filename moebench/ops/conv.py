"""Depthwise causal conv1d of the Mamba block (kernel width d_conv, one filter per channel).

Shape suffixes: B batch, D channels (d_inner), L sequence, W kernel width, S conv-state length.
'fast' calls the causal-conv1d CUDA kernels (widths 2 to 4 only); 'ref' is plain torch.
Kernel detection lives in ops/scan.py so that there is one HAS_MAMBA_KERNELS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moebench.ops.scan import Impl, kernels, use_kernels


def _check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def causal_conv1d_ref(x_BDL, weight_DW, bias_D=None, activation="silu"):
    """y_t = act(bias + sum_k weight_k x_{t-W+1+k}): a left pad of W-1 zeros keeps it causal.

    Computes in the promoted dtype of x and weight (fp32 for bf16 x with fp32 weights, as the
    kernel does) and returns x's dtype.
    """
    _check_activation(activation)
    D, W = weight_DW.shape
    dtype = torch.promote_types(x_BDL.dtype, weight_DW.dtype)
    bias_D = bias_D.to(dtype) if bias_D is not None else None
    with torch.autocast(x_BDL.device.type, enabled=False):  # else autocast would round the weights to bf16
        y_BDL = F.conv1d(F.pad(x_BDL.to(dtype), (W - 1, 0)), weight_DW.to(dtype).unsqueeze(1), bias_D, groups=D)
    if activation is not None:
        y_BDL = F.silu(y_BDL)
    return y_BDL.to(x_BDL.dtype)


def causal_conv1d(x_BDL, weight_DW, bias_D=None, activation="silu", impl: Impl = "ref"):
    """'fast': causal_conv1d.causal_conv1d_fn (CUDA); 'ref': causal_conv1d_ref."""
    if use_kernels(impl, x_BDL):
        return kernels.causal_conv1d_fn(x_BDL, weight_DW, bias_D, activation=activation)
    return causal_conv1d_ref(x_BDL, weight_DW, bias_D, activation)


def causal_conv1d_update_ref(x_BD, conv_state_BDS, weight_DW, bias_D=None, activation="silu"):
    """One decode step: shifts x_BD into conv_state_BDS (in place) and returns y_BD.

    The state holds the last S >= W-1 inputs. mamba_ssm.Mamba keeps S = W, so after the update
    the state is exactly the window the filter sees.
    """
    _check_activation(activation)
    S, W = conv_state_BDS.shape[-1], weight_DW.shape[-1]
    dtype = torch.promote_types(x_BD.dtype, weight_DW.dtype)
    seq_BDS1 = torch.cat([conv_state_BDS.to(dtype), x_BD.to(dtype)[..., None]], dim=-1)
    conv_state_BDS.copy_(seq_BDS1[..., -S:])
    y_BD = (seq_BDS1[..., -W:] * weight_DW.to(dtype)).sum(-1)
    if bias_D is not None:
        y_BD = y_BD + bias_D.to(dtype)
    if activation is not None:
        y_BD = F.silu(y_BD)
    return y_BD.to(x_BD.dtype)


def causal_conv1d_update(x_BD, conv_state_BDS, weight_DW, bias_D=None, activation="silu",
                         impl: Impl = "ref"):
    """'fast': causal_conv1d.causal_conv1d_update (CUDA); 'ref': causal_conv1d_update_ref."""
    if use_kernels(impl, x_BD):
        # the kernel wants x in the state's dtype (under autocast x may be bf16, the state fp32)
        return kernels.causal_conv1d_update(x_BD.to(conv_state_BDS.dtype), conv_state_BDS, weight_DW, bias_D,
                                            activation=activation).to(x_BD.dtype)
    return causal_conv1d_update_ref(x_BD, conv_state_BDS, weight_DW, bias_D, activation)
