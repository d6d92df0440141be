"""The reports' figures, drawn from result rows only; matplotlib lives here. Each function takes the
rows of one table and the PNG path to write, and returns the path (None when there is nothing to draw)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                 # files only, no display
import matplotlib.pyplot as plt       # noqa: E402  (after the backend is chosen)


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


def _length(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _guides(ax, xs, y0):
    """Dotted slope-1 (linear) and dashed slope-2 (quadratic) lines through (xs[0], y0) on log-log axes."""
    x0 = xs[0]
    ax.plot(xs, [y0 * x / x0 for x in xs], ":", color="gray", lw=1, label="∝ L (linear)")
    ax.plot(xs, [y0 * (x / x0) ** 2 for x in xs], "--", color="gray", lw=1, label="∝ L² (quadratic)")


def _log_length_axes(ax, lengths: list[int], xlabel: str) -> None:
    # log-log against length: linear growth is a slope-1 line, quadratic a slope-2 line
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [_length(n) for n in lengths])
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
