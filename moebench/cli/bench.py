"""`moebench bench train|moe|memory|generate`: each command parses its options and calls one benchmark
of moebench.bench, which appends one row per measured point to RESULTS/bench.jsonl; a progress line
per point goes to stderr and the session's table to stdout. `moebench bench check` reruns a
baseline's points here (moebench.bench.check) and prints how each metric compares. The benchmarks
(and torch) are imported inside the commands, once the options check out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from moebench.cli.common import err, out
from moebench.errors import UserError
from moebench.fmt import per_s
from moebench.paths import LOCAL_RESULTS, PUBLISHED_RESULTS
from moebench.registry import get

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Throughput, memory and decoding benchmarks; one row per measured point in "
                       f"{LOCAL_RESULTS}/bench.jsonl (--out).")

DEFAULT_FAMILY = "Mamba_25M,MoE-Mamba_25M,Transformer_25M,Transformer-MoE_25M"
FormatOpt = Annotated[str, typer.Option("--format", help="table | json (the session's rows on stdout)")]
OutOpt = Annotated[str, typer.Option("--out", help="results folder: rows are appended to OUT/bench.jsonl")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
DtypeOpt = Annotated[str, typer.Option(help="bf16 (autocast / bf16 weights) | fp32")]
ImplOpt = Annotated[str, typer.Option(help="Mamba mixer: auto (= fast on CUDA, ref on CPU) | fast | ref")]
MoeImplOpt = Annotated[str, typer.Option(help="MoE experts: auto | grouped | loop")]


def _variants(names: list[str] | str) -> list:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        raise UserError("no variants given")
    return [get(n.strip()) for n in names]


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"bad {what} '{text}': use comma-separated integers, e.g. 1024,2048") from None
    if not vals or min(vals) < 1:
        raise UserError(f"{what} must be positive integers, got '{text}'")
    return vals


def _check(fmt: str, dtype: str, impl: str | None = None, moe_impl: str | None = None):
    if fmt not in ("table", "json"):
        raise UserError(f"unknown format '{fmt}': use table or json")
    if dtype not in ("bf16", "fp32"):
        raise UserError(f"unknown dtype '{dtype}': use bf16 or fp32")
    if impl is not None and impl not in ("auto", "fast", "ref"):
        raise UserError(f"unknown impl '{impl}': use auto, fast or ref")
    if moe_impl is not None and moe_impl not in ("auto", "grouped", "loop"):
        raise UserError(f"unknown moe impl '{moe_impl}': use auto, grouped or loop")


def _progress(r: dict) -> str:
    what = " ".join(str(r[k]) for k in ("variant", "name", "mode", "length", "prompt_len") if k in r)
    if r.get("status") != "ok":
        return f"{what}: {r.get('status')}"
    for key, unit in (("tokens_per_s", "tok/s"), ("decode_tokens_per_s", "decode tok/s")):
        if key in r:
            return f"{what}: {r[key]:,.0f} {unit}" + (f", peak {r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") else "")
    if "fwd_bwd_ms" in r:
        return f"{what}: fwd+bwd {r['fwd_bwd_ms']['median']:.3f} ms"
    return what


def _on_point(row: dict) -> None:
    err.print(f"  {_progress(row['result'])}", highlight=False, markup=False)


def _show(rows: list[dict], fmt: str, results: str) -> None:
    err.print(f"{len(rows)} rows appended to {Path(results) / 'bench.jsonl'}", highlight=False)
    if fmt == "json":
        print(json.dumps(rows, indent=1, default=str))
        return
    from moebench.report.bench import by_session, group_tables, session_label, table, table_notes
    sessions = by_session(rows)
    for t in group_tables(rows):
        title, cols, body = table(t, sessions)
        rich = Table(title=Text(title), caption=Text(f"{t.kind} on {t.device} · {session_label(t.rows[0])}"))
        for c in cols:
            rich.add_column(c, justify="left" if c in ("variant", "mode", "path", "what", "impl (mixer/moe)") else "right")
        for line in body:
            rich.add_row(*map(Text, line))          # Text: "[dense-eq]" is a name, not Rich markup
        out.print(rich)
        for note in table_notes(t, sessions):
            out.print(note, highlight=False)


def _cuda_required(device: str):
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available here")


@app.command("train")
def train_cmd(
    variants: Annotated[list[str], typer.Argument(help="registry names, e.g. MoE-Mamba_25M-e32 Mamba_25M")],
    batch: Annotated[int, typer.Option(help="sequences per step")] = 32,
    ctx: Annotated[int, typer.Option(help="context length")] = 1024,
    dtype: DtypeOpt = "bf16",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model")] = False,
    steps: Annotated[int, typer.Option(help="measured steps (median reported, all stored)")] = 20,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 5,
    device: DeviceOpt = "auto",
    impl: ImplOpt = "auto",
    moe_impl: MoeImplOpt = "auto",
    loss_chunk: Annotated[Optional[int], typer.Option(help="tokens per head+loss chunk (default: as train, 8192 on CUDA)")] = None,
    baselines: Annotated[bool, typer.Option(help="also time each MoE variant's dense-equivalent and loop baselines")] = True,
    fmt: FormatOpt = "table",
    results: OutOpt = LOCAL_RESULTS,
):
    """Whole training steps (forward + backward + fused AdamW): tokens/s, TFLOP/s, MFU, peak memory.

    Examples: moebench bench train MoE-Mamba_25M-e32 Mamba_25M;  moebench bench train Mamba_25M@tiny --device cpu --dtype fp32
    """
    _check(fmt, dtype, impl, moe_impl)
    cfgs = _variants(variants)
    _cuda_required(device)
    from moebench.bench.train_step import bench_train
    rows = bench_train(cfgs, batch=batch, ctx=ctx, dtype=dtype, compile=compile, steps=steps, warmup=warmup,
                       device=device, impl=impl, moe_impl=moe_impl, loss_chunk=loss_chunk, baselines=baselines,
                       results=results, on_point=_on_point)
    _show(rows, fmt, results)


@app.command("moe")
def moe_cmd(
    tokens: Annotated[int, typer.Option(help="tokens T in the layer's input")] = 32768,
    d: Annotated[int, typer.Option(help="model width")] = 512,
    hidden: Annotated[int, typer.Option(help="expert (and dense FFN) hidden width")] = 1536,
    experts: Annotated[int, typer.Option(help="number of experts")] = 32,
    top_k: Annotated[int, typer.Option(help="experts per token")] = 1,
    capacity_factor: Annotated[float, typer.Option(help="capacity factor; 0 = dropless")] = 1.0,
    dtype: DtypeOpt = "bf16",
    steps: Annotated[int, typer.Option()] = 20,
    warmup: Annotated[int, typer.Option()] = 5,
    loop: Annotated[bool, typer.Option(help="also time the per-expert loop")] = True,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = "table",
    results: OutOpt = LOCAL_RESULTS,
):
    """One MoE layer (grouped, loop, the grouped GEMMs alone) against one dense FFN, fwd and fwd+bwd.

    Example: moebench bench moe --tokens 32768 --experts 32
    """
    _check(fmt, dtype)
    if not 1 <= top_k <= experts:
        raise UserError(f"need 1 <= top-k <= experts, got {top_k} and {experts}")
    _cuda_required(device)
    from moebench.bench.moe_layer import bench_moe
    rows = bench_moe(tokens=tokens, d=d, hidden=hidden, experts=experts, top_k=top_k,
                     capacity_factor=capacity_factor or None, dtype=dtype, steps=steps, warmup=warmup,
                     device=device, loop=loop, results=results, on_point=_on_point)
    _show(rows, fmt, results)


@app.command("memory")
def memory_cmd(
    variants: Annotated[str, typer.Option(help="comma-separated registry names")] = DEFAULT_FAMILY,
    lengths: Annotated[str, typer.Option(help="comma-separated sequence lengths")] =
        "512,1024,2048,4096,8192,16384,32768,65536",
    batch: Annotated[int, typer.Option()] = 1,
    dtype: DtypeOpt = "bf16",
    repeats: Annotated[int, typer.Option(help="timed repeats per point (median reported)")] = 2,
    device: DeviceOpt = "auto",
    impl: ImplOpt = "auto",
    moe_impl: MoeImplOpt = "auto",
    plots: Annotated[Optional[str], typer.Option(help="also write the PNG plot into this folder")] = None,
    fmt: FormatOpt = "table",
    results: OutOpt = LOCAL_RESULTS,
):
    """Peak memory and time of training (fwd+bwd) and prefill (no grad, last-position logits)
    against sequence length; out-of-memory is recorded as a result.

    Example: moebench bench memory --lengths 1024,4096,16384,65536
    """
    _check(fmt, dtype, impl, moe_impl)
    cfgs, lens = _variants(variants), _ints(lengths, "lengths")
    _cuda_required(device)
    from moebench.bench.memory import bench_memory
    rows = bench_memory(cfgs, lengths=lens, batch=batch, dtype=dtype, device=device, impl=impl,
                        moe_impl=moe_impl, repeats=repeats, results=results, on_point=_on_point)
    if plots:
        from moebench.report.bench import group_tables
        from moebench.report.figures import figure_stem, plot_bench_memory
        Path(plots).mkdir(parents=True, exist_ok=True)
        for t in group_tables(rows):
            p = plot_bench_memory(t.rows, Path(plots) / f"{figure_stem(t.kind, t.key, t.device, [t.key])}.png")
            if p:
                err.print(f"plot written to {p}", highlight=False)
    _show(rows, fmt, results)


@app.command("generate")
def generate_bench_cmd(
    variants: Annotated[str, typer.Option(help="comma-separated registry names")] = DEFAULT_FAMILY,
    prompt_len: Annotated[str, typer.Option(help="context lengths, comma-separated")] = "1024,2048,4096,8192",
    gen_len: Annotated[int, typer.Option(help="decode steps timed per point")] = 128,
    batch: Annotated[int, typer.Option(help="sequences decoded together")] = 64,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="capture the decode step as a CUDA graph")] = False,
    dtype: DtypeOpt = "bf16",
    device: DeviceOpt = "auto",
    impl: ImplOpt = "auto",
    moe_impl: MoeImplOpt = "auto",
    fmt: FormatOpt = "table",
    results: OutOpt = LOCAL_RESULTS,
):
    """Prefill + step decoding against context length: decode tokens/s, memory, the KV-cache
    bandwidth bound of attention models and the (constant) state of Mamba models.

    Example: moebench bench generate --prompt-len 8192 --batch 64 --cuda-graph
    """
    _check(fmt, dtype, impl, moe_impl)
    cfgs, lens = _variants(variants), _ints(prompt_len, "prompt lengths")
    if cuda_graph and device == "cpu":
        raise UserError("--cuda-graph needs a CUDA device")
    _cuda_required(device)
    import torch
    if cuda_graph and not torch.cuda.is_available():
        raise UserError("--cuda-graph needs a CUDA device")
    from moebench.bench.generate import bench_generate
    rows = bench_generate(cfgs, prompt_lens=lens, gen_len=gen_len, batch=batch, cuda_graph=cuda_graph,
                          dtype=dtype, device=device, impl=impl, moe_impl=moe_impl, results=results,
                          on_point=_on_point)
    _show(rows, fmt, results)


@app.command("check")
def check_cmd(
    baseline: Annotated[str, typer.Option(help="baseline rows: a .jsonl file, or session ids (comma-separated) "
                                               "in RESULTS/bench.jsonl")],
    repeats: Annotated[int, typer.Option(help="rerun every configuration this many times; the median counts")] = 3,
    threshold: Annotated[float, typer.Option(help="a metric this much worse than the baseline is a regression")] = 0.10,
    force: Annotated[bool, typer.Option("--force", help="compare even when the GPU model, torch or mamba-ssm differ")] = False,
    results: Annotated[str, typer.Option("--results", help="results folder where session ids are looked up")] = PUBLISHED_RESULTS,
    save: Annotated[Optional[str], typer.Option("--out", help="also append the rerun's rows to OUT/bench.jsonl")] = None,
):
    """Rerun every benchmark point of a baseline here and compare tokens/s, decode rates and the
    ratios between paths; exit 1 with the table when one is more than --threshold worse, or missing.

    Example (on the machine that made the baseline): moebench bench check --baseline results/baselines/h100.jsonl
    """
    if not 0 < threshold < 1:
        raise UserError(f"--threshold is a fraction of the baseline, between 0 and 1, got {threshold}")
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    from moebench.bench.check import check
    findings, diffs = check(baseline, results=results, repeats=repeats, threshold=threshold, force=force,
                            out=save, on_point=_on_point)
    for line in diffs:
        err.print(f"[yellow]warning:[/yellow] --force: {line}", highlight=False)
    out.print(_findings_table(f"{baseline}: rerun here ({repeats} time{'s' * (repeats > 1)}), worse = more than "
                              f"{threshold:.0%} worse than the baseline", findings))
    bad = [f for f in findings if f.bad]
    if bad:                  # again on their own: a baseline of every benchmark has hundreds of metrics
        out.print(_findings_table("regressions", bad))
    counts = ", ".join(f"{sum(f.verdict == v for f in bad)} {v}" for v in ("worse", "missing", "failed")
                       if any(f.verdict == v for f in bad))
    compared = sum(f.baseline is not None for f in findings)
    out.print(f"{compared} metrics compared: " + (counts if bad else "no regression"), highlight=False)
    if bad:
        raise typer.Exit(1)


def _findings_table(title: str, findings) -> Table:
    rich = Table(title=Text(title))
    for c in ("point", "metric", "baseline", "now", "change", "verdict"):
        rich.add_column(c, justify="left" if c in ("point", "metric", "verdict") else "right")
    for f in findings:
        change = "-" if f.change is None else f"{f.change:+.1%}"
        style = "red" if f.bad else "green" if f.verdict == "better" else None
        rich.add_row(Text(f.point), Text(f.metric), _number(f.metric, f.baseline), _number(f.metric, f.current),
                     change, Text(f.verdict, style=style))
    return rich


def _number(metric: str, x: float | None) -> str:
    if x is None:
        return "-"
    if "tokens/s" in metric:
        return per_s(x) if x >= 1e4 else f"{x:,.0f}"
    return f"{x:.3g}"
