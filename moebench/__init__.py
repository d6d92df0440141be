"""moebench: the reference suite for Mixture-of-Experts state-space language models."""
__version__ = "0.1.0"


def create_mamba_moe(*args, **kwargs):
    """Mamba-R1-compatible constructor; see moebench.models.mamba_moe."""
    from moebench.models.mamba_moe import create_mamba_moe as _create
    return _create(*args, **kwargs)
