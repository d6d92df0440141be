"""Benchmark rows (a results folder's bench.jsonl) -> tables, a summary against the targets, and
reports/bench.md with figures. Reads results only, through results.load_records.

The latest row of each (kind, point configuration, device) counts (results.latest_points). Points
are laid out as one table per (kind, table configuration, device), and each table says which
sessions its points come from. Values derived from several points (a MoE's ratio to its baselines)
are computed from the rows of one session. The table functions return (title, columns, rows) of
strings, so that the CLI (Rich) and the markdown print the same numbers. A report is of one device
(a CPU of any thread count, or one GPU model): rows of several are refused unless --device picks one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moebench.fmt import length, per_s
from moebench.paths import LOCAL_REPORTS, LOCAL_RESULTS
from moebench.report.figures import BENCH_FIGURES, figure_stem
from moebench.report.rows import no_rows, on_device, one_device, rows_file
from moebench.results import BENCH_FILE, BENCH_KINDS, latest_points, load_records, table_key


@dataclass
class BenchTable:
    kind: str
    device: str
    key: tuple             # the table configuration (results.TABLE_KEYS)
    rows: list[dict]       # the latest row of each point, in the newest session's order
    sessions: list[str]    # the sessions the rows come from, newest first


def group_tables(rows: list[dict]) -> list[BenchTable]:
    """The latest row of each point, one table per (kind, table configuration, device): ordered by
    kind, then newest first."""
    groups: dict[tuple, list[dict]] = {}
    for row in latest_points(rows):
        groups.setdefault((row["kind"], row["device"], table_key(row)), []).append(row)
    tables = [BenchTable(kind, device, key, rs, sorted({r["session"] for r in rs}, reverse=True))
              for (kind, device, key), rs in groups.items()]
    tables.sort(key=lambda t: max(r["created"] for r in t.rows), reverse=True)
    return sorted(tables, key=lambda t: BENCH_KINDS.index(t.kind))


def by_session(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["session"], []).append(r)
    return out


def session_label(row: dict) -> str:
    e = row.get("env") or {}
    sha = (e.get("git_sha") or "?")[:8] + ("+dirty" if e.get("git_dirty") else "")
    return (f"{row['created'][:16].replace('T', ' ')} UTC · git {sha} · torch {e.get('torch')} · "
            f"mamba-ssm {e.get('mamba_ssm')} · session {row['session']}")


def sessions_lines(t: BenchTable) -> list[str]:
    """One line per session the table's points come from (numbered as the table's session column
    when there are several), and a warning when their versions differ."""
    first: dict[str, dict] = {}
    for r in t.rows:
        first.setdefault(r["session"], r)
    many = len(t.sessions) > 1
    count = {s: sum(r["session"] == s for r in t.rows) for s in t.sessions}
    lines = [f"{f'[{i}] ' if many else ''}{session_label(first[s])} ({count[s]} point{'s' * (count[s] > 1)})"
             for i, s in enumerate(t.sessions, 1)]
    for key in ("torch", "mamba_ssm"):
        values = sorted({str((first[s].get("env") or {}).get(key)) for s in t.sessions})
        if len(values) > 1:
            lines.append(f"warning: the sessions differ in {key} ({', '.join(values)}); compare points of one session")
    return lines


# ---- formatting ---------------------------------------------------------------------------------


def _f(x, spec: str = ".3g", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _ratio(x, target: float | None = None, at_least: bool = True) -> str:
    if x is None:
        return "-"
    s = f"{x:.2f}x"
    if target is not None:
        s += " ✓" if (x >= target if at_least else x <= target) else " ✗"
    return s


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")   # noqa: E731
    lines = ["| " + " | ".join(map(esc, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


# ---- values derived from the rows of one session ------------------------------------------------


def train_ratios(row: dict, sessions: dict[str, list[dict]]) -> dict[str, float | None]:
    """A MoE variant's tokens/s over its baselines' measured in the same session: vs_dense_equivalent,
    vs_loop (None where either ran out of memory; no key where the baseline was not measured)."""
    r = row["result"]
    if r.get("baseline"):
        return {}
    names = {"dense-equivalent": "vs_dense_equivalent", "loop": "vs_loop"}
    out = {}
    for b in sessions.get(row["session"], []):
        br = b["result"]
        if b["kind"] == row["kind"] and br.get("of") == r["variant"] and br.get("baseline") in names:
            ok = r["status"] == "ok" and br["status"] == "ok"
            out[names[br["baseline"]]] = r["tokens_per_s"] / br["tokens_per_s"] if ok else None
    return out


def moe_ratios(session_rows: list[dict]) -> dict[str, float]:
    """Ratios of fwd+bwd times between the paths of one bench-moe session (and of their GPU kernels)."""
    ms = {r["result"]["name"]: r["result"]["fwd_bwd_ms"]["median"] for r in session_rows
          if r["kind"] == "bench-moe" and r["result"]["status"] == "ok"}
    kern = {r["result"]["name"]: r["result"]["kernel_ms_fwd_bwd"] for r in session_rows
            if r["kind"] == "bench-moe" and r["result"].get("kernel_ms_fwd_bwd")}
    pairs = {"grouped_over_dense": (ms, "grouped", "dense"), "loop_over_grouped": (ms, "loop", "grouped"),
             "grouped_over_gemm_only": (ms, "grouped", "grouped_gemm_only"),
             "grouped_over_dense_kernels": (kern, "grouped", "dense")}
    return {k: d[a] / d[b] for k, (d, a, b) in pairs.items() if a in d and b in d}


# ---- one table per kind: (title, columns, rows, the sessions of each row) -----------------------


def _train_table(rows, sessions):
    c = rows[0]["config"]
    title = (f"training steps: batch {c['batch']} × ctx {c['ctx']}, {c['dtype']}, "
             f"{'compiled' if c['compile'] else 'eager'}, AdamW step: {c.get('adamw')}")
    cols = ["variant", "impl (mixer/moe)", "step ms", "tok/s", "TFLOP/s", "MFU", "peak GiB",
            "vs dense-eq (≥0.9)", "vs loop (≥4)"]
    body = []
    for row in rows:
        r, ratios = row["result"], train_ratios(row, sessions)
        if r["status"] != "ok":
            body.append([r["variant"], "-", r["status"].upper(), "-", "-", "-", "-", "-", "-"])
            continue
        im = r["impl"]
        body.append([r["variant"], f"{im['mixer']}/{im['moe'] or '-'}", _f(r["step_s"]["median"] * 1e3, ".1f"),
                     per_s(r["tokens_per_s"]), _f(r["tflops"], ".1f"),
                     _f(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""), _f(r["peak_mem_gib"], ".1f"),
                     _ratio(ratios.get("vs_dense_equivalent"), 0.9), _ratio(ratios.get("vs_loop"), 4.0)])
    return title, cols, body, [[r["session"]] for r in rows]


def _moe_table(rows, sessions):
    c = rows[0]["config"]
    title = (f"one MoE layer: T={c['tokens']}, d={c['d']}, expert {c['hidden']}, E={c['experts']}, "
             f"top-{c['top_k']}, cf={c['capacity_factor']}, {c['dtype']}")
    cols = ["path", "what", "fwd ms", "fwd+bwd ms", "fwd+bwd kernels ms", "TFLOP/s", "dropped"]
    body = []
    for r in (row["result"] for row in rows):
        if r["status"] != "ok":
            body.append([r["name"], r.get("what", ""), r["status"].upper(), "-", "-", "-", "-"])
            continue
        body.append([r["name"], r.get("what", ""), _f(r["fwd_ms"]["median"], ".3f"), _f(r["fwd_bwd_ms"]["median"], ".3f"),
                     _f(r.get("kernel_ms_fwd_bwd"), ".3f"), _f(r["tflops_fwd_bwd"], ".1f"),
                     _f(r.get("dropped_frac"), ".1%")])
    return title, cols, body, [[r["session"]] for r in rows]


def _memory_table(rows, sessions):
    c = rows[0]["config"]
    title = f"peak memory (GiB) / time (ms) against length, batch {c['batch']}, {c['dtype']}"
    lengths = sorted({r["result"]["length"] for r in rows})
    cells: dict[tuple, dict] = {}
    for row in rows:
        r = row["result"]
        cells.setdefault((r["variant"], r["mode"]), {})[r["length"]] = row
    body, row_sessions = [], []
    for (variant, mode), by_len in cells.items():
        line = [variant, mode]
        for n in lengths:
            r = by_len[n]["result"] if n in by_len else None
            if r is None:
                line.append("")
            elif r["status"] != "ok":
                line.append("OOM")
            else:
                line.append(f"{_f(r['peak_mem_gib'], '.2f', '?')} / {r['time_s']['median'] * 1e3:.0f}")
        body.append(line)
        row_sessions.append(sorted({x["session"] for x in by_len.values()}, reverse=True))
    return title, ["variant", "mode"] + [length(n) for n in lengths], body, row_sessions


def _generate_table(rows, sessions):
    c = rows[0]["config"]
    used = {(r["result"].get("bandwidth") or {}).get("used_bytes_s") for r in rows} - {None}
    src = next(((r["result"].get("bandwidth") or {}).get("source") for r in rows if used), None)
    bound = (f"KV bound = K+V bytes per step ÷ {used.pop() / 1e12:.2f} TB/s, {src}" if len(used) == 1 else
             "KV bound = K+V bytes per step ÷ each session's bandwidth" if used else "no bandwidth for a KV bound")
    title = (f"generation: batch {c['batch']}, {c['gen_len']} new tokens, {c['dtype']}, "
             f"CUDA graph={c['cuda_graph']}; {bound}")
    cols = ["variant", "prompt", "prefill s", "prefill peak GiB", "prompt logits GiB", "decode tok/s",
            "ms/step", "state GiB", "KV bound ms", "÷ bound (≤2)", "decode peak GiB"]
    body = []
    for r in (row["result"] for row in rows):
        if r["status"] != "ok":
            body.append([r["variant"], length(r["prompt_len"]), r["status"].upper()] + ["-"] * 8)
            continue
        body.append([r["variant"], length(r["prompt_len"]), _f(r["prefill_s"], ".3f"),
                     _f(r["prefill_peak_gib"], ".2f"), _f(r["prompt_logits_gib"], ".1f"),
                     per_s(r["decode_tokens_per_s"]), _f(r["ms_per_step"], ".3f"), _f(r["state_gib"], ".4f"),
                     _f(r.get("kv_bound_ms"), ".3f"),
                     _ratio(r.get("ratio_to_kv_bound"), 2.0, at_least=False) if "kv_bound_ms" in r else "-",
                     _f(r["decode_peak_gib"], ".2f")])
    return title, cols, body, [[r["session"]] for r in rows]


def _multi_gpu_table(rows, sessions):
    """scripts/gpu_multi.sh: the same steps on 1 and N GPUs (DDP), same global and micro batch."""
    c = rows[0]["config"]
    n, k = c["n_gpus"], str(c["n_gpus"])
    title = f"data parallel: 1 vs {n} GPUs ({c.get('parallelism', 'DDP')}), same global and micro batch"
    cols = ["variant", "lr", "steps", "tok/s 1 GPU", f"tok/s {n} GPUs", "per GPU", "scaling eff.",
            f"max |Δ loss| 1 vs {n}", "max |Δ loss| 1 vs 1 (repeat)", f"val loss 1 / {n}", "peak GiB (rank 0)"]
    body = []
    for r in (row["result"] for row in rows):
        if r["status"] != "ok":
            body.append([r["variant"], *["-"] * 9, r["status"].upper()])
            continue
        t, val, mem = r["tokens_per_s"], r["final_val_loss"], r["peak_mem_gib_rank0"]
        lr = r["train_config"][0].get("lr") if r.get("train_config") else None
        eff = r["scaling_efficiency"]
        body.append([r["variant"], _f(lr, ".0e"), str(r["steps"]), per_s(t["1"]), per_s(t[k]),
                     per_s(r["tokens_per_s_per_gpu"][k]), _f(eff and 100 * eff, ".0f") + "%",
                     _f(r["max_abs_loss_diff"], ".3f"), _f(r.get("repeat_1gpu_max_abs_loss_diff"), ".3f"),
                     f"{_f(val['1'], '.4f')} / {_f(val[k], '.4f')}", f"{_f(mem['1'], '.1f')} / {_f(mem[k], '.1f')}"])
    return title, cols, body, [[r["session"]] for r in rows]


TABLES = {"bench-train": _train_table, "bench-moe": _moe_table, "bench-memory": _memory_table,
          "bench-generate": _generate_table, "bench-multi-gpu": _multi_gpu_table}


def table(t: BenchTable, sessions: dict[str, list[dict]]) -> tuple[str, list[str], list[list[str]]]:
    """(title, columns, rows) of one table; a last column numbers each row's session when the points
    come from several (as in sessions_lines)."""
    title, cols, body, row_sessions = TABLES[t.kind](t.rows, sessions)
    if len(t.sessions) > 1:
        cols = cols + ["session"]
        body = [line + [" ".join(f"[{t.sessions.index(s) + 1}]" for s in ss)] for line, ss in zip(body, row_sessions)]
    return title, cols, body


def table_notes(t: BenchTable, sessions: dict[str, list[dict]]) -> list[str]:
    """Lines under a table: the ratios between a bench-moe session's paths."""
    if t.kind != "bench-moe":
        return []
    many = len(t.sessions) > 1
    notes = []
    for i, s in enumerate(t.sessions, 1):
        ratios = moe_ratios([r for r in sessions[s] if table_key(r) == t.key and r["device"] == t.device])
        if ratios:
            notes.append(f"ratios{f' [{i}]' if many else ''}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    return notes


# ---- summary against the targets ----------------------------------------------------------------


def _newest(tables: list[BenchTable], kind: str, setting=None) -> dict:
    """The newest table of a kind per value of `setting` (a function of the config), e.g. eager and compiled."""
    out: dict = {}
    for t in tables:                                    # newest first within a kind
        if t.kind == kind:
            out.setdefault(setting(t.rows[0]["config"]) if setting else None, t)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def summary_rows(tables: list[BenchTable], sessions: dict[str, list[dict]]) -> list[list[str]]:
    """[check, value, target, ok] for the headline numbers of the newest table of each kind (of each
    compile / CUDA-graph setting), and every data-parallel point: a few dozen lines at most."""
    rows = []

    def add(check, value, target="", ok=None):
        rows.append([check, value, target, "-" if ok is None else ("✓" if ok else "✗")])

    for compiled, t in _newest(tables, "bench-train", lambda c: bool(c["compile"])).items():
        tag = "compiled" if compiled else "eager"
        for row in t.rows:
            r = row["result"]
            if r.get("baseline") and r["status"] == "ok":
                continue
            if r["status"] != "ok":
                add(f"train {tag} {r['variant']}", r["status"].upper())
                continue
            mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
            e32 = "e32" in r["variant"] and "MoE-Mamba" in r["variant"]
            add(f"train {tag} {r['variant']}", f"{per_s(r['tokens_per_s'])} tok/s{mfu}", "≥ 400k on H100" if e32 else "",
                r["tokens_per_s"] >= 4e5 if e32 else None)
            for key, v in train_ratios(row, sessions).items():
                target = {"vs_dense_equivalent": 0.9, "vs_loop": 4.0}[key]
                add(f"↳ {r['variant']} {key.replace('_', ' ')}", _ratio(v), f"≥ {target}", None if v is None else v >= target)
    for t in _newest(tables, "bench-moe").values():
        ms = {r["name"]: r["fwd_bwd_ms"]["median"] for r in (x["result"] for x in t.rows) if r["status"] == "ok"}
        add("MoE layer fwd+bwd (ms)", ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        kern = {r["name"]: r["kernel_ms_fwd_bwd"] for r in (x["result"] for x in t.rows) if r.get("kernel_ms_fwd_bwd")}
        if kern:
            add("↳ of which GPU kernels (ms)", ", ".join(f"{k} {v:.2f}" for k, v in kern.items()))
    for t in _newest(tables, "bench-memory").values():
        res = [x["result"] for x in t.rows]
        for mode in dict.fromkeys(r["mode"] for r in res):
            best: dict[str, int] = {}
            for r in res:
                if r["mode"] == mode and r["status"] == "ok":
                    best[r["variant"]] = max(best.get(r["variant"], 0), r["length"])
            add(f"memory {mode}: longest length without OOM",
                ", ".join(f"{v} {length(n)}" for v, n in best.items()) or "none")
    for graph, t in _newest(tables, "bench-generate", lambda c: bool(c["cuda_graph"])).items():
        _decode_summary(add, "graph" if graph else "eager", [x["result"] for x in t.rows if x["result"]["status"] == "ok"])
    for t in (t for t in tables if t.kind == "bench-multi-gpu"):
        n = t.rows[0]["config"]["n_gpus"]
        for r in (x["result"] for x in t.rows if x["result"]["status"] == "ok"):
            lr = r["train_config"][0].get("lr") if r.get("train_config") else None
            add(f"{n} GPUs {r['variant']} (lr {_f(lr, '.0e')})",
                f"{per_s(r['tokens_per_s'][str(n)])} tok/s, scaling {100 * r['scaling_efficiency']:.0f}%, "
                f"val loss {_f(r['final_val_loss']['1'], '.3f')} (1 GPU) vs {_f(r['final_val_loss'][str(n)], '.3f')}")
    return rows


def _decode_summary(add, tag: str, res: list[dict]) -> None:
    if not res:
        return
    top = max(r["prompt_len"] for r in res)
    at = {r["variant"]: r for r in res if r["prompt_len"] == top}
    for v, r in at.items():
        value = f"{per_s(r['decode_tokens_per_s'])} tok/s, {r['ms_per_step']:.2f} ms/step"
        bound = r.get("ratio_to_kv_bound")
        if bound is not None:
            value += f", {bound:.2f}x KV bound"
        tmoe = v.startswith("Transformer-MoE") and bound is not None
        add(f"decode {tag} {v} @ {length(top)}", value, "≤ 2x KV bound" if tmoe else "", bound <= 2 if tmoe else None)
    mm = next((r for v, r in at.items() if v.startswith("MoE-Mamba")), None)
    tm = next((r for v, r in at.items() if v.startswith("Transformer-MoE")), None)
    if mm and tm:
        x = mm["decode_tokens_per_s"] / tm["decode_tokens_per_s"]
        add(f"↳ decode {tag} MoE-Mamba ÷ Transformer-MoE @ {length(top)}", _ratio(x), "≥ 10", x >= 10)
    peaks = [(r["prefill_peak_gib"] / r["prompt_logits_gib"], r) for r in at.values() if r["prefill_peak_gib"]]
    if peaks:
        frac, r = max(peaks, key=lambda p: p[0])
        add(f"↳ prefill {tag} peak memory ÷ prompt logits @ {length(top)}",
            f"{frac:.1%} (worst: {r['variant']}, {r['prefill_peak_gib']:.1f} of {r['prompt_logits_gib']:.0f} GiB)",
            "far below 1", frac < 0.5)
    mamba = list(dict.fromkeys(r["variant"] for r in res if r["mixer"] == "mamba"))
    if mamba:
        constant = all(len({r["state_bytes"] for r in res if r["variant"] == v}) == 1 for v in mamba)
        sizes = ", ".join(f"{v} {next(r['state_bytes'] for r in res if r['variant'] == v) / 2**20:.1f} MiB" for v in mamba)
        add(f"↳ decode {tag} Mamba state against context", sizes, "constant", constant)


# ---- the report ---------------------------------------------------------------------------------


def render_bench_report(results: str | Path = LOCAL_RESULTS, out_dir: str | Path = LOCAL_REPORTS, plots: bool = True,
                        device: str | None = None) -> Path:
    """OUT_DIR/bench.md (+ bench_*.png figures, named by what they show) from RESULTS/bench.jsonl, of
    one device (`device` chooses when the rows have several). Figures of earlier renders that no
    table shows any more are removed: every bench_*.png left in out_dir is linked from bench.md.
    `results` is the results folder, or a bench.jsonl file."""
    src = rows_file(results, BENCH_FILE)
    all_rows = [r for r in load_records(src) if r.get("kind") in BENCH_KINDS]
    rows = on_device(all_rows, device, src)
    if not rows:
        raise no_rows(f"no benchmark rows in {src}: run `moebench bench train|moe|memory|generate` first", src)
    one_device(rows, "the benchmark rows", src)
    sessions = by_session(rows)
    tables = group_tables(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    of = f" (those on a device matching '{device}', of {len(all_rows)})" if len(rows) < len(all_rows) else ""
    lines = ["# moebench benchmarks", "",
             f"Generated by `moebench report bench` from {len(rows)} row(s){of} of {len(sessions)} session(s) in "
             f"`{src}`: the latest row of each point counts. Do not edit by hand.", "",
             "## Summary (the newest table of each kind)", "",
             markdown_table(["check", "value", "target", "ok"], summary_rows(tables, sessions)), ""]
    written: set[str] = set()
    for t in tables:
        title, cols, body = table(t, sessions)
        lines += [f"## {title}", "", f"*{t.kind} on {t.device}*", ""]
        lines += [f"- {s}" for s in sessions_lines(t)] + ["", markdown_table(cols, body), ""]
        lines += [note + "\n" for note in table_notes(t, sessions)]
        if plots and t.kind in BENCH_FIGURES:
            peers = [p.key for p in tables if p.kind == t.kind and p.device == t.device]
            name = figure_stem(t.kind, t.key, t.device, peers) + ".png"
            assert name not in written, f"two tables would draw {name}"
            if BENCH_FIGURES[t.kind](t.rows, out / name):
                written.add(name)
                lines += [f"![{t.kind}]({name})", ""]
    if plots:
        for stale in out.glob("bench_*.png"):
            if stale.name not in written:
                stale.unlink()
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path
