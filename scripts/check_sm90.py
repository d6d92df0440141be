"""Compile the decode kernels (ops/moe_decode.py, ops/mamba_decode.py) for an H100 (sm_90) on a
machine without a GPU, launching nothing.

    usage (repo root):  python scripts/check_sm90.py          (exit 1 and the error if one fails)

The CPU tests run the kernels under Triton's interpreter, which does not type-check them as the
compiler does (e.g. a name reassigned with another type in a loop compiles as a loop-carried
variable and fails). Here a stub driver makes Triton target sm_90; every launch stops after the
compile (warmup=True). Needs triton (with its bundled ptxas), no CUDA device.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)      # before triton's first import

import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class Sm90Driver:
    """What JITFunction.run asks of the active driver before it launches."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled: list[str] = []
_run = triton.runtime.jit.JITFunction.run


def compile_only(self, *args, **kwargs):
    kwargs["warmup"] = True
    try:
        out = _run(self, *args, **kwargs)
    except Exception as e:  # the compiler's error, with the kernel's name
        print(f"FAILED {self.fn.__name__}: {type(e).__name__}: {e}")
        sys.exit(1)
    compiled.append(self.fn.__name__)
    return out


def main() -> None:
    driver.set_active(Sm90Driver())
    triton.runtime.jit.JITFunction.run = compile_only
    from moebench.generate import cast_for_inference
    from moebench.models.mamba import Mamba
    from moebench.ops import mamba_decode, moe_decode

    T, D, F, E = 64, 512, 1536, 32
    for dtype in (torch.bfloat16, torch.float32):
        mixer = cast_for_inference(Mamba(D), dtype)
        for norm in (nn.LayerNorm(D), nn.RMSNorm(D)):
            norm = cast_for_inference(norm, dtype)
            calls = [lambda: mamba_decode.mamba_decode_residual(x, norm, mixer, mixer.allocate_state(T, None, dtype))]
            w, b, eps, rms = moe_decode.norm_args(norm)
            calls.append(lambda: moe_decode.decode_moe_residual(x, w, b, eps, r, w1, w2, "relu", rms=rms))
            x = torch.randn(T, D, dtype=dtype)
            r = torch.randn(D, E, dtype=dtype)
            w1, w2 = torch.randn(E, D, F, dtype=dtype), torch.randn(E, F, D, dtype=dtype)
            expert_T, p_T = torch.zeros(T, dtype=torch.long), torch.ones(T)
            calls.append(lambda: moe_decode.decode_router(x, r))
            calls.append(lambda: moe_decode.decode_experts(x, expert_T, p_T, w1, w2, "gelu"))
            for call in calls:
                try:
                    with torch.no_grad():
                        call()
                except (RuntimeError, ValueError, TypeError):
                    pass    # after the compile: the launch returns nothing to read
    names = sorted(set(compiled))
    print(f"compiled for sm_90: {len(compiled)} kernels ({', '.join(names)})")


if __name__ == "__main__":
    main()
