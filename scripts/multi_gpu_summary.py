"""Summarise the runs of scripts/gpu_multi.sh into bench rows (kind bench-multi-gpu, one per model,
appended to OUT_DIR/bench.jsonl through moebench.results): tokens/s on 1 and N GPUs (steady state:
between the first and the last curve point, so start-up and the first steps' autotuning are left
out), per GPU, the scaling efficiency, and the training and validation losses of the two runs side by side.

    usage: python3 scripts/multi_gpu_summary.py RUNS_DIR N_GPUS OUT_DIR
    then, locally: moebench results import <files_at>/bench.jsonl
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from moebench import env
from moebench.results import FILES, append_record, bench_row, load_records, new_session


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load_run(d: Path) -> dict | None:
    rows = load_records(d / "runs.jsonl")
    if not rows:
        return None
    row = rows[-1]
    with open(Path(row["curve"])) as f:
        curve = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {"row": row, "curve": curve}


def steady_tok_s(curve: list[dict]) -> float | None:
    """Tokens/s between the first and the last curve point; tok_s in the curve is cumulative."""
    pts = [c for c in curve if c.get("tok_s")]
    if len(pts) < 2:
        return None
    (a, b) = pts[0], pts[-1]
    t_a, t_b = a["tokens"] / a["tok_s"], b["tokens"] / b["tok_s"]
    return (b["tokens"] - a["tokens"]) / (t_b - t_a)


def main(runs: str, ngpu: int, out: str) -> None:
    results = []
    models = sorted({p.name.rsplit("-w", 1)[0] for p in Path(runs).glob("*-w*")}, reverse=True)
    for model in models:
        one, many = load_run(Path(runs) / f"{model}-w1"), load_run(Path(runs) / f"{model}-w{ngpu}")
        res = {"variant": model, "world_sizes": [1, ngpu], "status": "ok" if one and many else "missing"}
        if one and many:
            t1, tn = steady_tok_s(one["curve"]), steady_tok_s(many["curve"])
            pairs = [(a["step"], a["loss"], b["loss"]) for a, b in zip(one["curve"], many["curve"])]
            res.update(
                tokens_per_s={"1": t1, str(ngpu): tn},
                tokens_per_s_per_gpu={"1": t1, str(ngpu): tn / ngpu if tn else None},
                scaling_efficiency=tn / (ngpu * t1) if t1 and tn else None,
                speedup=tn / t1 if t1 and tn else None,
                loss_by_step=[{"step": int(s), "loss_1": a, f"loss_{ngpu}": b} for s, a, b in pairs],
                max_abs_loss_diff=max(abs(a - b) for _, a, b in pairs),
                whole_run_tokens_per_s={"1": one["row"]["metrics"]["tokens_per_s"],
                                        str(ngpu): many["row"]["metrics"]["tokens_per_s"]},
                final_val_loss={"1": one["row"]["metrics"]["val_loss"], str(ngpu): many["row"]["metrics"]["val_loss"]},
                peak_mem_gib_rank0={"1": one["row"]["metrics"]["peak_mem_gib"],
                                    str(ngpu): many["row"]["metrics"]["peak_mem_gib"]},
                params=one["row"].get("params"), train_config=[one["row"]["train"], many["row"]["train"]],
                git=[one["row"]["env"].get("git_sha"), many["row"]["env"].get("git_sha")],
                steps=int(one["curve"][-1]["step"]))
        again = load_run(Path(runs) / f"{model}-w1r")
        if one and again:       # the same 1-GPU run twice: how far nondeterministic kernels alone move the loss
            res["repeat_1gpu_max_abs_loss_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(one["curve"], again["curve"]))
            res["repeat_1gpu_loss_by_step"] = [b["loss"] for b in again["curve"]]
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("loss_by_step", "train_config")}))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {"n_gpus": ngpu, "launcher": "torchrun --standalone", "parallelism": "DDP (NCCL)",
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    session, envd, device = new_session(), env.collect(dev), env.device_name(dev)
    for res in results:
        append_record(Path(out) / FILES["bench-multi-gpu"],
                      bench_row("bench-multi-gpu", session, config, res, env=envd, device=device))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
