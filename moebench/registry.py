"""Every model of the paper as one named, frozen config. A new variant is one `register(replace(...))`.

Shapes come from the paper's table 1 and appendix A (tables 5, 6), tables 2, 3, 4 and 7.
Each variant has a CPU twin, `get("NAME@tiny")`: same structure, small width, for tests and CPU runs.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import replace

from moebench.config import INNER_PLACES, ModelConfig
from moebench.errors import UserError

VARIANTS: dict[str, ModelConfig] = {}
TINY_SUFFIX = "@tiny"


def register(cfg: ModelConfig) -> ModelConfig:
    assert cfg.name not in VARIANTS, f"duplicate variant {cfg.name}"
    VARIANTS[cfg.name] = cfg
    return cfg


def get(name: str) -> ModelConfig:
    """Look up a variant; `NAME@tiny` gives its CPU twin. A bad name suggests close matches."""
    base = name.removesuffix(TINY_SUFFIX)
    if base not in VARIANTS:
        close = difflib.get_close_matches(base, VARIANTS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `moebench list` shows them all"
        raise UserError(f"unknown variant '{name}'{hint}")
    cfg = VARIANTS[base]
    return tiny(cfg) if name.endswith(TINY_SUFFIX) else cfg


def fit_vocab(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The variant with an embedding and head for a tokenizer of `vocab_size` tokens, padded to a
    multiple of 64 (GPT-2's 50257 gives the registry's 50304, the variant itself)."""
    return replace(cfg, vocab_size=64 * math.ceil(vocab_size / 64))


def _shrink(width: int, factor: int) -> int:
    return max(16, 8 * math.ceil(width / factor / 8))


def tiny(cfg: ModelConfig) -> ModelConfig:
    """CPU twin: d_model 64, widths scaled with d_model, a quarter of the layers (at least 2),
    same expert counts, top-k, capacity, placements and layout."""
    factor = cfg.d_model // 64
    return replace(
        cfg,
        name=cfg.name + TINY_SUFFIX,
        d_model=64,
        n_layer=max(2, cfg.n_layer // 4),
        n_head=4,
        d_state=8,
        headdim=16 if cfg.mixer == "mamba2" else cfg.headdim,     # 8 heads at d_inner 128
        d_ff=_shrink(cfg.d_ff, factor) if cfg.d_ff else 0,
        inner_d_hidden=_shrink(cfg.inner_d_hidden, factor),
    )


# --- table 1 and appendix A (table 5): 25M scale, d_model 512 --------------------------------
mamba_25m = register(ModelConfig(
    name="Mamba_25M", family="Mamba", mixer="mamba", ffn="none", n_layer=16, d_model=512,
    expand=2, paper_ref="table 1, table 5"))
moe_mamba_25m = register(replace(
    mamba_25m, name="MoE-Mamba_25M", family="MoE-Mamba", ffn="moe", n_layer=8,
    d_ff=1536, n_expert=42))
transformer_25m = register(ModelConfig(
    name="Transformer_25M", family="Transformer", mixer="attention", ffn="dense", n_layer=8,
    d_model=512, n_head=8, d_ff=2048, paper_ref="table 1, table 5"))
transformer_moe_25m = register(replace(
    transformer_25m, name="Transformer-MoE_25M", family="Transformer-MoE", ffn="moe",
    n_expert=32))
mamba_mlp_25m = register(replace(
    mamba_25m, name="Mamba-MLP_25M", family="Mamba-MLP", ffn="dense", n_layer=8, d_ff=1536,
    paper_ref="dense equivalent of MoE-Mamba_25M (section 4.5)"))

# --- table 1 and appendix A (table 6): 100M scale, d_model 768 ------------------------------
mamba_100m = register(replace(mamba_25m, name="Mamba_100M", n_layer=32, d_model=768,
                              paper_ref="table 1, table 6"))
moe_mamba_100m = register(replace(moe_mamba_25m, name="MoE-Mamba_100M", n_layer=16, d_model=768,
                                  d_ff=2304, paper_ref="table 1, table 6"))
transformer_moe_100m = register(replace(
    transformer_moe_25m, name="Transformer-MoE_100M", n_layer=16, d_model=768, n_head=12,
    d_ff=3072, paper_ref="table 1, table 6"))

# --- table 4: number of experts (8 blocks, experts of 1536) ---------------------------------
for _e in (1, 4, 8, 16, 32):
    register(replace(moe_mamba_25m, name=f"MoE-Mamba_25M-e{_e}", n_expert=_e, paper_ref="table 4"))

# --- table 7: parallel MoE-Mamba, x + Mamba(LN x) + MoE(LN x) -------------------------------
for _e in (1, 2, 4, 8, 16, 32):
    if f"MoE-Mamba_25M-e{_e}" not in VARIANTS:    # e2 appears only in table 7
        register(replace(moe_mamba_25m, name=f"MoE-Mamba_25M-e{_e}", n_expert=_e, paper_ref="table 7"))
    register(replace(moe_mamba_25m, name=f"ParMoE-Mamba_25M-e{_e}", family="Parallel MoE-Mamba",
                     layout="parallel", n_expert=_e, paper_ref="table 7"))

# --- table 2: ratio of active Mamba to MoE parameters (expand, expert size, experts) --------
RATIOS = {"1:5": (2 / 3, 2560, 19), "2:4": (4 / 3, 2048, 24), "3:3": (2, 1536, 32),
          "4:2": (8 / 3, 1024, 48), "5:1": (10 / 3, 512, 96)}
for _r, (_expand, _d_expert, _e) in RATIOS.items():
    register(replace(moe_mamba_25m, name=f"MoE-Mamba_25M-ratio{_r.replace(':', 'to')}",
                     expand=_expand, d_ff=_d_expert, n_expert=_e, paper_ref="table 2"))
# appendix F: the dense "6:0" end, all active parameters in Mamba (16 x E=2 is Mamba_25M itself)
register(replace(mamba_25m, name="Mamba_25M-8xE4", n_layer=8, expand=4, paper_ref="appendix F"))

# --- table 3: MoE inside the Mamba block (16 Mamba layers, experts of 352 hidden units) -----
INNER_COMBOS = [("conv",), ("gate",), ("out",), ("conv", "gate"), ("conv", "out"),
                ("gate", "out"), ("conv", "gate", "out")]
for _places in INNER_COMBOS:
    assert set(_places) <= set(INNER_PLACES)
    for _every, _experts, _tag in ((1, 24, "all"), (2, 48, "every2")):
        register(replace(mamba_25m, name=f"InnerMoE_25M-{'+'.join(_places)}-{_tag}",
                         family="Inner MoE", inner_moe=_places, inner_every=_every,
                         inner_n_expert=_experts, inner_d_hidden=352, paper_ref="table 3"))

# --- beyond the paper: the Mamba-2 mixer (mamba_ssm.Mamba2's defaults: d_state 128, head dim 64,
# one group), alone and interleaved with a Switch MoE of 32 experts; the Mamba-1 shapes otherwise,
# which give about the same parameters (16 x 1.72M against 16 x 1.70M per mixer)
mamba2_25m = register(replace(mamba_25m, name="Mamba2_25M", family="Mamba-2", mixer="mamba2", d_state=128,
                              paper_ref="Mamba-2 (Dao & Gu 2024), Mamba_25M's shape"))
moe_mamba2_25m = register(replace(moe_mamba_25m, name="MoE-Mamba2_25M", family="MoE-Mamba-2", mixer="mamba2",
                                  d_state=128, n_expert=32, paper_ref="Mamba-2 in MoE-Mamba_25M-e32's shape"))

# --- one learning-rate sweep per family (paper appendix A tunes a rate per model family) ----------
# the member a family's sweep trains; the family's other members take its rate (`moebench sweep lr
# --ablation`, `moebench run --lr-source sweep`) unless they have a sweep of their own
SWEEP_VARIANTS = {
    "Mamba": "Mamba_25M", "MoE-Mamba": "MoE-Mamba_25M", "Mamba-MLP": "Mamba-MLP_25M",
    "Transformer": "Transformer_25M", "Transformer-MoE": "Transformer-MoE_25M",
    "Parallel MoE-Mamba": "ParMoE-Mamba_25M-e32", "Inner MoE": "InnerMoE_25M-conv+gate+out-all",
    "Mamba-2": "Mamba2_25M", "MoE-Mamba-2": "MoE-Mamba2_25M",
}
assert all(VARIANTS[v].family == f for f, v in SWEEP_VARIANTS.items())
