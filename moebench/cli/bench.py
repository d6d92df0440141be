"""`moebench bench train|moe|memory|generate`, `moebench generate CHECKPOINT` and
`moebench report-bench`. Each command parses options, calls one function of moebench.bench /
moebench.generate / moebench.report.bench, saves the record and prints a table."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moebench.errors import UserError

out = Console()
if not out.is_terminal:           # piped or in a log: wide tables instead of wrapped names
    out = Console(width=max(out.width, 180))
err = Console(stderr=True)
bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Throughput, memory and decoding benchmarks; one JSON record per run in results/bench/.")

DEFAULT_FAMILY = "Mamba_25M,MoE-Mamba_25M,Transformer_25M,Transformer-MoE_25M"
FormatOpt = Annotated[str, typer.Option("--format", help="table | json (the whole record on stdout)")]
OutOpt = Annotated[Optional[str], typer.Option("--out", help="record file (default results/bench/<kind>_<time>.json)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
DtypeOpt = Annotated[str, typer.Option(help="bf16 (autocast / bf16 weights) | fp32")]
ImplOpt = Annotated[str, typer.Option(help="Mamba mixer: auto (= fast on CUDA, ref on CPU) | fast | ref")]
MoeImplOpt = Annotated[str, typer.Option(help="MoE experts: auto | grouped | loop")]


def _variants(names: list[str] | str) -> list:
    from moebench.registry import get
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


def _saver(kind: str, path: str | None):
    """A callback that (re)writes the record after every result, so an interrupted run keeps its
    finished points (the record says complete: false)."""
    if path is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = f"results/bench/{kind}_{stamp}.json"
    target = Path(path)
    printed = [0]

    def save(record: dict):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(target)
        for r in record["results"][printed[0]:]:           # progress on stderr, one line per point
            err.print(f"  {_progress(r)}", highlight=False, markup=False)
        printed[0] = len(record["results"])
    save.path = target
    return save


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


def _show(record: dict, fmt: str, save) -> None:
    from moebench.report.bench import header, table
    err.print(f"record written to {save.path}", highlight=False)
    if fmt == "json":
        print(json.dumps(record, indent=1, default=str))
        return
    title, cols, rows = table(record)
    t = Table(title=Text(title), caption=Text(header(record)))
    for c in cols:
        t.add_column(c, justify="left" if c in ("variant", "mode", "path", "what", "impl (mixer/moe)") else "right")
    for r in rows:
        t.add_row(*map(Text, r))          # Text: "[dense-eq]" is a name, not Rich markup
    out.print(t)
    if record.get("ratios"):
        out.print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in record["ratios"].items()))


def _cuda_required(device: str):
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available here")


@bench_app.command("train")
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
    out_file: Annotated[Optional[str], typer.Option("--out", help="record file (default results/bench/bench-train_<time>.json)")] = None,
):
    """Whole training steps (forward + backward + fused AdamW): tokens/s, TFLOP/s, MFU, peak memory.

    Examples: moebench bench train MoE-Mamba_25M-e32 Mamba_25M;  moebench bench train Mamba_25M@tiny --device cpu --dtype fp32
    """
    from moebench.bench import bench_train
    _check(fmt, dtype, impl, moe_impl)
    _cuda_required(device)
    cfgs = _variants(variants)
    save = _saver("bench-train", out_file)
    rec = bench_train(cfgs, batch=batch, ctx=ctx, dtype=dtype, compile=compile, steps=steps, warmup=warmup,
                      device=device, impl=impl, moe_impl=moe_impl, loss_chunk=loss_chunk, baselines=baselines,
                      on_update=save)
    _show(rec, fmt, save)


@bench_app.command("moe")
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
    out_file: OutOpt = None,
):
    """One MoE layer (grouped, loop, the grouped GEMMs alone) against one dense FFN, fwd and fwd+bwd.

    Example: moebench bench moe --tokens 32768 --experts 32
    """
    from moebench.bench import bench_moe
    _check(fmt, dtype)
    _cuda_required(device)
    if not 1 <= top_k <= experts:
        raise UserError(f"need 1 <= top-k <= experts, got {top_k} and {experts}")
    save = _saver("bench-moe", out_file)
    rec = bench_moe(tokens=tokens, d=d, hidden=hidden, experts=experts, top_k=top_k,
                    capacity_factor=capacity_factor or None, dtype=dtype, steps=steps, warmup=warmup,
                    device=device, loop=loop, on_update=save)
    _show(rec, fmt, save)


@bench_app.command("memory")
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
    out_file: OutOpt = None,
):
    """Peak memory and time of training (fwd+bwd) and prefill (no grad, last-position logits)
    against sequence length; out-of-memory is recorded as a result.

    Example: moebench bench memory --lengths 1024,4096,16384,65536
    """
    from moebench.bench import bench_memory
    _check(fmt, dtype, impl, moe_impl)
    _cuda_required(device)
    cfgs, lens = _variants(variants), _ints(lengths, "lengths")
    save = _saver("bench-memory", out_file)
    rec = bench_memory(cfgs, lengths=lens, batch=batch, dtype=dtype,
                       device=device, impl=impl, moe_impl=moe_impl, repeats=repeats, on_update=save)
    if plots:
        from moebench.report.bench import plot_memory
        Path(plots).mkdir(parents=True, exist_ok=True)
        for p in plot_memory(rec, Path(plots)):
            err.print(f"plot written to {p}", highlight=False)
    _show(rec, fmt, save)


@bench_app.command("generate")
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
    out_file: OutOpt = None,
):
    """Prefill + step decoding against context length: decode tokens/s, memory, the KV-cache
    bandwidth bound of attention models and the (constant) state of Mamba models.

    Example: moebench bench generate --prompt-len 8192 --batch 64 --cuda-graph
    """
    import torch
    from moebench.bench import bench_generate
    _check(fmt, dtype, impl, moe_impl)
    _cuda_required(device)
    if cuda_graph and (device == "cpu" or not torch.cuda.is_available()):
        raise UserError("--cuda-graph needs a CUDA device")
    cfgs, lens = _variants(variants), _ints(prompt_len, "prompt lengths")
    save = _saver("bench-generate", out_file)
    rec = bench_generate(cfgs, prompt_lens=lens, gen_len=gen_len,
                         batch=batch, cuda_graph=cuda_graph, dtype=dtype, device=device, impl=impl,
                         moe_impl=moe_impl, on_update=save)
    _show(rec, fmt, save)


def generate_cmd(
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint written by `moebench train` (runs/<id>/ckpt.pt)")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to sample")] = 64,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling: keep tokens up to this mass")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="always take the most likely token")] = False,
    seed: Annotated[Optional[int], typer.Option(help="seed of the sampler")] = None,
    device: DeviceOpt = "auto",
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="decode through a CUDA graph")] = False,
):
    """Sample a continuation of PROMPT from a trained checkpoint.

    Example: moebench generate results/runs/<run_id>/ckpt.pt --prompt "Once upon a time" --top-k 50 --seed 0
    """
    import torch
    from moebench.generate import generate
    model, tok, dev = load_for_generation(checkpoint, device)
    if cuda_graph and dev.type != "cuda":
        raise UserError("--cuda-graph needs a CUDA device")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    ids = tok.encode(prompt) if prompt else []
    ids = ids or [tok.eot]                                 # an empty prompt starts a new document
    prompt_BL = torch.tensor([ids], dtype=torch.long, device=dev)
    out_BN = generate(model, prompt_BL, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      greedy=greedy, seed=seed, cuda_graph=cuda_graph, vocab_size=tok.vocab_size)
    new = out_BN[0, len(ids):].tolist()
    print(prompt + tok.decode(new))


def load_for_generation(path: str, device: str = "auto"):
    """(model in eval mode, tokenizer, device) from a checkpoint; bad paths and contents are UserErrors."""
    import torch
    from moebench import checkpoint
    from moebench.config import ModelConfig
    from moebench.env import resolve_device
    from moebench.data import get_tokenizer
    from moebench.generate import cast_for_inference
    from moebench.models.lm import build_model

    dev = resolve_device(device)
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}" + (" (a folder: pass its ckpt.pt)" if Path(path).is_dir() else ""))
    state = checkpoint.load(path, map_location="cpu")
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a moebench checkpoint (needs 'model' and 'model_config')")
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model_config ({e})") from None
    model = build_model(cfg, impl="auto", device=dev)    # built on the device: 'auto' picks the kernels there
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit {cfg.name} ({str(e).splitlines()[0][:160]})") from None
    model.eval()
    if dev.type == "cuda":    # bf16 weights: no per-step autocast copies of every expert; graph friendly
        model = cast_for_inference(model, torch.bfloat16)
    return model, get_tokenizer(), dev


def report_bench_cmd(
    results: Annotated[str, typer.Option(help="folder (or one file) of bench records")] = "results/bench",
    out_dir: Annotated[str, typer.Option("--out", help="report folder")] = "reports",
    plots: Annotated[bool, typer.Option(help="write the PNG plots")] = True,
    summary: Annotated[bool, typer.Option("--summary", help="print the summary table on stdout")] = False,
):
    """Render results/bench/*.json into reports/bench.md (+ PNGs).

    Example: moebench report-bench --results results/bench --out reports
    """
    from moebench.report.bench import load_bench_records, render_bench_report, summary_markdown
    if not Path(results).exists():
        raise UserError(f"no results at {results}")
    path = render_bench_report(results, out_dir, plots=plots)
    err.print(f"report written to {path}", highlight=False)
    if summary:
        print(summary_markdown(load_bench_records(results)))


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
    app.command("generate")(generate_cmd)
    app.command("report-bench")(report_bench_cmd)

