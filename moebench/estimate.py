"""Time estimates for `moebench run --dry-run`: from finished runs of the same model and shape on
this device when there are any, else from a stated throughput (CPU: the twins' measured tokens/s;
GPU: training FLOPs at an assumed MFU)."""
from __future__ import annotations

from dataclasses import dataclass

from moebench import env
from moebench.ablations import Plan, PlannedRun
from moebench.models.lm import describe
from moebench.presets import CPU_TINY_CTX, rule_of
from moebench.results import load_records

# wall-clock tokens/s (training + evaluation) of the @tiny twins at cpu-tiny's shape (8 x 128, over its
# 4096-token BPE) on an idle 2-core x86 CPU (torch 2.13): the README quick start, 3 seeds each, 2026-12-08
CPU_TINY_TOK_S: dict[str, float] = {
    "Mamba_25M@tiny": 6700, "MoE-Mamba_25M@tiny": 9700, "Transformer_25M@tiny": 27900,
    "Transformer-MoE_25M@tiny": 20300, "Mamba-MLP_25M@tiny": 11300,
}
CPU_FLOPS = 16e9                # the slowest twin's FLOPs/token x tokens/s above (Mamba), for any other twin
ASSUMED_GPU_MFU = 0.10          # for a GPU time estimate when no run of the variant was measured yet
# training tokens of the named corpora once prepared, for the passes per run before preparing them
# train tokens of the prepared corpora (data format 2: near-duplicates dropped, 1% held out)
APPROX_TRAIN_TOKENS = {"prose": 10.1e6, "news": 2.6e6, "small": 25.5e6, "docs": 78.8e6, "all": 88.9e6}


def estimate_seconds(run: PlannedRun, device_name: str, is_cuda: bool, rows: list[dict],
                     flops_per_token: float) -> tuple[float | None, str]:
    """(seconds, how): from finished runs of the same model and shape on this device, else from a
    stated throughput (CPU: the twins' measured tokens/s; GPU: FLOPs at an assumed MFU)."""
    measured = sorted(r["metrics"]["tokens"] / r["metrics"]["wall_s"] for r in rows
                      if r.get("variant_hash") == run.cfg.config_hash() and r.get("status") == "done"
                      and (r.get("env") or {}).get("device_name") == device_name
                      and (r.get("train") or {}).get("batch") == run.tcfg.batch
                      and (r.get("train") or {}).get("ctx") == run.tcfg.ctx
                      and (r.get("metrics") or {}).get("wall_s"))
    if measured:
        return run.tcfg.tokens / measured[len(measured) // 2], "measured here"
    if is_cuda:
        peak = env.peak_flops(device_name)
        if peak:
            return run.tcfg.tokens * flops_per_token / (peak * ASSUMED_GPU_MFU), f"MFU {ASSUMED_GPU_MFU:.0%} assumed"
        return None, "unknown GPU"
    if run.cfg.name in CPU_TINY_TOK_S and run.tcfg.ctx == CPU_TINY_CTX:
        return run.tcfg.tokens / CPU_TINY_TOK_S[run.cfg.name], "2-core CPU, measured"
    return run.tcfg.tokens * flops_per_token / CPU_FLOPS, f"{CPU_FLOPS / 1e9:.0f} GFLOP/s"


@dataclass
class RunEstimate:
    run: PlannedRun
    steps: int
    model: dict                  # describe(): parameters and FLOPs per token at the run's context
    seconds: float | None        # None: no estimate (an unknown GPU)
    how: str


@dataclass
class PlanEstimate:
    device_name: str
    runs: list[RunEstimate]
    total_s: float               # the runs still to do that have an estimate
    unknown: int                 # the runs still to do that have none
    epochs: float | None         # passes over the training data per run; None when unknown
    max_epochs: float | None     # the preset's limit (None = no check)
    repeats_too_often: bool      # the run will refuse the budget without --allow-repeat
    wall: str                    # the preset's measured wall time, if any


def estimate_plan(plan: Plan, device: str = "auto") -> PlanEstimate:
    """What `moebench run --dry-run` prints besides the plan: a time per run and in all, and how
    often each run reads the data (approximately, from the corpus' usual size, before preparing it)."""
    dev = env.resolve_device(device)
    name = env.device_name(dev)
    rows = load_records(plan.out / "runs.jsonl")
    described: dict[str, dict] = {}
    estimates, total_s, unknown = [], 0.0, 0
    for run in plan.runs:
        if run.cfg.name not in described:
            described[run.cfg.name] = describe(run.cfg, run.tcfg.ctx)
        model = described[run.cfg.name]
        secs, how = estimate_seconds(run, name, dev.type == "cuda", rows, model["flops_per_token"])
        if run.status not in ("done", "reuse"):
            if secs is None:
                unknown += 1
            else:
                total_s += secs
        estimates.append(RunEstimate(run, run.tcfg.tokens // (run.tcfg.batch * run.tcfg.ctx), model, secs, how))
    n_train = plan.n_train_tokens or APPROX_TRAIN_TOKENS.get(plan.corpus)
    epochs = max(r.tcfg.tokens for r in plan.runs) / n_train if n_train and plan.runs else None
    rule = rule_of(plan.preset)
    # compared as printed (2 decimals), so that "1.00 passes" never comes with a warning
    repeats = (rule.max_epochs is not None and epochs is not None and not plan.allow_repeat
               and round(epochs, 2) > rule.max_epochs)
    return PlanEstimate(name, estimates, total_s, unknown, epochs, rule.max_epochs, repeats, rule.wall)
