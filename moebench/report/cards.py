"""The model cards' claims, measured: the "model cards" section of reports/claims.md, from the
benchmark rows of a results folder's bench.jsonl only (`moebench bench generate` and `bench memory`).

The Mamba card: "5x faster inference" than a Transformer of the same size, "no KV cache: lower
memory", "constant memory per token" when streaming, "linear scaling with sequence length",
"million-token sequences". The Mamba-R1 card: MoE with Mamba gives "increased token processing" and
"reduced memory usage" against Transformers (its quality claim is judged from training runs in
report/claims.py). Each pair is compared on the same GPU model, each variant at its best measured
implementation (the fastest of its rows: CUDA graphs or not).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from moebench.fmt import length

REPRODUCED, PARTLY, NOT_AT_BUDGET, CONTRADICTED, NOT_RUN = ("reproduced", "partly", "not reproduced at this budget",
                                                            "contradicted", "not run")
SPEEDUP = 5.0                       # the Mamba card's "5x faster inference"
LINEAR = 1.15                       # log-log slope of time against length up to which it is (at most) linear
BUSY = 0.85                         # below it, time is not yet proportional to the work
SUPERLINEAR = 1.3                   # beyond it, not linear (attention's quadratic term tends to 2)
SLOPE_SPAN = 8                      # the fit covers the longest lengths, from the longest / 8 up
SLOPE_FROM = 4096                   # shorter lengths are dominated by fixed costs (launches, the head)
MILLION = 1_000_000
DECODE_PAIRS = [("Mamba_25M", "Transformer_25M", "Mamba card: 5x faster inference than a Transformer"),
                ("MoE-Mamba_25M", "Transformer-MoE_25M", "Mamba-R1 card: increased token processing")]
MEMORY_PAIRS = [("Mamba_25M", "Transformer_25M", "Mamba card: no KV cache, constant memory per token"),
                ("MoE-Mamba_25M", "Transformer-MoE_25M", "Mamba-R1 card: reduced memory usage")]
LONG_VARIANTS = ("Mamba_25M", "Mamba2_25M", "MoE-Mamba_25M")
SCALING_VARIANTS = ("Mamba_25M", "Mamba2_25M", "MoE-Mamba_25M", "Transformer_25M")


@dataclass(frozen=True)
class CardClaim:
    claim: str
    ours: str
    test: str
    verdict: str


def _ok(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind and r["result"].get("status") == "ok"]


def best_decode(rows: list[dict]) -> dict[tuple, dict]:
    """(device, variant, batch, prompt_len) -> the fastest bench-generate result there."""
    best: dict[tuple, dict] = {}
    for r in _ok(rows, "bench-generate"):
        res = r["result"]
        key = (r["device"], res["variant"], res["batch"], res["prompt_len"])
        if key not in best or res["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
            best[key] = res
    return best


def decode_speedup(rows: list[dict], fast: str, slow: str, claim: str) -> list[CardClaim]:
    """One claim per (device, batch): the decode rate ratio at each context both ran, and from which
    context on it reaches SPEEDUP."""
    best = best_decode(rows)
    out = []
    for dev, batch in sorted({(k[0], k[2]) for k in best if k[1] == fast}):
        lens = sorted(k[3] for k in best if k[:3] == (dev, fast, batch) and (dev, slow, batch, k[3]) in best)
        if not lens:
            continue
        ratio = {L: best[(dev, fast, batch, L)]["decode_tokens_per_s"] / best[(dev, slow, batch, L)]["decode_tokens_per_s"]
                 for L in lens}
        reach = [L for L in lens if ratio[L] >= SPEEDUP]
        if len(reach) == len(lens):
            verdict = REPRODUCED
        elif reach and all(ratio[L] >= SPEEDUP for L in lens if L >= reach[0]):
            verdict = f"{PARTLY}: from {length(reach[0])} tokens of context"
        else:
            verdict = CONTRADICTED if max(ratio.values()) < SPEEDUP else NOT_AT_BUDGET
        ours = ", ".join(f"{length(L)}: {ratio[L]:.1f}x" for L in lens)
        out.append(CardClaim(f"{claim} ({fast} vs {slow}, batch {batch}, {dev})", f"decode tokens/s ratio {ours}",
                             f"ratio >= {SPEEDUP:g} at every context", verdict))
    return out


def state_memory(rows: list[dict], small: str, large: str, claim: str) -> list[CardClaim]:
    """The decode state (conv + SSM states; K and V caches) against context: constant for `small`,
    and below `large`'s at every context both ran."""
    best = best_decode(rows)
    out = []
    for dev, batch in sorted({(k[0], k[2]) for k in best if k[1] == small}):
        mine = {k[3]: v["state_bytes"] for k, v in best.items() if k[:3] == (dev, small, batch)}
        theirs = {k[3]: v["state_bytes"] for k, v in best.items() if k[:3] == (dev, large, batch)}
        common = sorted(mine.keys() & theirs.keys())
        if len(mine) < 2 or not common:
            continue
        constant = max(mine.values()) == min(mine.values())
        lower = all(mine[L] < theirs[L] for L in common)
        lo, hi = common[0], common[-1]
        ours = (f"state {mine[lo] / 2**20:.1f} MiB at {length(lo)} and {mine[hi] / 2**20:.1f} MiB at {length(hi)}; "
                f"{large}: {theirs[lo] / 2**20:.1f} and {theirs[hi] / 2**20:.1f} MiB")
        verdict = REPRODUCED if constant and lower else CONTRADICTED
        out.append(CardClaim(f"{claim} ({small} vs {large}, batch {batch}, {dev})", ours,
                             "state bytes the same at every context and below the other's", verdict))
    return out


def longest(rows: list[dict], variant: str, dev: str) -> tuple[int | None, int | None]:
    """(the longest batch-1 prefill that ran, the shortest that ran out of memory) over bench-generate
    prompts and bench-memory prefill lengths."""
    ok, oom = [], []
    for r in rows:
        res = r["result"]
        if r.get("device") != dev or res.get("variant") != variant or res.get("batch") != 1:
            continue
        if r["kind"] == "bench-generate":
            L = res.get("prompt_len")
        elif r["kind"] == "bench-memory" and res.get("mode") == "prefill":
            L = res.get("length")
        else:
            continue
        (ok if res.get("status") == "ok" else oom if res.get("status") == "oom" else []).append(L)
    return (max(ok) if ok else None), (min(oom) if oom else None)


def million_tokens(rows: list[dict]) -> list[CardClaim]:
    out = []
    devices = sorted({r["device"] for r in rows if r.get("kind") in ("bench-generate", "bench-memory")})
    for dev in devices:
        for v in LONG_VARIANTS:
            ok, oom = longest(rows, v, dev)
            if ok is None and oom is None:
                continue
            t_ok, t_oom = longest(rows, "Transformer_25M", dev)
            ours = f"longest prefill at batch 1: {length(ok) if ok else 'none'}" + (f", out of memory at {length(oom)}" if oom else "")
            ours += f"; Transformer_25M: {length(t_ok) if t_ok else 'none'}" + (f", out of memory at {length(t_oom)}" if t_oom else "")
            verdict = (REPRODUCED if ok and ok >= MILLION else CONTRADICTED if oom and oom < 2 * MILLION   # 2^20 too
                       else NOT_RUN)
            out.append(CardClaim(f"Mamba card: million-token sequences ({v}, {dev})", ours,
                                 "a prefill of >= 1M tokens at batch 1 runs", verdict))
    return out


def scaling_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The (length, time) points a slope is fitted on: the longest lengths, from the longest / SLOPE_SPAN
    (and SLOPE_FROM) up, where the asymptotic cost shows; none unless there are three."""
    top = max((L for L, t in points if t > 0), default=0)
    pts = sorted((L, t) for L, t in points if L >= max(SLOPE_FROM, top // SLOPE_SPAN) and t > 0)
    return pts if len(pts) >= 3 and pts[-1][0] >= SLOPE_SPAN * pts[0][0] else []


def scaling_slope(points: list[tuple[int, float]]) -> float | None:
    """Slope of log time against log length over scaling_points; None when there are none."""
    pts = scaling_points(points)
    if not pts:
        return None
    return float(np.polyfit([math.log(L) for L, _ in pts], [math.log(t) for _, t in pts], 1)[0])


def linear_scaling(rows: list[dict]) -> list[CardClaim]:
    by = defaultdict(dict)      # (device, variant, mode) -> length -> fastest median time
    for r in _ok(rows, "bench-memory"):
        res = r["result"]
        if res.get("batch") != 1:
            continue
        key = (r["device"], res["variant"], res["mode"])
        t = res["time_s"]["median"]
        by[key][res["length"]] = min(t, by[key].get(res["length"], math.inf))
    out = []
    for (dev, v, mode), pts in sorted(by.items()):
        if v not in SCALING_VARIANTS:
            continue
        slope = scaling_slope(list(pts.items()))
        if slope is None:
            continue
        span = [L for L, _ in scaling_points(list(pts.items()))]
        if v.startswith("Transformer"):
            verdict = "(for contrast)"
        else:
            # far below 1 the fixed costs still dominate: the lengths never reached the regime the claim is about
            verdict = (NOT_AT_BUDGET if slope < BUSY else REPRODUCED if slope <= LINEAR
                       else CONTRADICTED if slope > SUPERLINEAR else NOT_AT_BUDGET)
        under = " (the GPU is not yet busy at these lengths: measure longer ones)" if slope < BUSY else ""
        out.append(CardClaim(f"Mamba card: linear scaling with sequence length ({v}, {mode}, {dev})",
                             f"log-log slope {slope:.2f} over {length(span[0])}-{length(span[-1])}{under}",
                             f"slope of time against length at most {LINEAR} (quadratic: 2)", verdict))
    return out


def card_claims(rows: list[dict]) -> list[CardClaim]:
    """Every card claim the benchmark rows can speak to; none for a claim they cannot."""
    out: list[CardClaim] = []
    for fast, slow, claim in DECODE_PAIRS:
        out += decode_speedup(rows, fast, slow, claim)
    for small, large, claim in MEMORY_PAIRS:
        out += state_memory(rows, small, large, claim)
    return out + million_tokens(rows) + linear_scaling(rows)
