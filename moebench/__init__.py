"""moebench: the reference suite for Mixture-of-Experts state-space language models."""
__version__ = "0.1.0"
__all__ = ["create_mamba_moe"]


def __getattr__(name: str):
    # loaded on first use: importing moebench (the CLI, the registry) must not import torch
    if name == "create_mamba_moe":
        from moebench.models.mamba_moe import create_mamba_moe
        return create_mamba_moe
    raise AttributeError(f"module 'moebench' has no attribute {name!r}")
