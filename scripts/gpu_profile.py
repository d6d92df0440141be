"""Kernel tables (torch.profiler) of the hot paths on a GPU, to find where time goes before changing
anything: one MoE layer's forward+backward against a dense FFN, whole training steps of
MoE-Mamba_25M-e32 and its dense equivalent, and one decode step of MoE-Mamba_25M and Mamba_25M.

    usage (device machine, after `. scripts/device_env.sh`):  python3 scripts/gpu_profile.py [SECTION...]
    sections: moe train train-compiled decode (default: all)
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moebench.bench.common import median_ms as bench_median_ms
from moebench.bench.train_step import dense_equivalent
from moebench.models.lm import LOSS_CHUNK_CUDA
from moebench.registry import get as get_variant

DEV = torch.device("cuda")


def table(fn, n: int = 5, rows: int = 25, title: str = "") -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / n / 1e3
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / n
    print(f"\n##### {title}: {total:.3f} ms of kernels per call, {kernels:.0f} kernels per call")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))


def median_ms(fn, repeats: int = 20) -> float:
    return bench_median_ms(fn, DEV, repeats, warmup=5)


def moe_layer() -> None:
    from moebench.models.ffn import FFN
    from moebench.models.moe import MoE
    T, D, Fh, E = 32768, 512, 1536, 32
    x = torch.randn(T, D, device=DEV, requires_grad=True)
    g = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    moe = MoE(D, Fh, D, E, impl="grouped", routing="triton").to(DEV)
    ffn = FFN(D, Fh, D).to(DEV)

    def run_moe():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = moe(x)
        torch.autograd.backward([y, aux.lb_loss], [g, torch.ones_like(aux.lb_loss)])
        x.grad = None
        for p in moe.parameters():
            p.grad = None

    def run_ffn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = ffn(x)
        y.backward(g)
        x.grad = None
        for p in ffn.parameters():
            p.grad = None

    print(f"moe layer fwd+bwd: grouped {median_ms(run_moe):.3f} ms, dense {median_ms(run_ffn):.3f} ms")
    table(run_moe, title="MoE layer fwd+bwd (grouped)", rows=40)
    table(run_ffn, title="dense FFN fwd+bwd", rows=12)


def train_steps(compiled: bool = False) -> None:
    from moebench.models.lm import build_model
    from moebench.optim import clip_grad_norm, make_optimizer
    cfg = get_variant("MoE-Mamba_25M-e32")
    for c in (cfg, dense_equivalent(cfg)):
        torch.manual_seed(0)
        model = build_model(c, device=DEV)
        opt = make_optimizer(model, 1e-4)
        tok = torch.randint(0, c.vocab_size, (32, 1025), device=DEV)
        params = [p for p in model.parameters() if p.requires_grad]
        fwd = torch.compile(model) if compiled else model

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = fwd(tok[:, :-1], tok[:, 1:], return_logits=False, loss_chunk=LOSS_CHUNK_CUDA)
                total = o.loss + o.aux_loss
            total.backward()
            clip_grad_norm(opt, params, 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)

        tag = "compiled" if compiled else "eager"
        print(f"{c.name} {tag} train step: {median_ms(step, 10):.2f} ms")
        table(step, n=3, rows=45, title=f"{c.name} {tag} training step")
        del model, opt
        torch.cuda.empty_cache()


def decode() -> None:
    """One decode step at batch 64: CUDA-graph time with the decode kernels off and on (the Impl's
    decode), then the kernel table of the step as the models run by default."""
    from moebench.generate import Decoder, cast_for_inference, decoding
    from moebench.models.lm import build_model
    for name in ("MoE-Mamba_25M", "Mamba_25M"):
        cfg = get_variant(name)
        tok = torch.randint(0, cfg.vocab_size, (64,), device=DEV)
        for request in ("decode=off", "auto"):
            torch.manual_seed(0)
            model = cast_for_inference(build_model(cfg, impl=request, device=DEV), torch.bfloat16)
            with decoding(model):
                graph = Decoder(model, 64, 1024, cuda_graph=True)
                print(f"{name} decode step, {request}: graph {median_ms(lambda: graph.step(tok)):.3f} ms")
                del graph
        with decoding(model):
            dec = Decoder(model, 64, 1024, static=True)
            print(f"{name} decode step: eager-static {median_ms(lambda: dec.step(tok)):.3f} ms")
            table(lambda: dec.step(tok), n=5, rows=40, title=f"{name} decode step (static, eager)")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sections = {"moe": moe_layer, "train": train_steps, "train-compiled": lambda: train_steps(True),
                "decode": decode}
    for s in sys.argv[1:] or list(sections):
        sections[s]()
