"""Table 3: MoE inside the Mamba block (conv / gate / output projections) instead of beside it."""
from moebench.config import Ablation
from moebench.presets import presets
from moebench.registry import INNER_COMBOS

ABLATION = Ablation(
    name="inner",
    table="table 3",
    question="Can replacing the Mamba block's own projections (conv, gate, output; 24 experts per "
             "block, or 48 in every other block) with MoEs beat vanilla Mamba, and does any placement "
             "reach MoE-Mamba with 16 experts?",
    variants=("Mamba_25M", "MoE-Mamba_25M-e16") + tuple(
        f"InnerMoE_25M-{'+'.join(places)}-{tag}" for places in INNER_COMBOS for tag in ("all", "every2")),
    baseline="Mamba_25M",
    presets=presets(paper_tokens=1_000_000_000),   # "final log perplexity (1B tokens)"
)
X_AXIS = "placement"
