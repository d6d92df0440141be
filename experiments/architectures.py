"""Table 1: MoE-Mamba against Mamba, Transformer and Transformer-MoE at matched active parameters."""
from moebench.config import Ablation
from moebench.presets import presets

ABLATION = Ablation(
    name="architectures",
    table="table 1",
    question="At ~26M active parameters, does interleaving Mamba with a Switch MoE (MoE-Mamba) beat "
             "vanilla Mamba, a Transformer and a Transformer-MoE, and does a dense MLP in its place "
             "(Mamba-MLP) not?",
    variants=("Mamba_25M", "MoE-Mamba_25M", "Transformer_25M", "Transformer-MoE_25M", "Mamba-MLP_25M"),
    baseline="Mamba_25M",
    # three seeds of the headline pair where a preset runs several (gpu-small, gpu-medium)
    extra_seeds={"Mamba_25M": 3, "MoE-Mamba_25M": 3},
    # table 1 trains the 25M models for 150K steps x 64 x 1024 (~10B tokens)
    presets=presets(paper_tokens=150_000 * 64 * 1024, with_100m=True),
)

# the 100M rows of table 1 (the paper has no Transformer_100M or Mamba-MLP_100M)
PRESET_VARIANTS = {"paper-100m": ("Mamba_100M", "MoE-Mamba_100M", "Transformer-MoE_100M")}
PRESET_BASELINE = {"paper-100m": "Mamba_100M"}
X_AXIS = ""
