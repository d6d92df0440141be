"""Table 2 (figure 5, appendix F): how to split ~26M active parameters between Mamba and MoE."""
from moebench.config import Ablation
from moebench.presets import presets

ABLATION = Ablation(
    name="ratios",
    table="table 2",
    question="At fixed total and active parameters, does moving active parameters from the MoE into "
             "Mamba (ratio 1:5 -> 5:1: a larger Mamba expansion factor E, more and smaller experts) "
             "keep improving the loss, with marginal gains past 3:3? Where do the dense ends fall "
             "(Mamba_25M: 16 layers of E=2; Mamba_25M-8xE4: 8 layers of E=4, appendix F)?",
    variants=("MoE-Mamba_25M-ratio1to5", "MoE-Mamba_25M-ratio2to4", "MoE-Mamba_25M-ratio3to3",
              "MoE-Mamba_25M-ratio4to2", "MoE-Mamba_25M-ratio5to1", "Mamba_25M", "Mamba_25M-8xE4"),
    baseline="Mamba_25M",
    presets=presets(paper_tokens=1_000_000_000),   # section 4.3 runs use 1B tokens
)
X_AXIS = "ratio"
