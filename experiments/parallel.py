"""Table 7 (figure 6): sequential MoE-Mamba against the parallel block x + Mamba(LN x) + MoE(LN x)."""
from moebench.config import Ablation
from moebench.presets import presets

EXPERTS = (1, 2, 4, 8, 16, 32)

ABLATION = Ablation(
    name="parallel",
    table="table 7",
    question="Is the parallel MoE-Mamba block worse than the sequential one at every number of "
             "experts (paper: by ~0.03 nats), and from how many experts does it match vanilla Mamba "
             "(paper: >= 8)?",
    variants=("Mamba_25M",) + tuple(f"{kind}-Mamba_25M-e{e}" for e in EXPERTS for kind in ("MoE", "ParMoE")),
    baseline="Mamba_25M",
    presets=presets(paper_tokens=1_000_000_000),   # "final log perplexity (1B tokens)"
)
X_AXIS = "n_expert"
