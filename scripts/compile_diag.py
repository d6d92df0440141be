"""Does a compiled training step learn? Overfits one random batch for a few steps with the train loop's
step (bf16 autocast, chunked loss, clipping, the Impl's AdamW), eager and compiled, with some fast paths
swapped for their references, and prints the loss before and after, the first gradient norm and how far
the weights moved. A compiled step that moves nothing shows as a flat loss.
    python scripts/compile_diag.py [VARIANT ...]        (on a GPU; default Mamba_25M@tiny MoE-Mamba_25M@tiny)"""
import os
import sys

import torch

from moebench.models.lm import build_model, default_loss_chunk
from moebench.optim import clip_grad_norm, make_optimizer
from moebench.registry import get

CASES = [(False, "auto"), (True, "auto"), (True, "adamw=torch"), (True, "mixer=ref"), (True, "mixer=ref,adamw=torch")]


def run(name: str, compiled: bool, impl: str, steps: int = 25) -> str:
    dev = torch.device(os.environ.get("DEVICE", "cuda"))      # DEVICE=cpu checks the script itself
    torch.manual_seed(0)
    model = build_model(get(name), impl=impl, device=dev)
    opt = make_optimizer(model, 3e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator(device=dev).manual_seed(0)
    idx = torch.randint(0, 50257, (8, 513), device=dev, generator=g)
    losses, norms, parts = [], [], ""
    for step in range(steps):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            o = fwd(idx[:, :-1], idx[:, 1:], return_logits=False, loss_chunk=default_loss_chunk(dev))
            (o.loss + o.aux_loss).backward()
        if step == 0:      # where the gradient is (or is not): the head, the embedding, the first block
            named = dict(model.named_parameters())
            parts = ", ".join(f"{k} {named[k].grad.norm().item():.3g}" if named[k].grad is not None else f"{k} none"
                              for k in ("head.weight", "embed.weight", next(k for k in named if k.startswith("blocks.0."))))
        norms.append(clip_grad_norm(opt, params, 0.5).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(o.loss.item())
    moved = sum((p.detach() - b).float().norm().item() ** 2 for p, b in zip(params, before)) ** 0.5
    return (f"{name:22s} {'compiled' if compiled else 'eager':8s} {impl:22s} loss {losses[0]:.3f} -> {losses[-1]:.3f}  "
            f"grad norm {norms[0]:.3g} ({parts})  weights moved {moved:.3g}  impl {model.impl}")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["Mamba_25M@tiny", "MoE-Mamba_25M@tiny"]:
        for compiled, impl in CASES:
            try:
                print(run(name, compiled, impl), flush=True)
            except Exception as e:       # noqa: BLE001: one failing case must not hide the others
                print(f"{name} {compiled} {impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)
