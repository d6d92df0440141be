"""The reports' figures, drawn from result rows only; matplotlib lives here. Ablations: each report's
loss curves, final losses, speedups (report/ablation.py). Benchmarks: one function per kind takes the
rows of one table and the PNG path to write, and returns the path (None when there is nothing to draw)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

# PNG files only: no display needed, the same output on a laptop and on a headless machine; chosen
# before pyplot is imported, so pyplot never looks for an interactive backend
matplotlib.use("Agg")
import matplotlib.pyplot as plt       # noqa: E402  (after the backend is chosen)

from moebench.fmt import length              # noqa: E402
from moebench.metrics import speedup_curve    # noqa: E402
from moebench.report.stats import mean_std    # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- ablations
def ablation_figures(spec, preset: str, res: dict, baseline: str, prows: dict, out: Path) -> list[Path]:
    """<out>/<ablation>_{loss,final,speedup,speedup_curve}.png from the collected results `res`
    (variant -> VariantResult) and the paper's rows `prows`."""
    name = spec.name
    present = [v for v in res.values() if v.rows]
    colors = {v.name: plt.cm.tab20(i % 20) for i, v in enumerate(res.values())}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for v in present:
        for i, (seed, (t, y)) in enumerate(sorted(v.curves.items())):
            ax.plot(t, y, color=colors[v.name], lw=1.2, label=v.name if i == 0 else None,
                    ls="--" if v.name == baseline else "-")
    ax.set_xlabel("tokens")
    ax.set_ylabel("smoothed training loss (nats)")
    ax.set_title(f"{name} ({preset}): smoothed loss")
    curves = [y for v in present for (_, y) in v.curves.values()]
    if curves:   # the first tenth of training (loss from ~10.8 nats down) would flatten the rest
        _set_ylim(ax, [min(y) for y in curves], top=max(y[len(y) // 10] for y in curves))
    ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out / f"{name}_loss.png"))

    fig = _final_loss_figure(spec, preset, res, baseline, prows, colors)
    paths.append(_save(fig, out / f"{name}_final.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    others = [v for v in present if v.name != baseline]
    means = [mean_std([s for s in v.speedups.values() if s is not None]) for v in others]
    xs = range(len(others))
    ax.bar(xs, [m or 0 for m, _ in means], yerr=[s or 0 for _, s in means], color=[colors[v.name] for v in others],
           capsize=3)
    for x, (m, _) in zip(xs, means):
        if m is None:
            ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=8)
    paper_sp = [(x, prows[v.name].speedup) for x, v in zip(xs, others) if v.name in prows and prows[v.name].speedup]
    if paper_sp:
        ax.scatter([x for x, _ in paper_sp], [s for _, s in paper_sp], marker="D", color="k", zorder=3, label="paper")
        ax.legend()
    ax.axhline(1, color="gray", lw=1, ls="--")
    ax.set_xticks(list(xs), [v.name for v in others], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"speedup over {baseline} (tokens)")
    ax.set_title(f"{name} ({preset}): speedup at the baseline's final loss")
    paths.append(_save(fig, out / f"{name}_speedup.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    base = res.get(baseline)
    drawn = False
    if base is not None and base.curves:
        first = min(base.curves)
        for v in others:
            for i, (seed, (t, y)) in enumerate(sorted(v.curves.items())):
                bt, by = base.curves.get(seed, base.curves[first])
                pts = speedup_curve(t, y, bt, by)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[v.name],
                            label=v.name if i == 0 else None)
                    drawn = True
    ax.axhline(1, color="gray", lw=1, ls="--")
    ax.set_xlabel(f"tokens {baseline} needed to reach the loss")
    ax.set_ylabel("speedup(l)")
    ax.set_title(f"{name} ({preset}): speedup over {baseline} as training goes (appendix D)")
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no curves to compare", transform=ax.transAxes, ha="center")
    paths.append(_save(fig, out / f"{name}_speedup_curve.png"))
    return paths


def _final_loss_figure(spec, preset, res, baseline, prows, colors):
    """Final loss against what the ablation varies (experts, ratio, placement; else one bar per
    variant); the paper's losses on a second axis, since only the shapes are comparable."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    present = {v.name: v for v in res.values() if v.rows}
    axis = spec.x_axis
    paper_pts: list[tuple[float, float, str]] = []         # (x, paper loss, series)
    placed: set[str] = set()                               # variants with an x position
    series_color: dict[str, object] = {}                   # our series' colours, for the paper's

    def paper(name):
        return prows[name].loss if name in prows else None

    if axis == "n_expert":
        series: dict[str, list] = {}
        for v in present.values():
            if v.cfg.ffn == "moe":
                kind = "parallel" if v.cfg.layout == "parallel" else "sequential"
                series.setdefault(kind, []).append((v.cfg.n_expert, v))
        for kind, pts in series.items():
            pts.sort(key=lambda p: p[0])
            m = [p[1].loss for p in pts]
            line = ax.errorbar([p[0] for p in pts], [a for a, _ in m], yerr=[s or 0 for _, s in m], marker="o",
                               label=f"MoE-Mamba ({kind})", capsize=3)
            series_color[kind] = line[0].get_color()
            paper_pts += [(x, paper(v.name), kind) for x, v in pts]
            placed |= {v.name for _, v in pts}
        ax.set_xscale("log", base=2)
        ticks = sorted({x for pts in series.values() for x, _ in pts})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel("experts per MoE layer")
    elif axis == "ratio":
        pts = sorted((n, v) for n, v in present.items() if "ratio" in n)
        m = [v.loss for _, v in pts]
        ax.errorbar(range(len(pts)), [a for a, _ in m], yerr=[s or 0 for _, s in m], marker="o", capsize=3,
                    label="MoE-Mamba (ratio)")
        ax.set_xticks(range(len(pts)), [n.split("ratio")[1].replace("to", ":") for n, _ in pts])
        ax.set_xlabel("active parameters Mamba : MoE")
        placed |= {n for n, _ in pts}
        if any(n in prows and prows[n].rank for n, _ in pts):
            ranks = [(i, float(prows[n].rank)) for i, (n, _) in enumerate(pts) if n in prows and prows[n].rank]
            twin = ax.twinx()
            twin.plot([i for i, _ in ranks], [r for _, r in ranks], color="gray", marker="x", ls=":",
                      label="paper's rank (figure 5)")
            twin.set_ylabel("paper's rank, 1 = best (figure 5)", color="gray")
            twin.legend(fontsize=7, loc="lower left")
    elif axis == "placement":
        groups: dict[str, dict] = {}
        for n, v in present.items():
            if v.cfg.inner_moe:
                tag = "every other layer" if v.cfg.inner_every > 1 else "all layers"
                groups.setdefault("+".join(v.cfg.inner_moe), {})[tag] = v
                placed.add(n)
        places = list(groups)
        for k, tag in enumerate(("all layers", "every other layer")):
            xs = [i + (k - 0.5) * 0.38 for i in range(len(places))]
            vals = [groups[p][tag].loss if tag in groups[p] else (None, None) for p in places]
            bars = ax.bar(xs, [a or 0 for a, _ in vals], width=0.38, yerr=[s or 0 for _, s in vals], capsize=2,
                          label=tag)
            series_color[tag] = bars.patches[0].get_facecolor() if bars.patches else "gray"
            paper_pts += [(x, paper(groups[p][tag].name), tag) for x, p in zip(xs, places) if tag in groups[p]]
        ax.set_xticks(range(len(places)), places, rotation=20, fontsize=8)
        ax.set_xlabel("projections replaced by MoE")
        _set_ylim(ax, [v.loss[0] for v in present.values()])
    else:
        names = list(present)
        m = [present[n].loss for n in names]
        ax.bar(range(len(names)), [a for a, _ in m], yerr=[s or 0 for _, s in m], capsize=3,
               color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        _set_ylim(ax, [a for a, _ in m])
        paper_pts += [(i, paper(n), "paper") for i, n in enumerate(names)]
        placed |= set(names)
    for n, v in present.items():                  # dense references: horizontal lines
        if n not in placed and v.loss[0] is not None:
            ax.axhline(v.loss[0], color=colors[n], ls="--", lw=1, label=n)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    paper_pts = [p for p in paper_pts if p[1] is not None]
    # the ratio plot's second axis holds the paper's ranks: its losses would need a third
    refs = [(n, paper(n)) for n in present if n not in placed and paper(n) is not None and axis != "ratio"]
    if paper_pts or refs:
        twin = ax.twinx()
        for kind in dict.fromkeys(k for _, _, k in paper_pts):
            pts = [(x, y) for x, y, k in paper_pts if k == kind]
            twin.plot([x for x, _ in pts], [y for _, y in pts], color=series_color.get(kind, "gray"), marker="x",
                      ls=":" if axis in ("n_expert", "ratio") else "", label="paper" if kind == "paper" else f"paper ({kind})")
        for n, y in refs:
            twin.axhline(y, color=colors[n], ls=":", lw=1, label=f"paper: {n}")
        twin.set_ylabel("paper's loss (C4)", color="gray")
        twin.legend(fontsize=7, loc="lower left")
    ax.set_ylabel("final smoothed loss (nats)")
    ax.set_title(f"{spec.name} ({preset}): final loss")
    return fig


def _set_ylim(ax, values: list[float | None], top: float | None = None):
    vals = [y for y in values if y is not None and math.isfinite(y)]
    if vals:
        lo, hi = min(vals), max(vals + ([top] if top is not None else []))
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)


# ---- benchmarks


def _slug(text) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-")



# the parts of a figure's name per kind, from the table key (results.TABLE_KEYS) and whether the part
# is always there; the others are named only where this kind's tables on one device differ in them
NAME_PARTS = {
    "bench-train": [(lambda k: "compiled" if k[0] else "eager", True), (lambda k: f"{k[1]}x{k[2]}", True),
                    (lambda k: k[3], False), (lambda k: f"mixer-{k[4]}", False), (lambda k: f"moe-{k[5]}", False),
                    (lambda k: f"{k[6]}-adamw", False)],
    "bench-memory": [(lambda k: f"b{k[0]}", True), (lambda k: k[1], False)],
    "bench-generate": [(lambda k: "graph" if k[0] else "eager", True), (lambda k: f"b{k[1]}", True),
                       (lambda k: f"n{k[2]}", False), (lambda k: k[3], False)],
}


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H100 PCIe' -> 'h100-pcie', 'cpu (x86_64, 2 threads)' -> 'cpu'."""
    words = re.split(r"[\s_-]+", re.sub(r"\(.*\)", "", name).strip().lower())
    keep = [w for w in words if w not in ("", "nvidia", "geforce", "tesla") and not re.fullmatch(r"\d+gb|hbm\d*e?", w)]
    return _slug("-".join(keep)) or "device"


def figure_stem(kind: str, key: tuple, device: str, peer_keys: list[tuple]) -> str:
    """bench_<kind>_<settings>_<device> (e.g. bench_train_eager_32x1024_h100): the settings always
    named and those in which the peers (this kind's table keys on this device) differ. Never a
    counter: the name says what the figure shows."""
    parts = ["bench", kind.removeprefix("bench-").replace("-", "_")]
    for part, always in NAME_PARTS[kind]:
        if always or len({part(k) for k in peer_keys}) > 1:
            parts.append(_slug(part(key)))
    return "_".join(parts + [device_slug(device)])


def _guides(ax, xs, y0):
    """Dotted slope-1 (linear) and dashed slope-2 (quadratic) lines through (xs[0], y0) on log-log axes."""
    x0 = xs[0]
    ax.plot(xs, [y0 * x / x0 for x in xs], ":", color="gray", lw=1, label="∝ L (linear)")
    ax.plot(xs, [y0 * (x / x0) ** 2 for x in xs], "--", color="gray", lw=1, label="∝ L² (quadratic)")


def _log_length_axes(ax, lengths: list[int], xlabel: str) -> None:
    # log-log against length: linear growth is a slope-1 line, quadratic a slope-2 line
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [length(n) for n in lengths])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, which="both")


def plot_bench_train(rows: list[dict], path: Path) -> Path | None:
    """Training tokens/s per variant, baselines in gray."""
    res = [r["result"] for r in rows if r["result"]["status"] == "ok"]
    if not res:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(res) + 1.5))
    ax.barh([r["variant"] for r in res], [r["tokens_per_s"] / 1e3 for r in res],
            color=["tab:gray" if r.get("baseline") else "tab:blue" for r in res])
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (thousands); gray = baseline")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_bench_memory(rows: list[dict], path: Path) -> Path | None:
    """Log-log: peak memory above the weights, and time, against length; one colour per variant,
    solid = training, dashed = prefill, x = out of memory; gray guides of slope 1 and 2."""
    res = [r["result"] for r in rows]
    ok = [r for r in res if r["status"] == "ok"]
    if not ok:
        return None
    lengths = sorted({r["length"] for r in res})
    colours = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in res))}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], lambda r: r["peak_mem_gib"] - (r.get("static_mem_gib") or 0)
               if r.get("peak_mem_gib") is not None else None, "peak memory above the weights (GiB)"),
              (axes[1], lambda r: r["time_s"]["median"], "time per pass (s)"))
    for ax, value, ylabel in panels:
        first = None
        for variant, mode in dict.fromkeys((r["variant"], r["mode"]) for r in res):
            pts = sorted((r for r in res if r["variant"] == variant and r["mode"] == mode), key=lambda r: r["length"])
            xy = [(r["length"], value(r)) for r in pts if r["status"] == "ok"]
            xy = [(x, y) for x, y in xy if y is not None and y > 0]
            if not xy:
                continue
            xs, ys = zip(*xy)
            ax.plot(xs, ys, "-o" if mode == "train" else "--s", ms=3, color=colours[variant], label=f"{variant} {mode}")
            oom = [r["length"] for r in pts if r["status"] != "ok"]
            if oom:
                ax.plot([min(oom)], [ys[-1]], "x", color=colours[variant], ms=10, mew=2)
            first = first or ys[0]
        if first:
            _guides(ax, lengths, first)
        _log_length_axes(ax, lengths, f"sequence length (batch {rows[0]['config']['batch']})")
        ax.set_ylabel(ylabel)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("training (fwd+bwd, solid) and prefill (no grad, dashed) against length; x = out of memory",
                 fontsize=10)
    return _save(fig, path)


def plot_bench_generate(rows: list[dict], path: Path) -> Path | None:
    """Decode tokens/s (dotted: the KV-cache bandwidth bound) and the decoding state against context."""
    res = [r["result"] for r in rows if r["result"]["status"] == "ok"]
    if not res:
        return None
    c = rows[0]["config"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in res):
        pts = sorted((r for r in res if r["variant"] == variant), key=lambda r: r["prompt_len"])
        xs = [r["prompt_len"] for r in pts]
        axes[0].plot(xs, [r["decode_tokens_per_s"] for r in pts], "-o", ms=3, label=variant)
        axes[1].plot(xs, [r["state_gib"] for r in pts], "-o", ms=3, label=f"{variant} state / KV cache")
        bound = [(r["prompt_len"], c["batch"] / (r["kv_bound_ms"] / 1e3)) for r in pts if r.get("kv_bound_ms")]
        if bound:
            axes[0].plot(*zip(*bound), ":", color="gray", lw=1)
    axes[0].set_ylabel("decode tokens/s (dotted: KV-cache bandwidth bound)")
    axes[1].set_ylabel("decoding state (GiB)")
    lengths = sorted({r["prompt_len"] for r in res})
    for ax in axes:
        _log_length_axes(ax, lengths, "context (prompt) length")
        ax.legend(fontsize=7)
    fig.suptitle(f"decoding at batch {c['batch']}, CUDA graph={c['cuda_graph']}", fontsize=10)
    return _save(fig, path)


BENCH_FIGURES = {"bench-train": plot_bench_train, "bench-memory": plot_bench_memory,
                 "bench-generate": plot_bench_generate}


# ---- trend


def trend_figures(budgets, curve: list[tuple[float, float]], variant: str, baseline: str, out: Path) -> list[Path]:
    """trend_delta.png: the paired Δ with its interval against the budget (log tokens);
    trend_speedup.png: speedup(l) of the largest budget against the baseline's tokens."""
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [b.tokens for b in budgets]
    ys = [b.paired.mean for b in budgets]
    lo = [b.paired.mean - b.paired.lo if b.paired.lo is not None else 0 for b in budgets]
    hi = [b.paired.hi - b.paired.mean if b.paired.hi is not None else 0 for b in budgets]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3)
    ax.axhline(0, color="gray", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"Δ final smoothed loss ({variant} − {baseline})")
    ax.set_title("paired difference against the budget (95% t-interval over seeds)")
    paths = [_save(fig, out / "trend_delta.png")]
    if curve:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t for t, _ in curve], [s for _, s in curve], marker=".")
        ax.axhline(1, color="gray", lw=1, ls="--")
        ax.set_xlabel(f"tokens {baseline} took to reach the loss")
        ax.set_ylabel("speedup(l)")
        ax.set_title(f"speedup of {variant} over {baseline} as training goes (appendix D)")
        paths.append(_save(fig, out / "trend_speedup.png"))
    return paths
