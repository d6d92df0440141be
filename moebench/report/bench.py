"""Benchmark records (results/bench/*.json) -> tables, a summary against the targets, and
reports/bench.md with PNGs. Reads results only; pandas-free, matplotlib only for the plots.

The table functions return (title, columns, rows) of strings, so that the CLI (Rich) and the
markdown report print the same numbers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

KINDS = ("bench-train", "bench-moe", "bench-memory", "bench-generate", "bench-multi-gpu")


# ---- loading ------------------------------------------------------------------------------------


def load_bench_records(results_dir: str | Path) -> list[dict]:
    """Every bench record (*.json with a 'kind' of bench-*) under results_dir, oldest first."""
    root = Path(results_dir)
    paths = [root] if root.is_file() else sorted(root.rglob("*.json")) if root.exists() else []
    records = []
    for p in paths:
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("kind") in KINDS:
            rec["_path"] = str(p)
            records.append(rec)
    return sorted(records, key=lambda r: (r.get("created") or "", r["_path"]))


# ---- formatting ---------------------------------------------------------------------------------


def _f(x, spec: str = ".3g", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _tok(x) -> str:
    if x is None:
        return "-"
    return f"{x / 1e3:,.1f}k" if x < 1e6 else f"{x / 1e6:,.2f}M"


def _ratio(x, target: float | None = None, at_least: bool = True) -> str:
    if x is None:
        return "-"
    s = f"{x:.2f}x"
    if target is not None:
        s += " ✓" if (x >= target if at_least else x <= target) else " ✗"
    return s


def _length(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def header(rec: dict) -> str:
    e = rec.get("env", {})
    sha = (e.get("git_sha") or "?")[:8] + ("+dirty" if e.get("git_dirty") else "")
    done = "" if rec.get("complete", True) else " — INCOMPLETE (interrupted)"
    return (f"{rec['kind']} on {rec.get('device')} · torch {e.get('torch')} · mamba-ssm {e.get('mamba_ssm')} · "
            f"git {sha} · {rec.get('created')}{done}")


def table(rec: dict) -> tuple[str, list[str], list[list[str]]]:
    return {"bench-train": _train_table, "bench-moe": _moe_table, "bench-memory": _memory_table,
            "bench-generate": _generate_table, "bench-multi-gpu": _multi_gpu_table}[rec["kind"]](rec)


def _multi_gpu_table(rec):
    """scripts/gpu_multi.sh: the same steps on 1 and N GPUs (DDP), same global and micro batch."""
    n = rec["config"]["n_gpus"]
    title = f"data parallel: 1 vs {n} GPUs ({rec['config'].get('parallelism', 'DDP')}), same global and micro batch"
    cols = ["variant", "lr", "steps", "tok/s 1 GPU", f"tok/s {n} GPUs", "per GPU", "scaling eff.",
            f"max |Δ loss| 1 vs {n}", "max |Δ loss| 1 vs 1 (repeat)", f"val loss 1 / {n}", "peak GiB (rank 0)"]
    rows = []
    for r in rec["results"]:
        if r["status"] != "ok":
            rows.append([r["variant"], *["-"] * 9, r["status"].upper()])
            continue
        t, k = r["tokens_per_s"], str(n)
        val, mem = r["final_val_loss"], r["peak_mem_gib_rank0"]
        lr = r["train_config"][0].get("lr") if r.get("train_config") else None
        rows.append([r["variant"], _f(lr, ".0e"), str(r["steps"]), _tok(t["1"]), _tok(t[k]),
                     _tok(r["tokens_per_s_per_gpu"][k]), _f(r["scaling_efficiency"] and 100 * r["scaling_efficiency"], ".0f") + "%",
                     _f(r["max_abs_loss_diff"], ".3f"), _f(r.get("repeat_1gpu_max_abs_loss_diff"), ".3f"),
                     f"{_f(val['1'], '.4f')} / {_f(val[k], '.4f')}", f"{_f(mem['1'], '.1f')} / {_f(mem[k], '.1f')}"])
    return title, cols, rows


def _train_table(rec):
    c = rec["config"]
    title = (f"training steps: batch {c['batch']} × ctx {c['ctx']}, {c['dtype']}, compile={c['compile']}, "
             f"median of {c['steps']} after {c['warmup']} warm-up")
    cols = ["variant", "impl (mixer/moe)", "step ms", "tok/s", "TFLOP/s", "MFU", "peak GiB",
            "vs dense-eq (≥0.9)", "vs loop (≥4)"]
    rows = []
    for r in rec["results"]:
        if r["status"] != "ok":
            rows.append([r["variant"], "-", r["status"].upper(), "-", "-", "-", "-", "-", "-"])
            continue
        im = r["impl"]
        ratios = r.get("ratios", {})
        rows.append([r["variant"], f"{im['mixer']}/{im['moe'] or '-'}", _f(r["step_s"]["median"] * 1e3, ".1f"),
                     _tok(r["tokens_per_s"]), _f(r["tflops"], ".1f"), _f(r["mfu"] and 100 * r["mfu"], ".1f") +
                     ("%" if r["mfu"] else ""), _f(r["peak_mem_gib"], ".1f"),
                     _ratio(ratios.get("vs_dense_equivalent"), 0.9), _ratio(ratios.get("vs_loop"), 4.0)])
    return title, cols, rows


def _moe_table(rec):
    c = rec["config"]
    title = (f"one MoE layer: T={c['tokens']}, d={c['d']}, expert {c['hidden']}, E={c['experts']}, "
             f"top-{c['top_k']}, cf={c['capacity_factor']}, {c['dtype']}")
    cols = ["path", "what", "fwd ms", "fwd+bwd ms", "fwd+bwd kernels ms", "TFLOP/s", "dropped"]
    rows = []
    for r in rec["results"]:
        if r["status"] != "ok":
            rows.append([r["name"], r.get("what", ""), r["status"].upper(), "-", "-", "-", "-"])
            continue
        rows.append([r["name"], r.get("what", ""), _f(r["fwd_ms"]["median"], ".3f"),
                     _f(r["fwd_bwd_ms"]["median"], ".3f"), _f(r.get("kernel_ms_fwd_bwd"), ".3f"),
                     _f(r["tflops_fwd_bwd"], ".1f"), _f(r.get("dropped_frac"), ".1%")])
    return title, cols, rows


def _memory_table(rec):
    c = rec["config"]
    title = f"peak memory (GiB) / time (ms) against length, batch {c['batch']}, {c['dtype']}"
    lengths = c["lengths"]
    cols = ["variant", "mode"] + [_length(n) for n in lengths]
    cells: dict[tuple, dict] = {}
    for r in rec["results"]:
        cells.setdefault((r["variant"], r["mode"]), {})[r["length"]] = r
    rows = []
    for (variant, mode), by_len in cells.items():
        row = [variant, mode]
        for n in lengths:
            r = by_len.get(n)
            if r is None:
                row.append("")
            elif r["status"] != "ok":
                row.append("OOM")
            else:
                mem = _f(r["peak_mem_gib"], ".2f", "?")
                row.append(f"{mem} / {r['time_s']['median'] * 1e3:.0f}")
        rows.append(row)
    return title, cols, rows


def _generate_table(rec):
    c = rec["config"]
    bw = rec.get("bandwidth", {})
    src = (f"KV bound = K+V bytes per step ÷ {bw['used_bytes_s'] / 1e12:.2f} TB/s, {bw['source']}"
           if bw.get("used_bytes_s") else "no bandwidth for a KV bound")
    title = (f"generation: batch {c['batch']}, {c['gen_len']} new tokens, {c['dtype']}, "
             f"CUDA graph={c['cuda_graph']}; {src}")
    cols = ["variant", "prompt", "prefill s", "prefill peak GiB", "prompt logits GiB", "decode tok/s",
            "ms/step", "state GiB", "KV bound ms", "÷ bound (≤2)", "decode peak GiB"]
    rows = []
    for r in rec["results"]:
        if r["status"] != "ok":
            rows.append([r["variant"], _length(r["prompt_len"]), r["status"].upper()] + ["-"] * 8)
            continue
        rows.append([r["variant"], _length(r["prompt_len"]), _f(r["prefill_s"], ".3f"),
                     _f(r["prefill_peak_gib"], ".2f"), _f(r["prompt_logits_gib"], ".1f"),
                     _tok(r["decode_tokens_per_s"]), _f(r["ms_per_step"], ".3f"), _f(r["state_gib"], ".4f"),
                     _f(r.get("kv_bound_ms"), ".3f"),
                     _ratio(r.get("ratio_to_kv_bound"), 2.0, at_least=False) if "kv_bound_ms" in r else "-",
                     _f(r["decode_peak_gib"], ".2f")])
    return title, cols, rows


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")   # noqa: E731
    lines = ["| " + " | ".join(map(esc, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


# ---- summary against the issue's targets --------------------------------------------------------


def summary_rows(records: list[dict]) -> list[list[str]]:
    """[check, value, target, ok] for the headline numbers of the latest record of each kind
    (of each CUDA-graph setting for generation): a dozen lines or so."""
    latest: dict[str, dict] = {}
    gen: dict[bool, dict] = {}
    trains: dict[bool, dict] = {}
    for rec in records:
        latest[rec["kind"]] = rec
        if rec["kind"] == "bench-generate":
            gen[bool(rec["config"]["cuda_graph"])] = rec
        if rec["kind"] == "bench-train":
            trains[bool(rec["config"]["compile"])] = rec
    rows = []

    def add(check, value, target="", ok=None):
        rows.append([check, value, target, "-" if ok is None else ("✓" if ok else "✗")])

    for compiled, rec in sorted(trains.items()):
        tag = "compiled" if compiled else "eager"
        for r in rec["results"]:
            if r.get("baseline") and r["status"] == "ok":
                continue
            if r["status"] != "ok":
                add(f"train {tag} {r['variant']}", r["status"].upper())
                continue
            mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
            e32 = "e32" in r["variant"] and "MoE-Mamba" in r["variant"]
            add(f"train {tag} {r['variant']}", f"{_tok(r['tokens_per_s'])} tok/s{mfu}", "≥ 400k on H100" if e32 else "",
                r["tokens_per_s"] >= 4e5 if e32 else None)
            for key, target in (("vs_dense_equivalent", 0.9), ("vs_loop", 4.0)):
                v = r.get("ratios", {}).get(key)
                if v is not None:
                    add(f"↳ {r['variant']} {key.replace('_', ' ')}", _ratio(v), f"≥ {target}", v >= target)
    if "bench-moe" in latest:
        ms = {r["name"]: r["fwd_bwd_ms"]["median"] for r in latest["bench-moe"]["results"] if r["status"] == "ok"}
        add("MoE layer fwd+bwd (ms)", ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        kern = {r["name"]: r["kernel_ms_fwd_bwd"] for r in latest["bench-moe"]["results"] if r.get("kernel_ms_fwd_bwd")}
        if kern:
            add("↳ of which GPU kernels (ms)", ", ".join(f"{k} {v:.2f}" for k, v in kern.items()))
    if "bench-memory" in latest:
        res = latest["bench-memory"]["results"]
        for mode in dict.fromkeys(r["mode"] for r in res):
            best = {}
            for r in res:
                if r["mode"] == mode and r["status"] == "ok":
                    best[r["variant"]] = max(best.get(r["variant"], 0), r["length"])
            add(f"memory {mode}: longest length without OOM",
                ", ".join(f"{v} {_length(n)}" for v, n in best.items()) or "none")
    for graph, rec in sorted(gen.items()):
        tag = "graph" if graph else "eager"
        res = [r for r in rec["results"] if r["status"] == "ok"]
        if not res:
            continue
        top = max(r["prompt_len"] for r in res)
        at = {r["variant"]: r for r in res if r["prompt_len"] == top}
        for v, r in at.items():
            value = f"{_tok(r['decode_tokens_per_s'])} tok/s, {r['ms_per_step']:.2f} ms/step"
            bound = r.get("ratio_to_kv_bound")
            if bound is not None:
                value += f", {bound:.2f}x KV bound"
            tmoe = v.startswith("Transformer-MoE") and bound is not None
            add(f"decode {tag} {v} @ {_length(top)}", value, "≤ 2x KV bound" if tmoe else "",
                bound <= 2 if tmoe else None)
        mm = next((r for v, r in at.items() if v.startswith("MoE-Mamba")), None)
        tm = next((r for v, r in at.items() if v.startswith("Transformer-MoE")), None)
        if mm and tm:
            x = mm["decode_tokens_per_s"] / tm["decode_tokens_per_s"]
            add(f"↳ decode {tag} MoE-Mamba ÷ Transformer-MoE @ {_length(top)}", _ratio(x), "≥ 10", x >= 10)
        peaks = [(r["prefill_peak_gib"] / r["prompt_logits_gib"], r) for r in at.values() if r["prefill_peak_gib"]]
        if peaks:
            frac, r = max(peaks, key=lambda p: p[0])
            add(f"↳ prefill {tag} peak memory ÷ prompt logits @ {_length(top)}",
                f"{frac:.1%} (worst: {r['variant']}, {r['prefill_peak_gib']:.1f} of {r['prompt_logits_gib']:.0f} GiB)",
                "far below 1", frac < 0.5)
        mamba = list(dict.fromkeys(r["variant"] for r in res if r["mixer"] == "mamba"))
        if mamba:
            constant = all(len({r["state_bytes"] for r in res if r["variant"] == v}) == 1 for v in mamba)
            sizes = ", ".join(f"{v} {next(r['state_bytes'] for r in res if r['variant'] == v) / 2**20:.1f} MiB"
                              for v in mamba)
            add(f"↳ decode {tag} Mamba state against context", sizes, "constant", constant)
    for rec in (r for r in records if r["kind"] == "bench-multi-gpu"):
        n = rec["config"]["n_gpus"]
        for r in rec["results"]:
            if r["status"] == "ok":
                lr = r["train_config"][0].get("lr") if r.get("train_config") else None
                add(f"{n} GPUs {r['variant']} (lr {_f(lr, '.0e')})",
                    f"{_tok(r['tokens_per_s'][str(n)])} tok/s, scaling {100 * r['scaling_efficiency']:.0f}%, "
                    f"val loss {_f(r['final_val_loss']['1'], '.3f')} (1 GPU) vs {_f(r['final_val_loss'][str(n)], '.3f')}")
    return rows


def summary_markdown(records: list[dict]) -> str:
    rows = summary_rows(records)
    return markdown_table(["check", "value", "target", "ok"], rows) if rows else "(no benchmark records)"


# ---- plots --------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _guides(ax, xs, y0, label_prefix=""):
    """Dotted slope-1 (linear) and slope-2 (quadratic) lines through (xs[0], y0) on log-log axes."""
    x0 = xs[0]
    ax.plot(xs, [y0 * x / x0 for x in xs], ":", color="gray", lw=1, label=f"{label_prefix}∝ L (linear)")
    ax.plot(xs, [y0 * (x / x0) ** 2 for x in xs], "--", color="gray", lw=1, label=f"{label_prefix}∝ L² (quadratic)")


def plot_memory(rec: dict, out_dir: Path, stem: str = "bench_memory") -> list[Path]:
    """Log-log: peak memory above the weights, and time, against length; one colour per variant,
    solid = training, dashed = prefill; dotted/dashed gray guides of slope 1 and 2."""
    plt = _plt()
    res = rec["results"]
    lengths = sorted({r["length"] for r in res})
    variants = list(dict.fromkeys(r["variant"] for r in res))
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], lambda r: r["peak_mem_gib"] - (r.get("static_mem_gib") or 0)
               if r.get("peak_mem_gib") is not None else None, "peak memory above the weights (GiB)"),
              (axes[1], lambda r: r["time_s"]["median"], "time per pass (s)"))
    for ax, value, ylabel in panels:
        first = None
        for (variant, mode) in dict.fromkeys((r["variant"], r["mode"]) for r in res):
            pts = [r for r in res if r["variant"] == variant and r["mode"] == mode]
            ok = [(r["length"], value(r)) for r in pts if r["status"] == "ok"]
            ok = [(x, y) for x, y in ok if y is not None and y > 0]
            if not ok:
                continue
            xs, ys = zip(*ok)
            ax.plot(xs, ys, "-o" if mode == "train" else "--s", ms=3, color=colours[variant], label=f"{variant} {mode}")
            oom = [r["length"] for r in pts if r["status"] != "ok"]
            if oom:
                ax.plot([min(oom)], [ys[-1]], "x", color=colours[variant], ms=10, mew=2)
            first = first or ys[0]
        if first:
            _guides(ax, lengths, first)
        _log_length_axes(ax, lengths, f"sequence length (batch {rec['config']['batch']})")
        ax.set_ylabel(ylabel)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("training (fwd+bwd, solid) and prefill (no grad, dashed) against length; x = out of memory",
                 fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _log_length_axes(ax, lengths: list[int], xlabel: str) -> None:
    # log-log against length: linear growth is a slope-1 line, quadratic a slope-2 line
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [_length(n) for n in lengths])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, which="both")


def plot_generate(rec: dict, out_dir: Path, stem: str = "bench_generate") -> list[Path]:
    plt = _plt()
    res = [r for r in rec["results"] if r["status"] == "ok"]
    if not res:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in res):
        pts = [r for r in res if r["variant"] == variant]
        xs = [r["prompt_len"] for r in pts]
        axes[0].plot(xs, [r["decode_tokens_per_s"] for r in pts], "-o", ms=3, label=variant)
        axes[1].plot(xs, [r["state_gib"] for r in pts], "-o", ms=3, label=f"{variant} state / KV cache")
        if "kv_bound_ms" in pts[0]:
            b = rec["config"]["batch"]
            axes[0].plot(xs, [b / (r["kv_bound_ms"] / 1e3) for r in pts], ":", color="gray", lw=1)
    axes[0].set_ylabel("decode tokens/s (dotted: KV-cache bandwidth bound)")
    axes[1].set_ylabel("decoding state (GiB)")
    lengths = sorted({r["prompt_len"] for r in res})
    for ax in axes:
        _log_length_axes(ax, lengths, "context (prompt) length")
        ax.legend(fontsize=7)
    c = rec["config"]
    fig.suptitle(f"decoding at batch {c['batch']}, CUDA graph={c['cuda_graph']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_train(rec: dict, out_dir: Path, stem: str = "bench_train") -> list[Path]:
    plt = _plt()
    res = [r for r in rec["results"] if r["status"] == "ok"]
    if not res:
        return []
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(res) + 1.5))
    names = [r["variant"] for r in res]
    ax.barh(names, [r["tokens_per_s"] / 1e3 for r in res],
            color=["tab:gray" if r.get("baseline") else "tab:blue" for r in res])
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (thousands); gray = baseline")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


PLOTS = {"bench-train": plot_train, "bench-memory": plot_memory, "bench-generate": plot_generate}


# ---- the report ---------------------------------------------------------------------------------


def _env_differences(records: list[dict]) -> list[str]:
    notes = []
    for key in ("gpu", "device_name", "torch", "mamba_ssm"):
        values = sorted({str(r.get("env", {}).get(key)) for r in records})
        if len(values) > 1:
            notes.append(f"records differ in {key}: {', '.join(values)}; compare numbers within one record")
    return notes


def render_bench_report(results_dir: str | Path = "results/bench", out_dir: str | Path = "reports",
                        plots: bool = True) -> Path:
    """reports/bench.md (+ bench_*.png) from every bench record under results_dir."""
    records = load_bench_records(results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# moebench benchmarks", "",
             f"Generated from {len(records)} record(s) under `{results_dir}` by `moebench report bench`; "
             "do not edit by hand.", ""]
    if not records:
        lines.append("No benchmark records found: run `moebench bench train|moe|memory|generate` first.")
    for note in _env_differences(records):
        lines.append(f"> **warning:** {note}")
    if records:
        lines += ["", "## Summary (latest record of each kind)", "", summary_markdown(records), ""]
    seen: dict[str, int] = {}
    for kind in KINDS:
        for rec in (r for r in records if r["kind"] == kind):
            title, cols, rows = table(rec)
            lines += [f"## {title}", "", f"*{header(rec)}* — `{Path(rec['_path']).name}`", "",
                      markdown_table(cols, rows), ""]
            if kind == "bench-moe" and rec.get("ratios"):
                lines += ["ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rec["ratios"].items()), ""]
            if plots and kind in PLOTS:
                n = seen[kind] = seen.get(kind, 0) + 1
                stem = kind.replace("-", "_") + (f"_{n}" if n > 1 else "")
                if kind == "bench-generate":
                    stem += "_graph" if rec["config"]["cuda_graph"] else "_eager"
                for p in PLOTS[kind](rec, out, stem):
                    lines += [f"![{kind}]({p.name})", ""]
    path = out / "bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m moebench.bench_report [RESULTS] [--summary]: the summary table, for scripts."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    folder = next((a for a in args if not a.startswith("--")), "results/bench")
    print(summary_markdown(load_bench_records(folder)))


if __name__ == "__main__":
    main()
