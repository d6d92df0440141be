"""Reading prepared tokens: TokenData opens a folder, BatchSampler draws training batches the way
the paper's code does (windows of ctx+1 tokens at uniformly random offsets into the train stream;
x = window[:-1], y = window[1:]), val_batches() gives a fixed held-out set, source by source.

Shapes: B batch (sequences), L = ctx (tokens per sequence).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from moebench.data.prep import FORMAT
from moebench.errors import UserError


class Split:
    """One split's token stream: its shards read as one array, memory-mapped (never loaded whole)."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])   # start of each shard in the stream

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream, across shard boundaries, as a new array."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) outside a stream of {len(self)}")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        lo = start - int(self.starts[i])
        if lo + n <= len(self.shards[i]):
            return np.array(self.shards[i][lo:lo + n])
        parts = []
        while n > 0:
            part = self.shards[i][lo:lo + n]
            parts.append(part)
            n -= len(part)
            i, lo = i + 1, 0
        return np.concatenate(parts)


def prepare_command(folder: Path) -> str:
    """The command that (re)builds `folder`, with its corpus or input when its manifest names them."""
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        m = {}
    m = m if isinstance(m, dict) else {}
    source = f"--corpus {m['corpus']}" if m.get("corpus") else f"--input {m.get('input') or 'YOUR_TEXT_FOLDER'}"
    return f"moebench data prepare {source} --out {folder}"


class TokenData:
    """A folder written by prepare(): `train` and `val` splits, the `manifest`, `n_train_tokens`.
    Every shard's size is checked against the manifest; `verify=True` also checks its sha256."""

    def __init__(self, folder: str | Path, *, verify: bool = False):
        self.dir = Path(folder).expanduser().absolute()
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise UserError(f"no prepared data in {self.dir} (no manifest.json): prepare it first: {prepare_command(self.dir)}")
        try:
            self.manifest = json.loads(path.read_text())
            fmt, splits = self.manifest["format"], self.manifest["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is corrupt ({e}): prepare the data again: {prepare_command(self.dir)}") from None
        if fmt != FORMAT:
            raise UserError(f"{self.dir} was prepared in format {fmt}; this moebench reads format {FORMAT}: prepare it "
                            f"again: {prepare_command(self.dir)}")
        self.train = self._open(splits["train"]["shards"], verify)
        self.val = self._open(splits["val"]["shards"], verify)
        self.n_train_tokens, self.n_val_tokens = len(self.train), len(self.val)
        self.eot = self.manifest["eot"]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]

    def _open(self, shards: list[dict], verify: bool) -> Split:
        arrays = []
        for shard in shards:
            path = self.dir / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["bytes"]:
                raise UserError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                                f"{shard['bytes']}: the data is incomplete or corrupt, prepare it again: {prepare_command(self.dir)}")
            if verify:
                with open(path, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != shard["sha256"]:
                        raise UserError(f"{path}: sha256 differs from the manifest's: prepare the data again: "
                                        f"{prepare_command(self.dir)}")
            arrays.append(np.memmap(path, dtype="<u2", mode="r") if shard["bytes"] else np.zeros(0, np.uint16))
        return Split(arrays)

    def __repr__(self) -> str:
        return f"TokenData({str(self.dir)!r}, train={self.n_train_tokens:,}, val={self.n_val_tokens:,})"


def _windows(split: Split, starts: np.ndarray, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    w_BL1 = torch.from_numpy(np.stack([split.read(int(s), ctx + 1) for s in starts]).astype(np.int64))
    return w_BL1[:, :-1].contiguous(), w_BL1[:, 1:].contiguous()


def _need(split: Split, ctx: int, name: str):
    if len(split) < ctx + 1:
        raise UserError(f"the {name} split has {len(split):,} tokens, fewer than ctx + 1 = {ctx + 1}: "
                        f"prepare more data (or a larger val_frac) or use a shorter context")


class BatchSampler:
    """Training batches: `batch` windows of ctx+1 tokens at uniformly random offsets into the train
    stream; x_BL = window[:-1], y_BL = window[1:] (int64). Batch number `step` of rank `rank` is a
    pure function of (seed, rank, step), so state_dict() / load_state_dict() resume exactly and each
    rank reads its own stream. `batch` is per rank and per next() call: with `world` ranks the
    global batch is the ranks' batches together."""

    def __init__(self, data: TokenData, batch: int, ctx: int, seed: int = 0, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        _need(data.train, ctx, "train")
        self.data, self.batch, self.ctx, self.seed, self.rank, self.world = data, batch, ctx, seed, rank, world
        self.step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        starts = rng.integers(0, len(self.data.train) - self.ctx, size=self.batch)   # window end <= stream end
        return _windows(self.data.train, starts, self.ctx)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        xy = self.batch_at(self.step)
        self.step += 1
        return xy

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rank": self.rank, "world": self.world,
                "batch": self.batch, "ctx": self.ctx}

    def load_state_dict(self, state: dict):
        if (state["batch"], state["ctx"]) != (self.batch, self.ctx):
            raise UserError(f"the checkpoint's batches were batch={state['batch']}, ctx={state['ctx']}; "
                            f"this run has batch={self.batch}, ctx={self.ctx}: they must match to resume")
        self.step, self.seed = state["step"], state["seed"]


class ValBatch(NamedTuple):
    x: torch.Tensor            # (B, L) int64
    y: torch.Tensor            # (B, L) int64, x shifted by one
    source: str                # every window of a batch lies in this source's part of the val stream


def val_batches(data: TokenData, n_batches: int, batch: int, ctx: int, seed: int = 1234) -> list[ValBatch]:
    """A fixed held-out set of about n_batches * batch windows (the same on every call). Each window
    lies inside one source's range of the val stream (the manifest's), the sources in proportion to
    their val tokens, at least one each, stratified within the range; batched source by source (a
    source's last batch may be short), so a batch's loss is its source's. A source with fewer than
    ctx + 1 val tokens gets none. Multi-GPU: give rank r the batches [r::world]."""
    _need(data.val, ctx, "val")
    ranges = data.manifest["splits"]["val"].get("sources") or {"all": [0, len(data.val)]}
    fits = {name: (a, b) for name, (a, b) in ranges.items() if b - a >= ctx + 1}
    if not fits:
        raise UserError(f"no source has ctx + 1 = {ctx + 1} val tokens in a row: prepare more data (or a larger "
                        f"val_frac) or use a shorter context")
    n = n_batches * batch
    total = sum(b - a for a, b in fits.values())
    out = []
    for k, (name, (a, b)) in enumerate(fits.items()):
        n_s = max(1, round(n * (b - a) / total))
        span = b - a - ctx                                       # possible window starts in the source
        rng = np.random.default_rng([seed, n, k])
        lo = np.arange(n_s) * span // n_s
        hi = np.maximum((np.arange(n_s) + 1) * span // n_s, lo + 1)
        starts = a + rng.integers(lo, hi)                        # one start per stratum
        out += [ValBatch(*_windows(data.val, starts[i:i + batch], ctx), name) for i in range(0, n_s, batch)]
    return out
