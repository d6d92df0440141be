"""Table 4 (and figure 4): MoE-Mamba with 1 to 32 experts at fixed active parameters."""
from moebench.config import Ablation
from moebench.presets import presets

ABLATION = Ablation(
    name="experts",
    table="table 4",
    question="With the active parameters fixed (~26M), does MoE-Mamba improve monotonically with the "
             "number of experts, and from how many experts does it beat vanilla Mamba (paper: >= 4)?",
    variants=("Mamba_25M", "MoE-Mamba_25M-e1", "MoE-Mamba_25M-e4", "MoE-Mamba_25M-e8",
              "MoE-Mamba_25M-e16", "MoE-Mamba_25M-e32"),
    baseline="Mamba_25M",
    # three seeds of the headline pair where a preset runs several (gpu-small, gpu-medium): Mamba and
    # the most experts, this table's counterpart of architectures' MoE-Mamba_25M
    extra_seeds={"Mamba_25M": 3, "MoE-Mamba_25M-e32": 3},
    presets=presets(paper_tokens=1_000_000_000),   # "log perplexity after 1B tokens"
)
X_AXIS = "n_expert"
