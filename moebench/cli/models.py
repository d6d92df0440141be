"""`moebench list | env | train | data prepare | generate`: the models, the machine, one training run,
its data, and sampling from a checkpoint. Its `app` is merged into the main one; each command parses and calls the library.
What loads torch is imported inside the commands, after their arguments check out: a bad name or
option is refused at once rather than after the seconds torch takes to load."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from moebench.cli.common import CKPT_EVERY, CkptEveryOpt, err, out
from moebench.cli.progress import TrainingProgress
from moebench.config import TrainConfig
from moebench.errors import UserError
from moebench.fmt import human, parse_ckpt_every, parse_tokens
from moebench.paths import LOCAL_RESULTS
from moebench.presets import ema_alpha_for, fitting_preset, preset_shape
from moebench.registry import TINY_SUFFIX, VARIANTS, fit_vocab, get
from moebench.specs import get_ablation

app = typer.Typer()
data_app = typer.Typer(no_args_is_help=True, help="Prepare training text as GPT-2 tokens.")
app.add_typer(data_app, name="data")


@app.command("list")
def list_cmd(
    ablation: Annotated[Optional[str], typer.Option(help="only the variants of this ablation")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="show the CPU twins")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
):
    """Variants with total / active non-embedding parameters and training FLOPs per token."""
    if fmt not in LIST_FORMATS:
        raise UserError(f"unknown format '{fmt}': use {', '.join(LIST_FORMATS)}")
    names = list(VARIANTS)
    if ablation:
        names = list(get_ablation(ablation).variants)
    cfgs = [get(n + ("@tiny" if tiny else "")) for n in names]
    from moebench.models.lm import describe
    rows = [describe(cfg) for cfg in cfgs]
    if fmt == "json":
        print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        table = variants_table(rows, out.width)
        out.print(table)
        if len(table.columns) < len(LIST_COLUMNS):
            err.print(f"{out.width} columns: mixer, ffn, layers, d and paper left out (a wider terminal, or "
                      f"--format csv, shows them)", highlight=False, soft_wrap=True)


LIST_FORMATS = ("table", "csv", "json")
LIST_COLUMNS = ("variant", "mixer", "ffn", "layers", "d", "experts", "params", "active", "FLOPs/tok", "paper")
NARROW_COLUMNS = ("variant", "experts", "params", "active", "FLOPs/tok")   # what the title promises


def variants_table(rows: list[dict], width: int) -> Table:
    """Every column where `width` holds them, else the counts only; names are never cut (a cut
    name, "Mamb…", names nothing)."""
    for cols in (LIST_COLUMNS, NARROW_COLUMNS):
        wide = cols == LIST_COLUMNS
        table = Table(title="moebench variants (non-embedding parameters; FLOPs/token = training, ctx 1024)",
                      box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD, show_edge=wide, pad_edge=wide)
        for col in cols:
            numeric = col in ("layers", "d", "experts", "params", "active", "FLOPs/tok")
            table.add_column(col, justify="right" if numeric else "left", no_wrap=col == "variant",
                             min_width=max(len(r["name"]) for r in rows) if col == "variant" else None)
        for r in rows:
            ffn = r["ffn"] + (" (par)" if r["layout"] == "parallel" else "")
            cells = {"variant": r["name"], "mixer": r["mixer"], "ffn": ffn, "layers": str(r["n_layer"]),
                     "d": str(r["d_model"]), "experts": str(r["n_expert"] or "-"), "params": human(r["total_params"]),
                     "active": human(r["active_params"]), "FLOPs/tok": human(r["flops_per_token"]),
                     "paper": r["paper_ref"]}
            table.add_row(*(cells[c] for c in cols))
        if Console(width=10_000).measure(table).maximum <= width:     # its natural width, unclamped
            break
    return table


@app.command("env")
def env_cmd():
    """Print exactly what goes into the "env" of every result row."""
    from moebench import env
    print(json.dumps(env.collect(), indent=1))


@app.command("train")
def train_cmd(
    variant: Annotated[str, typer.Argument(help="registry name, e.g. MoE-Mamba_25M or Mamba_25M@tiny")],
    tokens: Annotated[Optional[str], typer.Option(help="token budget: 20000, 50M, 1B (default: the fitting preset's: "
                                                      "cpu-tiny's 164K for a @tiny variant or on a CPU, gpu-small's "
                                                      "20M for a paper-size variant on CUDA)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="global batch (sequences), over all ranks under torchrun "
                                                      "(default: the fitting preset's, 8 or 32)")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(
        help="sequences per forward on each rank; accumulation = batch / (micro_batch x ranks)")] = None,
    ctx: Annotated[Optional[int], typer.Option(help="context length (default: the fitting preset's, 128 or 1024)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (default: the paper's for the family)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")] = "auto",
    impl: Annotated[str, typer.Option(help="auto | fast | ref (the Mamba mixer) or key=value,... of "
                                             "mixer, moe, routing, decode, adamw (e.g. moe=loop)")] = "auto",
    data: Annotated[Optional[str], typer.Option(help="prepared data dir (default: data/prose)")] = None,
    ema_alpha: Annotated[Optional[float], typer.Option(help="smoothing of the training loss per step (default: as "
                                                            "`run`, clamp(50 / steps, 0.001, 0.5))")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step "
                                                    "(default: eager; a compiled step did not learn on an H100, see README)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run from its checkpoint")] = False,
    ckpt_every: CkptEveryOpt = CKPT_EVERY,
    out_dir: Annotated[str, typer.Option("--out", help="results folder (runs.jsonl and runs/)")] = LOCAL_RESULTS,
):
    """Train one variant for a token budget; appends one row to OUT/runs.jsonl.

    Unset --tokens/--batch/--ctx come from the preset that fits: cpu-tiny (@tiny or a CPU), gpu-small (CUDA).

    On several GPUs: torchrun --standalone --nproc_per_node 8 -m moebench train VARIANT ...
    (data-parallel; rank 0 writes the row, the curve and the checkpoints)."""
    cfg = get(variant)
    if data is not None:                  # the model's vocabulary is the data's (a learned BPE is smaller)
        from moebench.ablations import data_vocab
        cfg = fit_vocab(cfg, data_vocab(Path(data).expanduser()))
    budget = parse_tokens(tokens) if tokens is not None else None
    every_steps, every_minutes = parse_ckpt_every(ckpt_every)
    for name, value in (("--batch", batch), ("--ctx", ctx)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    from moebench.distributed import from_env
    from moebench.env import resolve_device
    from moebench.impl import parse as parse_impl
    parse_impl(impl)                      # a bad request fails here, in one line
    fits = fitting_preset(cfg.name.endswith(TINY_SUFFIX), resolve_device(device).type)
    p = preset_shape(fits)
    chosen = [what for what, given in (("tokens", tokens), ("batch", batch), ("ctx", ctx)) if given is None]
    budget, batch, ctx = budget or p.tokens, batch or p.batch, ctx or p.ctx
    steps = budget // (batch * ctx)
    alpha = ema_alpha if ema_alpha is not None else ema_alpha_for(fits, steps)
    tcfg = TrainConfig(tokens=budget, batch=batch, micro_batch=micro_batch, ctx=ctx,
                       lr=lr, lr_source="user" if lr is not None else "default", seed=seed, impl=impl,
                       data_dir=data or "", ema_alpha=alpha, compile=compile)
    # what the user did not choose, said once training is under way
    note = (f"{cfg.name}: {budget:,} tokens = {steps:,} steps of {batch} x {ctx} ({', '.join(chosen)} from preset "
            f"{fits}), loss smoothing alpha {alpha:.3g}" + (" (50 / steps, as `run`)" if ema_alpha is None else "")
            if chosen else "")
    row = run_with_progress(cfg, tcfg, note=note, out=out_dir, resume=resume, device=device,
                            ckpt_every_steps=every_steps, ckpt_minutes=every_minutes)
    if not from_env().is_main:            # under torchrun, rank 0 alone reports
        return
    m = row["metrics"]
    out.print(f"{cfg.name}: {m['tokens']:,} tokens, smoothed loss {m['final_smoothed_loss']:.4f}, "
              f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.1f}), "
              f"{(m['tokens_per_s'] or 0):,.0f} tok/s; row appended to {out_dir}/runs.jsonl")


def run_with_progress(cfg, tcfg, note: str = "", **kwargs) -> dict:
    from moebench.distributed import from_env
    from moebench.train import TrainingFailed, train
    main = from_env().is_main   # under torchrun, rank 0 alone shows progress and messages
    with TrainingProgress(disable=not main) as shown:
        shown.start(cfg.name, tcfg.tokens, note)
        try:
            return train(cfg, tcfg, on_progress=shown.update, **kwargs)
        except TrainingFailed as e:
            shown.close()
            if main:
                err.print(f"[red]failed:[/red] {e}", highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt as e:
            shown.close()
            if main:
                err.print(f"[yellow]{e or 'interrupted'}[/yellow]; continue with --resume", highlight=False)
            raise typer.Exit(130)


@data_app.command("prepare")
def data_prepare_cmd(
    input: Annotated[Optional[str], typer.Option(help="a folder or file of .txt / .jsonl(.gz) / .json.gz / .parquet (default: the corpus)")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="output folder (default: data/CORPUS or $MOEBENCH_DATA/CORPUS)")] = None,
    corpus: Annotated[str, typer.Option(help="prose | docs | all (the shared English corpus) when no --input")] = "prose",
    max_tokens: Annotated[Optional[str], typer.Option(help="stop after this many tokens, e.g. 2M")] = None,
    vocab: Annotated[Optional[int], typer.Option(help="learn a byte-level BPE of this many tokens from the text "
                                                       "instead of GPT-2's (default folder data/CORPUS-bpeN)")] = None,
):
    """Tokenize text into uint16 shards + manifest (idempotent: a second call does nothing)."""
    limit = parse_tokens(max_tokens) if max_tokens else None
    from moebench.data import prepare
    m = prepare(input, out_dir, corpus=corpus, max_tokens=limit, vocab=vocab)
    out.print(f"data ready in {m['dir']}")


@app.command("generate")
def generate_cmd(
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint written by `moebench train` (runs/<id>/ckpt.pt)")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to sample")] = 64,
    max_length: Annotated[Optional[int], typer.Option(help="prompt + sampled tokens at most (caps "
                                                            "--max-new-tokens)")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages tokens already in the text "
                                                            "(CTRL's penalty; 1 = off)")] = 1.0,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling: keep tokens up to this mass")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="always take the most likely token")] = False,
    seed: Annotated[Optional[int], typer.Option(help="seed of the sampler")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="decode through a CUDA graph")] = False,
):
    """Sample a continuation of PROMPT from a trained checkpoint.

    Example: moebench generate results/local/runs/<run_id>/ckpt.pt --prompt "Once upon a time" --top-k 50 --seed 0
    """
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if repetition_penalty <= 0:
        raise UserError("--repetition-penalty must be > 0 (1 = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    import torch

    from moebench.generate import generate, load_for_generation
    model, tok, dev = load_for_generation(checkpoint, device)
    if cuda_graph and dev.type != "cuda":
        raise UserError("--cuda-graph needs a CUDA device")
    ids = tok.encode(prompt) if prompt else []
    ids = ids or [tok.eot]                                 # an empty prompt starts a new document
    if max_length is not None:
        if max_length <= len(ids):
            raise UserError(f"--max-length {max_length} leaves no room after the prompt's {len(ids)} tokens")
        max_new_tokens = min(max_new_tokens, max_length - len(ids))
    prompt_BL = torch.tensor([ids], dtype=torch.long, device=dev)
    out_BN = generate(model, prompt_BL, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      greedy=greedy, seed=seed, cuda_graph=cuda_graph, vocab_size=tok.vocab_size,
                      repetition_penalty=repetition_penalty)
    new = out_BN[0, len(ids):].tolist()
    print(prompt + tok.decode(new))
