"""Train one variant for a fixed token budget with the paper's recipe. No CLI, no plots.

Each run lives in <out>/runs/<run_id>/ (ckpt.pt and checkpoint.json, curve.csv); a finished or failed
run appends one self-describing row to <out>/runs.jsonl. Launched by torchrun, it trains data-parallel
(moebench/distributed.py); in one process it is unchanged.
"""
from __future__ import annotations

import csv
import json
import math
import signal
import threading
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from moebench import checkpoint, distributed, env
from moebench.config import ModelConfig, TrainConfig, stable_hash
from moebench.data import BatchSampler, TokenData, default_data_dir, prepare, val_batches
from moebench.env import resolve_device
from moebench.errors import UserError
from moebench.metrics import EMA
from moebench.models.lm import build_model, default_loss_chunk, flops_per_token
from moebench.optim import clip_grad_norm, lr_at, make_optimizer
from moebench.paths import LOCAL_RESULTS
from moebench.results import CKPT_INFO, SCHEMA, append_record, run_lock


CURVE_EVERY_S = 5.0    # curve.csv is rewritten at a curve point at most this often


class TrainingFailed(Exception):
    """The loss went NaN/inf: the run is recorded as failed; the last good checkpoint is kept."""


@dataclass
class Progress:
    step: int
    steps: int
    tokens: int
    total_tokens: int
    loss: float
    smoothed: float
    tok_s: float
    val_loss: float | None = None
    extra: dict = field(default_factory=dict)


def run_id_for(cfg: ModelConfig, tcfg: TrainConfig, tag: str = "") -> str:
    """Deterministic, so that `--resume` finds the run: variant, seed and a hash of both configs."""
    h = stable_hash({"model": cfg.config_hash(), "train": tcfg.to_dict(), "tag": tag})[:8]
    return f"{cfg.name.replace('@', '-')}_s{tcfg.seed}_{h}"


def _moe_stats(moe_aux: list) -> list[tuple]:
    return [(a.lb_loss.detach(), a.dropped_frac.detach(), a.tokens_per_expert.detach()) for a in moe_aux]


def _entropy(counts_E: torch.Tensor) -> float:
    p = counts_E.float() / counts_E.sum().clamp_min(1)
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(max(2, counts_E.numel())))


@torch.no_grad()
def evaluate(model, batches, device, amp, dist: distributed.Dist | None = None,
             sources: list[str] | None = None) -> tuple[float, dict[str, float]]:
    """(mean loss over every window of `batches`, the mean of each source's windows). With `dist` of
    several ranks, `batches` is this rank's share and the means are over all ranks' windows; then
    `sources` (every rank's list, in one order) says which sources to reduce."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    for x, y, source in batches:
        with amp():
            loss = model(x.to(device), y.to(device), return_logits=False, loss_chunk=4096).loss.item()
        acc = sums.setdefault(source, [0.0, 0])
        acc[0] += loss * len(x)
        acc[1] += len(x)
    model.train(was_training)
    names = sources or sorted(sums)
    if dist is not None and dist.world > 1:
        flat = torch.tensor([v for s in names for v in sums.get(s, [0.0, 0])], dtype=torch.float64, device=device)
        flat = dist.sum_(flat).tolist()
        sums = {s: flat[2 * i:2 * i + 2] for i, s in enumerate(names)}
    by_source = {s: sums[s][0] / sums[s][1] for s in names if s in sums and sums[s][1]}
    n = sum(sums[s][1] for s in by_source)
    return sum(sums[s][0] for s in by_source) / max(1, n), by_source


def default_data(corpus: str = "prose") -> Path:
    """The default corpus, prepared on first use (idempotent, so later calls only check it)."""
    folder = default_data_dir(corpus)
    if not (folder / "manifest.json").exists():
        prepare(corpus=corpus)
    return folder


# On an H100 (torch 2.11, mamba-ssm 2.3.2, bf16) a compiled training step did not learn: Mamba_25M and
# MoE-Mamba_25M stayed at ln(vocab), 10.9, after 2M tokens where eager reached 4.7 by 6M; a CPU compile of
# the same step (chunked loss, bf16 autocast) matches eager. Until scripts/compile_diag.py finds the
# cause on a GPU, the default is eager everywhere and --compile is the user's own choice.
COMPILE_BY_DEFAULT_ON_CUDA = False


def compiled_on(tcfg: TrainConfig, dev: torch.device) -> bool:
    """Whether the training step is compiled: as asked, else the device's default (COMPILE_BY_DEFAULT_ON_CUDA;
    never on a CPU, where compiling costs more than it saves)."""
    if tcfg.compile is not None:
        return tcfg.compile
    return COMPILE_BY_DEFAULT_ON_CUDA and dev.type == "cuda"


def train(cfg: ModelConfig, tcfg: TrainConfig, out: str | Path = LOCAL_RESULTS, *, resume: bool = False,
          device: str = "auto", run_tag: str = "", extra: dict | None = None,
          on_progress: Callable[[Progress], None] | None = None, ckpt_every_steps: int = 0,
          ckpt_minutes: float | None = None) -> dict:
    """Train and return the result row (also appended to <out>/runs.jsonl).

    A checkpoint is due every `ckpt_every_steps` steps (0: never by steps) and every `ckpt_minutes`
    (None: tcfg.ckpt_minutes), and is written at the next curve point. Neither is part of the run's
    identity, so a run resumes whatever the cadence it is given.

    Once the arguments and the data check out, rank 0 takes the run's lock (results.run_lock) and
    holds it to the end: a second process for the same run fails at once with RunBusy (under
    torchrun, torchrun then stops the other ranks)."""
    with ExitStack() as held:
        return _train(cfg, tcfg, out, resume, device, run_tag, extra, on_progress, ckpt_every_steps,
                      tcfg.ckpt_minutes if ckpt_minutes is None else ckpt_minutes, held)


def _train(cfg, tcfg, out, resume, device, run_tag, extra, on_progress, ckpt_every_steps, ckpt_minutes,
           held: ExitStack) -> dict:
    out = Path(out)
    dist = distributed.from_env()   # rank 0 of 1 unless launched by torchrun: see moebench/distributed.py
    dev = resolve_device(device, dist.local_rank if dist.world > 1 else None)
    dist.init(dev)
    micro, accum = distributed.split_batch(tcfg.batch, tcfg.micro_batch, dist.world)   # accum: per rank
    steps = tcfg.tokens // (tcfg.batch * tcfg.ctx)
    if steps < 1:
        raise UserError(f"token budget {tcfg.tokens} is smaller than one step "
                        f"(batch {tcfg.batch} x ctx {tcfg.ctx} = {tcfg.batch * tcfg.ctx} tokens)")
    with dist.main_first():   # several ranks must not prepare the default corpus at once
        data = TokenData(Path(tcfg.data_dir) if tcfg.data_dir else default_data())
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"{data.dir} holds ids of {data.vocab_size:,} tokens, {cfg.name} embeds {cfg.vocab_size:,}: "
                        f"give the model the data's vocabulary (registry.fit_vocab)")
    lr = tcfg.peak_lr(cfg)
    run_id = run_id_for(cfg, tcfg, run_tag)
    run_dir = out / "runs" / run_id
    ckpt_path = run_dir / "ckpt.pt"
    if resume and not ckpt_path.exists():
        raise UserError(f"nothing to resume: no checkpoint at {ckpt_path}")
    if dist.is_main:
        held.enter_context(run_lock(run_dir, f"run {run_id} ({cfg.name})"))
    if ckpt_path.exists() and not resume:
        raise UserError(f"run {run_id} already has a checkpoint in {run_dir}: pass --resume to continue "
                        f"it, or choose another --out")

    torch.manual_seed(tcfg.seed)
    use_bf16 = tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and dev.type == "cuda")
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    model = build_model(cfg, impl=tcfg.impl, device=dev)   # impl resolves on the target device
    opt = make_optimizer(model, lr, weight_decay=tcfg.weight_decay, betas=tcfg.betas, eps=tcfg.eps)
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = BatchSampler(data, micro, tcfg.ctx, seed=tcfg.seed)   # micro batch k = sampler.batch_at(k), on every rank
    # the validation set depends on the TrainConfig only; rank r evaluates its batches [r::world]
    val = val_batches(data, tcfg.eval_batches, tcfg.micro_batch or tcfg.batch, tcfg.ctx)
    val_sources = list(dict.fromkeys(b.source for b in val))
    eval_every = tcfg.eval_every_tokens or max(tcfg.batch * tcfg.ctx, tcfg.tokens // 10)
    eval_every_steps = max(1, eval_every // (tcfg.batch * tcfg.ctx))
    ema = EMA(tcfg.ema_alpha)
    curve: list[dict] = []
    start_step, wall_before, train_time_before = 0, 0.0, 0.0
    if resume:
        st = checkpoint.load(ckpt_path, map_location=dev)
        if st.get("run_id") != run_id:
            raise UserError(f"checkpoint {ckpt_path} belongs to run {st.get('run_id')}, not {run_id}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        if st["sampler"]["batch"] == micro:
            sampler.load_state_dict(st["sampler"])
        elif dist.is_main:   # only at another world size with micro_batch unset (see moebench/distributed.py)
            warnings.warn(f"resuming with micro batches of {micro} sequences, the checkpoint's were "
                          f"{st['sampler']['batch']}: model, optimizer and step resume exactly, the data "
                          f"order from here on differs from an uninterrupted run's")
        ema = EMA(**st["ema"])
        curve = st["curve"]
        start_step, wall_before, train_time_before = st["step"], st["wall_s"], st["train_s"]
        checkpoint.set_rng_state(st["rng"])

    fwd = dist.wrap(model)   # called for training; evaluation and checkpoints use the model itself
    compiled = compiled_on(tcfg, dev)
    if compiled:
        # graph breaks around mamba-ssm's kernels are fine; the MoE routing and the rest fuse
        fwd = torch.compile(fwd)
    run_dir.mkdir(parents=True, exist_ok=True)
    n_active = model.n_active_params()
    fpt = flops_per_token(cfg, n_active, tcfg.ctx)
    envd = env.collect(dev)
    peak = envd["peak_bf16_flops"] if use_bf16 else None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def save_ckpt(step: int, wall: float, train_s: float):
        if not dist.is_main:
            return
        # the sampler's position is the global number of micro batches consumed: rank-independent
        checkpoint.save(ckpt_path, {
            "run_id": run_id, "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "sampler": {**sampler.state_dict(), "step": step * accum * dist.world}, "ema": ema.state_dict(),
            "curve": curve, "wall_s": wall, "train_s": train_s, "rng": checkpoint.rng_state(),
            "model_config": cfg.to_dict(), "train_config": tcfg.to_dict(), "world": dist.world})
        _write_curve(run_dir / "curve.csv", curve)
        # what the checkpoint holds, readable without torch: a report shows a run that has one and
        # no row as interrupted rather than not run
        _write_json(run_dir / CKPT_INFO, {
            "run_id": run_id, "variant": cfg.name, "variant_hash": cfg.config_hash(), "seed": tcfg.seed,
            "step": step, "steps": steps, "tokens": step * tcfg.batch * tcfg.ctx, "train": tcfg.to_dict(),
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {})})

    def record(status: str, step: int, wall: float, train_s: float, reason: str = "") -> dict:
        tokens = step * tcfg.batch * tcfg.ctx
        last_eval = next((r for r in reversed(curve) if r.get("val_loss") is not None), {})
        last_val = last_eval.get("val_loss")
        tok_s = (tokens - curve_tokens0) / train_s if train_s > 0 and tokens > curve_tokens0 else None
        row = {
            "schema": SCHEMA, "kind": "train", "run_id": run_id, "status": status, "reason": reason,
            "variant": cfg.name, "variant_hash": cfg.config_hash(), "seed": tcfg.seed,
            "model": cfg.to_dict(),
            "train": {**tcfg.to_dict(), "compile": compiled, "lr": lr, "steps": steps, "accum": accum, "world": dist.world},
            "params": {"total": model.n_params(), "active": n_active},
            "flops_per_token": fpt, "impl": {**model.impl.to_dict(), "compile": compiled},
            "metrics": {
                "tokens": tokens, "steps": step,
                "final_smoothed_loss": ema.get() if ema.n else None,
                "final_train_loss": curve[-1]["loss"] if curve else None,
                "val_loss": last_val, "val_ppl": math.exp(last_val) if last_val is not None else None,
                "val_loss_by_source": {k[4:]: v for k, v in last_eval.items() if k.startswith("val:")},
                "tokens_per_s": tok_s,
                "mfu": tok_s * fpt / peak if tok_s and peak else None,
                "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None,
                "wall_s": wall, "epochs": tokens / max(1, data.n_train_tokens),
            },
            "data": {"dir": str(data.dir), "train_tokens": data.n_train_tokens},
            "curve": str(run_dir / "curve.csv"), "env": envd, "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(extra or {}),
        }
        if dist.is_main:
            append_record(out / "runs.jsonl", row)
            (run_dir / "result.json").write_text(json.dumps(row, indent=1, default=str))
        return row

    curve_tokens0 = start_step * tcfg.batch * tcfg.ctx
    stop = {"sig": None}

    def on_signal(signum, frame):
        # first Ctrl-C / SIGTERM: finish the step, save, stop; a second one stops at once
        if stop["sig"] is not None:
            raise KeyboardInterrupt
        stop["sig"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
        if _main_thread() else {}

    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    train_s = train_time_before
    last_ckpt = time.perf_counter()
    save_s, due = 0.0, False
    curve_written = -math.inf             # the first point is written at once
    acc = _Interval(dist)
    step = start_step
    try:
        while step < steps:
            ts = time.perf_counter()
            cur_lr = lr_at(step, steps, lr, tcfg.warmup_frac, tcfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            loss_sum = torch.zeros((), device=dev)
            for i, k in enumerate(dist.micro_batches(step, accum)):
                x, y = sampler.batch_at(k)
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                with distributed.grad_sync(fwd, last=i == accum - 1):
                    with amp():
                        o = fwd(x, y, return_logits=False, loss_chunk=default_loss_chunk(dev))
                        total = (o.loss + o.aux_loss) / accum
                    total.backward()
                loss_sum += o.loss.detach() / accum
                acc.add_moe(_moe_stats(o.moe_aux), o.aux_loss.detach())
            grad_norm = clip_grad_norm(opt, params, tcfg.grad_clip)
            loss = dist.mean(loss_sum)   # one sync per step: the NaN check and the EMA need it
            # checked before the update: a NaN/inf gradient under a finite loss must never reach
            # the weights, hence the next checkpoint (grad_norm is the same on every rank after DDP)
            if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
                wall = wall_before + time.perf_counter() - t0
                record("failed", step, wall, train_s, f"non-finite loss {loss} or gradient norm at step {step}")
                dist.barrier()   # no rank exits (and makes torchrun end the others) before the row is written
                raise TrainingFailed(f"{cfg.name}: loss became {loss} at step {step}; the last good "
                                     f"checkpoint is kept in {run_dir}")
            opt.step()
            dist.zero_grad(opt, accum)
            ema.update(loss)
            acc.add_loss(loss)
            step += 1
            train_s += time.perf_counter() - ts
            is_eval = step % eval_every_steps == 0 or step == steps
            logged = step % tcfg.log_every == 0 or is_eval
            if logged:
                row = acc.flush(step, step * tcfg.batch * tcfg.ctx, ema.get(), cur_lr)
                row["tok_s"] = (step * tcfg.batch * tcfg.ctx - curve_tokens0) / max(train_s - train_time_before, 1e-9)
                if is_eval:
                    row["val_loss"], by_source = evaluate(model, val[dist.rank::dist.world], dev, amp, dist,
                                                          val_sources)
                    row.update({f"val:{name}": v for name, v in by_source.items()})
                if dev.type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                curve.append(row)
                # curve.csv follows the run (the checkpoint rewrites it too), every few seconds so that
                # a long curve is not rewritten at every point
                if dist.is_main and time.perf_counter() - curve_written >= CURVE_EVERY_S:
                    _write_curve(run_dir / "curve.csv", curve)
                    curve_written = time.perf_counter()
                if on_progress and dist.is_main:
                    on_progress(Progress(step, steps, row["tokens"], steps * tcfg.batch * tcfg.ctx,
                                         row["loss"], row["smoothed"], row["tok_s"], row.get("val_loss")))
            # checkpoints fall on curve points, so no half-accumulated interval is lost on resume: one
            # that falls due between two points waits for the next. The clock leaves 20 save times
            # between saves, so a model slow to save spends at most ~5% of the run on it
            due = due or (ckpt_every_steps and step % ckpt_every_steps == 0) or \
                time.perf_counter() - last_ckpt >= max(60 * ckpt_minutes, 20 * save_s)
            if due and step < steps and step % tcfg.log_every == 0:
                t_save = time.perf_counter()
                save_ckpt(step, wall_before + t_save - t0, train_s)
                last_ckpt = time.perf_counter()
                save_s, due = last_ckpt - t_save, False
            if dist.any(stop["sig"] is not None, dev):   # all ranks stop together, whichever got the signal
                if not logged:
                    curve.append(acc.flush(step, step * tcfg.batch * tcfg.ctx, ema.get(), cur_lr))
                save_ckpt(step, wall_before + time.perf_counter() - t0, train_s)
                dist.barrier()   # rank 0's checkpoint is on disk before any rank exits
                raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved in {run_dir}")
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    wall = wall_before + time.perf_counter() - t0
    save_ckpt(step, wall, train_s)
    return record("done", step, wall, train_s)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _Interval:
    """Accumulates losses and MoE statistics between curve points (on device, one sync per point).
    Losses arrive already averaged over ranks; the MoE statistics are reduced over ranks at flush."""

    def __init__(self, dist: distributed.Dist = distributed.Dist()):
        self.dist = dist
        self.losses: list[float] = []
        self.moe = None
        self.lb = 0.0
        self.n = 0

    def add_loss(self, loss: float):
        self.losses.append(loss)

    def add_moe(self, stats: list[tuple], lb: torch.Tensor):
        if not stats:
            return
        if self.moe is None:
            self.moe = [[torch.zeros_like(d), torch.zeros_like(c)] for _, d, c in stats]
            self.lb = torch.zeros_like(lb)
        for acc, (_, d, c) in zip(self.moe, stats):
            acc[0] += d
            acc[1] += c
        self.lb = self.lb + lb
        self.n += 1

    def flush(self, step: int, tokens: int, smoothed: float, lr: float) -> dict:
        row = {"step": step, "tokens": tokens, "loss": sum(self.losses) / max(1, len(self.losses)),
               "smoothed": smoothed, "lr": lr}
        if self.moe is not None and self.dist.world > 1:
            self._all_reduce()
        if self.moe is not None:
            dropped = [float(d) / self.n for d, _ in self.moe]
            ent = [_entropy(c) for _, c in self.moe]
            row["lb_loss"] = float(self.lb) / self.n
            row["dropped_frac"] = sum(dropped) / len(dropped)
            row["load_entropy"] = sum(ent) / len(ent)
            for i, (d, e) in enumerate(zip(dropped, ent)):
                row[f"dropped_L{i}"] = d
                row[f"entropy_L{i}"] = e
        self.__init__(self.dist)
        return row

    def _all_reduce(self):
        # one collective: LB loss and dropped fractions become means over ranks (every rank counts
        # the same number of micro batches), tokens per expert a global count
        flat = self.dist.sum_(torch.cat([self.lb.reshape(1)] + [t.reshape(-1).float() for a in self.moe for t in a]))
        self.lb = flat[0] / self.dist.world
        i = 1
        for a in self.moe:
            a[0] = flat[i:i + a[0].numel()].reshape(a[0].shape) / self.dist.world
            i += a[0].numel()
            a[1] = flat[i:i + a[1].numel()].reshape(a[1].shape)
            i += a[1].numel()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _write_curve(path: Path, curve: list[dict]) -> None:
    if not curve:
        return
    keys = list(dict.fromkeys(k for row in curve for k in row))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(curve)
    tmp.replace(path)
