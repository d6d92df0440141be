"""Presets: the budgets an ablation can run at (cpu-tiny ... paper-100m) and what each preset
decides besides the budget: the corpus, how often the data may repeat, the loss smoothing, how
often to log and evaluate, and the defaults of `moebench sweep lr`. experiments/*.py build their
presets with `presets()`."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from moebench.config import Preset
from moebench.errors import UserError


@dataclass(frozen=True)
class PresetRule:
    """What a preset decides besides the budget (which each ablation states for itself)."""
    corpus: str                     # named corpus prepare() builds ("prose", "all")
    max_epochs: float | None        # refuse budgets that repeat the data more (None = no check)
    paper_ema: bool                 # True: the paper's alpha = 0.001; False: the short-run rule
    log_every: int                  # steps between curve points
    sweep_tokens: int               # default budget of `moebench sweep lr` at this preset
    n_evals: int = 10               # validation evaluations per run
    sweep_grid: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3, 2e-3)   # default rates of `moebench sweep lr`
    hidden: bool = False
    wall: str = ""                  # measured wall time of the `architectures` ablation, for --dry-run
    # learning rates of `moebench run` without --lr-source: "sweep" (the family sweeps) where the
    # budget is far from the paper's, "default" (the paper's, tuned for its budget) elsewhere
    lr_source: str = "default"
    vocab: int | None = None        # a BPE of this many tokens learned from the corpus (None: GPT-2's)
    lr: float | None = None         # lr_source "preset": this one rate for every variant


# cpu-tiny: a demonstration, not the paper's setting. Over GPT-2's 50304 tokens the twins' head was
# most of their FLOPs (20M per token, ~2,500 tokens/s whatever the body) and 164k tokens separated
# nothing; over a 4096-token BPE learned from the corpus they train at 7k (Mamba) to 27k (Transformer)
# tokens/s, and at 164k tokens, one rate for all (3e-3), two seeds ranked MoE-Mamba, Mamba-MLP, Mamba
# ahead of Transformer and Transformer-MoE in both (Transformer - Mamba +0.15, +0.11)
CPU_TINY_CTX = 128
CPU_TINY_BATCH = 8
CPU_TINY_TOKENS = 128 * CPU_TINY_BATCH * CPU_TINY_CTX     # 128 steps, 131,072 tokens per run
CPU_TINY_SEEDS = 3                                        # a paired difference with an interval

PRESET_RULES: dict[str, PresetRule] = {
    # 4 evaluations, not 10: on a CPU each costs ~1% of the run. The twins (d_model 64, 200 steps)
    # want higher rates than the paper's models: a 1e-3..4e-3 sweep (200 steps) picked 4e-3 for all of
    # table 1, so one rate for every family, and no learning rate between them to confound the ranking
    "cpu-tiny": PresetRule("prose", 1.0, False, 2, CPU_TINY_TOKENS, n_evals=4, sweep_grid=(1e-3, 2e-3, 4e-3, 8e-3),
                           wall="measured: architectures took 3.2 min on an idle 2-core CPU, data prep and report included",
                           vocab=4096, lr_source="preset", lr=3e-3),
    # corpus "small" (~25.5M train tokens): 20M-token runs never repeat it
    "gpu-small": PresetRule("small", 1.0, False, 5, 20_000_000, lr_source="sweep",
                            wall="measured: experts (6 runs x 20M tokens) took 512 s on one H100 "
                                 "(torch 2.11, mamba-ssm 2.3.2, eager bf16), data prep 10 s"),
    "gpu-medium": PresetRule("all", 1.0, False, 10, 20_000_000, lr_source="sweep",
                             wall="GPU wall time: not measured yet"),
    "paper": PresetRule("all", 1.0, True, 50, 100_000_000),
    "paper-100m": PresetRule("all", 1.0, True, 10, 500_000_000),
    "test": PresetRule("prose", None, False, 1, 192, n_evals=1, hidden=True),
}
PUBLIC_PRESETS = tuple(n for n, r in PRESET_RULES.items() if not r.hidden)
DEFAULT_PRESET = "cpu-tiny"
EMA_RULE = ("paper presets: alpha = 0.001 per step (the paper's, for 15K-150K steps); shorter runs: "
            "alpha = clamp(50 / steps, 0.001, 0.5), so the smoothing window 1/alpha is ~2% of the run")


def rule_of(preset: str) -> PresetRule:
    """The preset's rule; an ablation's own extra preset gets the test preset's (no checks)."""
    return PRESET_RULES.get(preset, PRESET_RULES["test"])


def ema_alpha_for(preset: str, steps: int) -> float:
    if rule_of(preset).paper_ema:
        return 0.001
    return min(0.5, max(0.001, 50 / max(1, steps)))


def fitting_preset(tiny: bool, device_type: str) -> str:
    """The preset whose batch, context and budget `moebench train` takes where they are not given:
    cpu-tiny for a @tiny twin or on a CPU (a few minutes there), gpu-small for a paper-size model on
    CUDA (20M tokens, minutes on an H100). The paper's 50M-token default at 64 x 1024 meant hours on a CPU."""
    return "cpu-tiny" if tiny or device_type != "cuda" else "gpu-small"


def eval_every(rule: PresetRule, steps: int, tokens_per_step: int) -> int:
    return max(1, steps // rule.n_evals) * tokens_per_step


def presets(*, paper_tokens: int, with_100m: bool = False) -> dict[str, Preset]:
    """The standard presets of an ablation; only the `paper` budget differs between tables."""
    out = {
        # the @tiny CPU twins (d_model 64) on short windows of real text; sized by measurement so
        # that the 5-variant `architectures` ablation takes ~6 minutes on 2 CPU cores (<= 10 when shared)
        "cpu-tiny": Preset(name="cpu-tiny", tokens=CPU_TINY_TOKENS, batch=CPU_TINY_BATCH, ctx=CPU_TINY_CTX,
                           scale="tiny", eval_batches=4, seeds=CPU_TINY_SEEDS,
                           note="a demonstration, not the paper's setting: CPU twins over a 4096-token BPE "
                                "learned from the corpus, 128 steps of 8 x 128, one rate for all (3e-3)"),
        # paper shapes, 610 steps of 32 x 1024: 0.8 passes over `small` (25.5M train tokens)
        # two seeds on the GPU: a paired difference with an interval (reports), at twice the GPU time
        "gpu-small": Preset(name="gpu-small", tokens=20_000_000, batch=32, ctx=1024, eval_batches=8, seeds=2,
                            note="paper shapes, 20M tokens (610 steps of 32 x 1024)"),
        # one pass over `all` (prose + docs, 88.9M train tokens once near-duplicates are dropped):
        # 2,700 steps of 32 x 1024
        "gpu-medium": Preset(name="gpu-medium", tokens=2700 * 32 * 1024, batch=32, ctx=1024, eval_batches=8, seeds=2,
                             note="paper shapes, 88.5M tokens = one pass over prose+docs"),
        "paper": Preset(name="paper", tokens=paper_tokens, batch=64, ctx=1024, eval_batches=16,
                        note="the paper's budget and batch (C4 recommended: --data)"),
        "test": Preset(name="test", tokens=3 * 2 * 32, batch=2, ctx=32, scale="tiny", eval_batches=1,
                       note="hidden: 3 steps of the CPU twins, for tests"),
    }
    if with_100m:
        # table 6: 30K steps of 1024 x 1024 (~31.5B tokens), accumulated from micro-batches of 16.
        # MoE-Mamba_100M measured on an H100 at micro-batch 8: 48.8 GiB peak (36.4 of them weights,
        # gradients and Adam state), 58.2 GiB under DDP: ~12.4 GiB of activations per 8 sequences, so
        # 32 (~86 GiB, ~96 under DDP) cannot fit an 80 GB card and 16 (~61, ~71 under DDP) can
        out["paper-100m"] = Preset(name="paper-100m", tokens=30_000 * 1024 * 1024, batch=1024, ctx=1024,
                                   micro_batch=16, eval_batches=16,
                                   note="100M variants, 30K steps x 1024 x 1024 (micro-batch 16)")
    return out


def parse_grid(text: str) -> list[float]:
    """`sweep lr --grid`: comma-separated peak rates, sorted, each in (0, 1)."""
    try:
        grid = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"bad --grid '{text}': use comma-separated rates, e.g. 2.5e-4,5e-4,1e-3") from None
    if not grid or any(not 0 < g < 1 for g in grid):
        raise UserError(f"--grid needs rates in (0, 1), got '{text}'")
    return grid


def preset_shape(preset: str) -> Preset:
    """batch / ctx / scale of a preset (the same in every ablation; only budgets differ)."""
    table = presets(paper_tokens=1, with_100m=True)
    if preset not in table:
        shown = [p for p in table if not rule_of(p).hidden]
        close = difflib.get_close_matches(preset, shown, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown preset '{preset}'{hint} (presets: {', '.join(shown)})")
    return table[preset]
