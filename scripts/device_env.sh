# Source this on the lent GPU machine (no registry there): installs the mamba-ssm and
# causal-conv1d wheels carried in .whl/ (copied from ../shared/wheels, sm_90, Python 3.12)
# into /tmp/site and puts the checkout and them on PYTHONPATH.
#   usage (from the checkout root):  . scripts/device_env.sh && python -m pytest -m gpu
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
try:
    import mamba_ssm, causal_conv1d  # noqa: F401
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    print("mamba-ssm kernels: ok")
except Exception as e:
    print("mamba-ssm kernels: FAILED", type(e).__name__, e)
PY
