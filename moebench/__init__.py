"""moebench: the reference suite for Mixture-of-Experts state-space language models."""
from moebench.models.mamba_moe import create_mamba_moe

__version__ = "0.1.0"
__all__ = ["create_mamba_moe"]
