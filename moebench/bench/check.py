"""`moebench bench check`: rerun every point of a baseline record set on this machine and compare,
metric by metric, with a threshold (10% by default).

  load_baseline   the baseline's rows: a JSONL file (or an old results/bench/*.json), or session ids
                  looked up in RESULTS/bench.jsonl and its archive
  check_env       refuses a baseline of another GPU model, torch or mamba-ssm (UserError), unless forced
  rerun           each distinct configuration of the baseline through bench_train / bench_moe /
                  bench_generate / bench_memory, `repeats` times; returns the new rows
  compare         a pure function of (baseline rows, current rows): a Finding per point and metric
  check           the command: the four above in turn

Metrics are the ones a regression shows in: tokens/s of every point (a MoE layer's forward+backward
tokens/s, prefill and decode tokens/s of generation), the ratios the report derives within a session
(a MoE's tokens/s over its dense equivalent's and the loop's; the MoE layer's time ratios), and the
peak memory of the memory benchmark. Where the baseline or the current run holds several sessions of
one point, the median of each metric counts, so repeated runs damp run-to-run noise on both sides.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moebench import env
from moebench.bench.generate import bench_generate
from moebench.bench.memory import bench_memory
from moebench.bench.moe_layer import bench_moe
from moebench.bench.train_step import bench_train
from moebench.config import ModelConfig
from moebench.errors import UserError
from moebench.paths import PUBLISHED_RESULTS
from moebench.registry import get
from moebench.report.bench import by_session, moe_ratios, train_ratios
from moebench.results import ARCHIVE, BENCH_FILE, ROW_KEYS, load_records, read_rows, table_key

RERUNS = ("bench-train", "bench-moe", "bench-generate", "bench-memory")
THRESHOLD = 0.10


# ---- the baseline -------------------------------------------------------------------------------


def load_baseline(spec: str, results: str | Path = PUBLISHED_RESULTS) -> list[dict]:
    """Rows of a file, or of the comma-separated session ids in RESULTS/bench.jsonl (and its archive)."""
    path = Path(spec)
    if path.is_file():
        rows = [r for r in read_rows(path) if r["kind"] in RERUNS or r["kind"] == "bench-multi-gpu"]
        where = str(path)
    elif path.suffix in (".jsonl", ".json") or "/" in spec:
        raise UserError(f"no baseline file {spec}")
    else:
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        stored = load_records(Path(results) / BENCH_FILE) + load_records(Path(results) / ARCHIVE)
        rows = [r for r in stored if r.get("session") in wanted]
        unknown = [s for s in wanted if not any(r["session"] == s for r in rows)]
        if unknown:
            raise UserError(f"no session {', '.join(unknown)} in {Path(results) / BENCH_FILE}: pass a session id "
                            f"of that file or a baseline .jsonl file")
        where = f"session {spec}"
    if not rows:
        raise UserError(f"{where} holds no benchmark rows")
    multi = sorted({r["session"] for r in rows if r["kind"] not in RERUNS})
    if multi:
        raise UserError(f"bench check reruns {', '.join(RERUNS)}; session {multi[0]} is bench-multi-gpu "
                        f"(scripts/gpu_multi.sh): leave it out of the baseline")
    return rows


def check_env(baseline: list[dict], device_name: str, env: dict, force: bool = False) -> list[str]:
    """What differs between the baseline's machine and this one (GPU model, torch, mamba-ssm), one
    line each; a UserError instead unless `force`."""
    here = {"device": device_name, "torch": env.get("torch"), "mamba-ssm": env.get("mamba_ssm")}
    diffs = {}
    for row in baseline:
        there = {"device": row["device"], "torch": (row.get("env") or {}).get("torch"),
                 "mamba-ssm": (row.get("env") or {}).get("mamba_ssm")}
        for key, value in there.items():
            if value != here[key]:
                diffs.setdefault(key, (value, here[key]))
    lines = [f"{key}: baseline {old}, here {new}" for key, (old, new) in diffs.items()]
    if lines and not force:
        raise UserError(f"the baseline was measured elsewhere ({'; '.join(lines)}): its numbers do not compare "
                        f"with this machine's (--force to compare anyway)")
    return lines


# ---- rerunning the baseline's points ------------------------------------------------------------


def _models(rows: list[dict], variants: list[str]) -> list[ModelConfig]:
    """The measured variants of a bench-train/-generate/-memory configuration, in the invocation's
    order: each point's recorded model (a loop baseline row records its MoE's), else the registry's
    variant of that name (rows from before the model was recorded)."""
    found: dict[str, ModelConfig] = {}
    for r in (row["result"] for row in rows):
        if r.get("baseline") == "dense-equivalent":
            continue                                  # bench_train derives it from its MoE again
        name = r.get("of") or r["variant"]
        if name not in found:
            found[name] = ModelConfig.from_dict(r["model"]) if r.get("model") else get(name)
    for r in (row["result"] for row in rows):         # a dense equivalent without its MoE's row
        if r.get("baseline") == "dense-equivalent" and r["of"] not in found:
            found[r["of"]] = get(r["of"])
    order = {v: i for i, v in enumerate(variants)}
    return [cfg for _, cfg in sorted(found.items(), key=lambda kv: order.get(kv[0], len(order)))]


def _rerun_one(kind: str, config: dict, rows: list[dict], device: str, results, on_point) -> list[dict]:
    """One invocation of the benchmark of `kind` that measures the points of `rows` again, with the
    settings of their configuration."""
    c = config
    common = dict(device=device, results=results, on_point=on_point)
    if kind == "bench-train":
        return bench_train(_models(rows, c["variants"]), batch=c["batch"], ctx=c["ctx"], dtype=c["dtype"],
                           compile=c["compile"], steps=c["steps"], warmup=c["warmup"], impl=c.get("impl", "auto"),
                           moe_impl=c.get("moe_impl", "auto"), loss_chunk=c.get("loss_chunk"),
                           baselines=any(r["result"].get("baseline") for r in rows), **common)
    if kind == "bench-moe":
        return bench_moe(tokens=c["tokens"], d=c["d"], hidden=c["hidden"], experts=c["experts"], top_k=c["top_k"],
                         capacity_factor=c["capacity_factor"], dtype=c["dtype"], steps=c["steps"],
                         warmup=c["warmup"], loop=any(r["result"]["name"] == "loop" for r in rows), **common)
    if kind == "bench-generate":
        return bench_generate(_models(rows, c["variants"]),
                              prompt_lens=sorted({r["result"]["prompt_len"] for r in rows}), gen_len=c["gen_len"],
                              batch=c["batch"], cuda_graph=c["cuda_graph"], dtype=c["dtype"],
                              impl=c.get("impl", "auto"), moe_impl=c.get("moe_impl", "auto"), **common)
    return bench_memory(_models(rows, c["variants"]), lengths=sorted({r["result"]["length"] for r in rows}),
                        batch=c["batch"], dtype=c["dtype"], impl=c.get("impl", "auto"),
                        moe_impl=c.get("moe_impl", "auto"), repeats=c["repeats"], warmup=c["warmup"],
                        loss_chunk=c.get("loss_chunk"), modes=tuple(dict.fromkeys(r["result"]["mode"] for r in rows)),
                        **common)


def configurations(baseline: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(kind, config, rows) per distinct invocation of the baseline: sessions of equal settings (a
    baseline measured several times) are rerun once per repeat, for the union of their points."""
    groups: dict[str, tuple[str, dict, list[dict]]] = {}
    for row in baseline:
        key = json.dumps([row["kind"], row["config"]], sort_keys=True, default=str)
        groups.setdefault(key, (row["kind"], row["config"], []))[2].append(row)
    return list(groups.values())


def rerun(baseline: list[dict], *, repeats: int = 1, device: str = "auto", results: str | Path | None = None,
          on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Every configuration of the baseline measured `repeats` times on `device`: the new rows."""
    rows = []
    for _ in range(repeats):
        for kind, config, points in configurations(baseline):
            rows += _rerun_one(kind, config, points, device, results, on_point)
    return rows


def check(spec: str, *, results: str | Path = PUBLISHED_RESULTS, repeats: int = 1, threshold: float = THRESHOLD,
          force: bool = False, out: str | Path | None = None,
          on_point: Callable[[dict], None] | None = None) -> tuple[list[Finding], list[str]]:
    """The baseline `spec` (load_baseline) rerun here and compared: (findings, what differs between the
    machines: empty unless `force` let a difference through). The rerun's rows go to OUT/bench.jsonl
    when `out` is given."""
    baseline = load_baseline(spec, results)
    on_cuda = any((r.get("env") or {}).get("device", "cpu" if r["device"].startswith("cpu") else "cuda") == "cuda"
                  for r in baseline)
    here = torch.device("cuda" if on_cuda and torch.cuda.is_available() else "cpu")
    diffs = check_env(baseline, env.device_name(here), env.collect(here), force)
    if on_cuda and here.type != "cuda":
        raise UserError("the baseline was measured on a GPU and CUDA is not available here")
    current = rerun(baseline, repeats=repeats, device=here.type, results=out, on_point=on_point)
    return compare(baseline, current, threshold), diffs


# ---- the comparison: baseline rows against current rows -----------------------------------------


@dataclass(frozen=True)
class Finding:
    point: str                 # what was measured, e.g. "train MoE-Mamba_25M-e32 (32×1024 bf16 eager)"
    metric: str                # "tokens/s", "vs dense-eq", ... ; "-" for a point that is missing or failed
    baseline: float | None
    current: float | None
    higher_is_better: bool
    verdict: str               # ok | better | worse | missing | failed | no baseline

    @property
    def change(self) -> float | None:
        """current / baseline - 1."""
        if self.baseline in (None, 0) or self.current is None:
            return None
        return self.current / self.baseline - 1

    @property
    def bad(self) -> bool:
        return self.verdict in ("worse", "missing", "failed")


def identity(row: dict) -> tuple:
    """What a point is, wherever and whenever it was measured: kind, table settings, place in the table."""
    return (row["kind"], *table_key(row), *ROW_KEYS[row["kind"]](row["result"]))


def label(row: dict) -> str:
    c, r = row["config"], row["result"]
    kind = row["kind"]
    if kind == "bench-train":
        return f"train {r['variant']} ({c['batch']}×{c['ctx']} {c['dtype']} {'compiled' if c['compile'] else 'eager'})"
    if kind == "bench-moe":
        return f"moe layer {r['name']} (T={c['tokens']} d={c['d']} E={c['experts']} top-{c['top_k']} {c['dtype']})"
    if kind == "bench-generate":
        return (f"generate {r['variant']} prompt {r['prompt_len']} (batch {c['batch']} {c['dtype']}"
                f"{' CUDA graph' if c['cuda_graph'] else ''})")
    return f"memory {r['variant']} {r['mode']} length {r['length']} (batch {c['batch']} {c['dtype']})"


def _value(row: dict, *path) -> float | None:
    """row["result"][path...], or None where a row (an older one) lacks it."""
    x = row["result"]
    for p in path:
        if not isinstance(x, dict) or x.get(p) is None:
            return None
        x = x[p]
    return x


def _per_s(tokens: int, ms: float | None) -> float | None:
    return tokens / ms * 1e3 if ms else None


# metric name -> (value of a row, higher is better); a value of None is not measured
POINT_METRICS: dict[str, dict[str, tuple[Callable[[dict], float | None], bool]]] = {
    "bench-train": {"tokens/s": (lambda row: _value(row, "tokens_per_s"), True)},
    "bench-moe": {
        "fwd+bwd tokens/s": (lambda row: _per_s(row["config"]["tokens"], _value(row, "fwd_bwd_ms", "median")), True),
        "fwd tokens/s": (lambda row: _per_s(row["config"]["tokens"], _value(row, "fwd_ms", "median")), True)},
    "bench-generate": {"decode tokens/s": (lambda row: _value(row, "decode_tokens_per_s"), True),
                       "prefill tokens/s": (lambda row: _value(row, "prefill_tokens_per_s"), True)},
    "bench-memory": {"tokens/s": (lambda row: _value(row, "tokens_per_s"), True),
                     "peak GiB": (lambda row: _value(row, "peak_mem_gib"), False)},
}
TRAIN_RATIOS = {"vs_dense_equivalent": "vs dense-eq", "vs_loop": "vs loop"}
# a MoE layer's time ratios (report.bench.moe_ratios): loop over grouped should stay high, the rest low
MOE_RATIOS = {"loop_over_grouped": True, "grouped_over_dense": False, "grouped_over_gemm_only": False,
              "grouped_over_dense_kernels": False}


def metrics(rows: list[dict]) -> dict[tuple, dict]:
    """{point identity: {"row": a row of it, "values": {metric: ([values], higher is better)},
    "status": [each row's status]}}: every point's own metrics and the ratios derived within each
    session (a bench-moe session's ratios form a point of their own, named "ratios"); a row that did
    not run ok adds its status only."""
    sessions = by_session(rows)
    out: dict[tuple, dict] = {}

    def entry(row, key=None):
        return out.setdefault(key or identity(row), {"row": row, "values": {}, "status": []})

    def add(e, metric, value, higher):
        if value is not None:
            e["values"].setdefault(metric, ([], higher))[0].append(value)

    for row in rows:
        e = entry(row)
        e["status"].append(row["result"].get("status"))
        if row["result"].get("status") != "ok":
            continue
        for metric, (value, higher) in POINT_METRICS[row["kind"]].items():
            add(e, metric, value(row), higher)
        if row["kind"] == "bench-train":
            for name, value in train_ratios(row, sessions).items():
                add(e, TRAIN_RATIOS[name], value, True)
    for session_rows in sessions.values():
        moe = [r for r in session_rows if r["kind"] == "bench-moe"]
        ratios = moe_ratios(moe) if moe else {}
        if ratios:
            e = entry({**moe[0], "result": {**moe[0]["result"], "name": "ratios", "status": "ok"}})
            e["status"].append("ok")
            for name, value in ratios.items():
                add(e, name, value, MOE_RATIOS[name])
    return out


def compare(baseline: list[dict], current: list[dict], threshold: float = THRESHOLD) -> list[Finding]:
    """One Finding per (baseline point, metric), in the baseline's order: `worse` when the median of the
    current values is more than `threshold` worse than the median of the baseline's, `better` when as
    much better; `missing` for a point or metric of the baseline that the current rows lack, `failed`
    for a point that did not run ok now (out of memory, unavailable) though it did in the baseline."""
    base, now = metrics(baseline), metrics(current)
    findings = []
    for key, b in base.items():
        name = label(b["row"])
        if "ok" not in b["status"]:
            findings.append(Finding(name, "-", None, None, True, "no baseline"))
            continue
        c = now.get(key)
        if c is None:
            findings.append(Finding(name, "-", None, None, True, "missing"))
            continue
        if "ok" not in c["status"]:
            findings.append(Finding(name, f"status {'/'.join(map(str, c['status']))}", None, None, True, "failed"))
            continue
        for metric, (values, higher) in b["values"].items():
            was = statistics.median(values)
            got = statistics.median(c["values"][metric][0]) if metric in c["values"] else None
            findings.append(Finding(name, metric, was, got, higher, verdict(was, got, higher, threshold)))
    return findings


def verdict(baseline: float, current: float | None, higher_is_better: bool, threshold: float) -> str:
    """worse / better by more than `threshold` of the baseline, else ok; missing without a current value."""
    if current is None:
        return "missing"
    change = (current - baseline) / abs(baseline) if baseline else 0.0
    if not higher_is_better:
        change = -change
    return "worse" if change < -threshold else "better" if change > threshold else "ok"
