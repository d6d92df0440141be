"""Which code runs each hot op of a model, decided once when the model is built.

    Impl(mixer, moe, routing, decode, adamw)        held by the model (LM.impl), written into every row

A request names what the user wants, field by field, and "auto" picks the fast path where it runs:
"auto", "fast" or "ref" (the Mamba mixer, as `--impl` always meant) or "key=value,...", e.g.
"mixer=ref,moe=loop" (every reference path) or "routing=torch,decode=off". An explicit fast choice
that cannot run here fails at build time with the reason; "auto" falls back quietly, and the
resolved record says what it fell back to, so a slow fallback never passes for "the Mamba number".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from moebench.config import ModelConfig
from moebench.errors import UserError
from moebench.ops import adamw as adamw_ops
from moebench.ops import mamba_decode, moe_decode  # noqa: F401  (their Triton ops, for register_all)
from moebench.ops import routing as routing_ops
from moebench.ops.lazy_op import register_all
from moebench.ops.experts import HAS_GROUPED_MM
from moebench.ops.scan import HAS_MAMBA_KERNELS, KERNEL_IMPORT_ERROR
from moebench.ops.ssd import HAS_SSD_KERNELS, SSD_IMPORT_ERROR

CHOICES = {
    "mixer": ("auto", "fast", "ref"),           # Mamba: mamba-ssm + causal-conv1d kernels | the torch reference
    "moe": ("auto", "grouped", "loop"),         # experts: grouped GEMMs | a per-expert loop (the reference)
    "routing": ("auto", "triton", "torch"),     # the grouped path's plan and gathers (ops/routing.py)
    "decode": ("auto", "on", "off"),            # decode steps through ops/mamba_decode.py, ops/moe_decode.py
    "adamw": ("auto", "triton", "fused", "torch"),  # optimizer step (optim.make_optimizer)
}


@dataclass(frozen=True, kw_only=True)
class Impl:
    mixer: Literal["fast", "ref", "sdpa"]               # sdpa: attention models (one path)
    moe: Literal["grouped", "loop"] | None = None       # None: no MoE in the model
    routing: Literal["triton", "torch"] | None = None   # None: no grouped MoE
    decode: bool = False
    adamw: Literal["triton", "fused", "torch"] = "torch"

    def to_dict(self) -> dict:
        return asdict(self)


def parse(request: str | dict | None) -> dict[str, str]:
    """'auto' | 'fast' | 'ref' | 'key=value,...' (or a dict of them) -> a full request, every key set."""
    out = dict.fromkeys(CHOICES, "auto")
    if isinstance(request, dict):
        items = list(request.items())
    else:
        text = (request or "auto").strip()
        if "=" not in text:
            items = [("mixer", text)]
        else:
            items = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise UserError(f"bad impl '{text}': use key=value pairs, e.g. mixer=ref,moe=loop")
                items.append((key.strip(), value.strip()))
    for key, value in items:
        if key not in CHOICES:
            raise UserError(f"unknown impl key '{key}': use {', '.join(CHOICES)}")
        if value not in CHOICES[key]:
            raise UserError(f"impl {key}='{value}': use {' | '.join(CHOICES[key])}")
        out[key] = value
    return out


def resolve_mixer(request: str, device: torch.device | str | None, d_conv: int = 4,
                  mamba2: bool = False) -> Literal["fast", "ref"]:
    """'fast' = mamba-ssm's kernels, on CUDA with the kernels installed and 2 <= d_conv <= 4 (the
    causal-conv1d kernels' limit); Mamba-2 also needs mamba-ssm's Triton SSD kernels."""
    if request not in CHOICES["mixer"]:
        raise ValueError(f"mixer impl must be one of {CHOICES['mixer']}, got {request!r}")
    device = torch.device(device) if device is not None else torch.get_default_device()
    why = (KERNEL_IMPORT_ERROR if not HAS_MAMBA_KERNELS
           else f"device is {device}, the kernels need CUDA" if device.type != "cuda" or not torch.cuda.is_available()
           else f"d_conv={d_conv}, the causal-conv1d kernels take 2 to 4" if not 2 <= d_conv <= 4
           else f"Mamba-2's SSD kernels: {SSD_IMPORT_ERROR}" if mamba2 and not HAS_SSD_KERNELS else None)
    if request == "ref" or (request == "auto" and why):
        return "ref"
    if why:
        raise RuntimeError(f"impl='fast' is unavailable ({why}); install moebench[gpu] (mamba-ssm, "
                           f"causal-conv1d) on a CUDA machine, or use impl='ref'")
    return "fast"


def resolve_moe(request: str, widths: tuple[int, ...] = ()) -> Literal["grouped", "loop"]:
    """'auto' is 'grouped' when torch has grouped_mm and every width is a multiple of 8 (grouped_mm
    wants 16-byte rows: 8 elements in bf16), else the loop; an explicit 'grouped' never falls back."""
    if request not in CHOICES["moe"]:
        raise ValueError(f"moe impl must be one of {CHOICES['moe']}, got {request!r}")
    if request == "grouped" and not HAS_GROUPED_MM:
        raise RuntimeError(f"impl='grouped' needs torch.nn.functional.grouped_mm or torch._grouped_mm "
                           f"(torch >= 2.8); this is torch {torch.__version__}")
    if request == "auto":
        return "grouped" if HAS_GROUPED_MM and all(w % 8 == 0 for w in widths) else "loop"
    return request


def _triton_or_fail(request: str, what: str) -> None:
    if request in ("triton", "on") and not routing_ops.HAS_TRITON:
        raise RuntimeError(f"{what}={request} needs triton (pip install triton)")


def resolve_routing(request: str, device: torch.device | str | None) -> Literal["triton", "torch"]:
    """'auto' is Triton on CUDA; an explicit 'triton' also runs on a CPU, under Triton's
    interpreter (TRITON_INTERPRET=1), as the tests do."""
    _triton_or_fail(request, "routing")
    device = torch.device(device) if device is not None else torch.get_default_device()
    if request == "auto":
        request = "triton" if routing_ops.HAS_TRITON and device.type == "cuda" else "torch"
    if request == "triton":
        register_all()            # now, not inside a torch.compile trace of the first call
    return request


def resolve_decode(request: str, device: torch.device | str | None) -> bool:
    """'auto' is on on CUDA; 'on' also on a CPU, under Triton's interpreter."""
    _triton_or_fail(request, "decode")
    device = torch.device(device) if device is not None else torch.get_default_device()
    if request == "auto":
        return routing_ops.HAS_TRITON and device.type == "cuda"
    return request == "on"


def resolve_adamw(request: str, device: torch.device | str | None) -> Literal["triton", "fused", "torch"]:
    """'triton': torch's fused AdamW with the expert-sized tensors on ops/adamw.py's step (CUDA);
    'fused': torch's fused AdamW only (CUDA); 'torch': torch's default (for-each) AdamW."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if request in ("triton", "fused") and device.type != "cuda":
        raise RuntimeError(f"adamw={request} needs CUDA; this device is {device}")
    if request == "triton" and not adamw_ops.HAS_TRITON:
        raise RuntimeError("adamw=triton needs triton (pip install triton)")
    if request == "auto":
        return "torch" if device.type != "cuda" else "triton" if adamw_ops.HAS_TRITON else "fused"
    return request


def moe_widths(cfg: ModelConfig) -> tuple[int, ...]:
    """Every input, hidden and output width of the model's MoE layers (the FFN MoE, the inner MoEs)."""
    widths: tuple[int, ...] = ()
    if cfg.ffn == "moe":
        widths += (cfg.d_model, cfg.d_ff)
    if cfg.inner_moe:
        widths += (cfg.d_model, cfg.d_inner, cfg.inner_d_hidden)
    return widths


def resolve(cfg: ModelConfig, device: torch.device | str | None = None, request: str | dict | Impl = "auto") -> Impl:
    """The Impl of a model of `cfg` on `device` (default: torch's default device)."""
    if isinstance(request, Impl):
        return request
    req = parse(request)
    has_moe = cfg.ffn == "moe" or bool(cfg.inner_moe)
    moe = resolve_moe(req["moe"], moe_widths(cfg)) if has_moe else None
    impl = Impl(
        mixer="sdpa" if cfg.mixer == "attention" else resolve_mixer(req["mixer"], device, cfg.d_conv,
                                                                            cfg.mixer == "mamba2"),
        moe=moe,
        routing=resolve_routing(req["routing"], device) if moe == "grouped" else None,
        decode=resolve_decode(req["decode"], device),
        adamw=resolve_adamw(req["adamw"], device),
    )
    if impl.decode or impl.routing == "triton":
        register_all()
    return impl
