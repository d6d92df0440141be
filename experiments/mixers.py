"""Beyond the paper: the Mamba-2 mixer against Mamba-1, each alone and interleaved with a Switch MoE
of 32 experts, at about the same active parameters (~26-28M)."""
from moebench.config import Ablation
from moebench.presets import presets

ABLATION = Ablation(
    name="mixers",
    table="beyond the paper",
    question="Does Mamba-2 (multi-head SSD, d_state 128) beat Mamba-1 at the same size, and does the "
             "MoE's gain over its dense mixer carry over from Mamba-1 to Mamba-2?",
    variants=("Mamba_25M", "MoE-Mamba_25M-e32", "Mamba2_25M", "MoE-Mamba2_25M"),
    baseline="Mamba_25M",
    presets=presets(paper_tokens=1_000_000_000),   # as tables 2-4: 1B tokens at the paper preset
)
X_AXIS = ""
