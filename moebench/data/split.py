"""Train / validation split by chunks: every document (EOT + its tokens) is cut into chunks of at most
CHUNK_TOKENS (smaller in a small source, so that its validation share takes several chunks: see
chunk_tokens), and each source's validation chunks are drawn at random (seeded by the source's name)
until they hold val_frac of its tokens. So every source has validation tokens in its own proportion,
a long document (a whole manual) lends a few of its chunks to validation instead of all or none of
itself, and train and validation see document starts (EOT) at the same rate. Which chunks go where
depends only on the corpus and the seed: the same input gives the same shards, byte for byte.
"""
from __future__ import annotations

import hashlib

import numpy as np

from moebench.data.tokenizer import EOT

CHUNK_TOKENS = 8192
MIN_CHUNK_TOKENS = 256
VAL_CHUNKS = 16              # a source's validation share spans at least about this many chunks
SPLIT_SEED = 0


def chunk_tokens(source_tokens: int, val_frac: float) -> int:
    """The chunk size of a source: CHUNK_TOKENS, or less where its validation share would be only a
    few chunks (then a chunk more or less would move the share far from val_frac)."""
    return int(min(CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, val_frac * source_tokens / VAL_CHUNKS)))


def chunk(doc_ids: np.ndarray, size: int = CHUNK_TOKENS, eot: int = EOT) -> list[np.ndarray]:
    """EOT + the document's tokens, in consecutive pieces of at most `size` tokens."""
    seq = np.concatenate([np.array([eot], np.uint16), doc_ids.astype(np.uint16)])
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def pick_val(sizes: list[int], val_frac: float, source: str) -> np.ndarray:
    """Booleans, one per chunk of `source`: True for validation. Chunks in a random order (seeded by
    the source's name) join validation while it holds less than val_frac of the source's tokens; a
    source of two or more chunks gives at least one when val_frac > 0."""
    val = np.zeros(len(sizes), bool)
    if val_frac <= 0 or len(sizes) < 2:
        return val
    seed = int.from_bytes(hashlib.sha256(f"{SPLIT_SEED}:{source}".encode()).digest()[:8], "little")
    target, held = val_frac * sum(sizes), 0
    for i in np.random.default_rng(seed).permutation(len(sizes)):
        if held >= target or (held and held + sizes[i] / 2 > target):   # stop nearest the target
            break
        val[i] = True
        held += sizes[i]
    return val


def split_stats(counts: dict[str, dict[str, int]], boundaries: dict[str, int]) -> dict:
    """What the manifest records of a split: each split's source mix and their total-variation
    distance, and the document starts (EOT) per 1,000 tokens of each split."""
    totals = {s: sum(c[s] for c in counts.values()) for s in ("train", "val")}
    mix = {s: {name: c[s] / totals[s] if totals[s] else 0.0 for name, c in counts.items()} for s in totals}
    tvd = 0.5 * sum(abs(mix["train"][n] - mix["val"][n]) for n in counts)
    per_1k = {s: 1000 * boundaries[s] / totals[s] if totals[s] else None for s in totals}
    return {"source_mix": mix, "source_mix_tvd": tvd, "doc_starts_per_1k_tokens": per_1k}
