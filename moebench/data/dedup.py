"""Near-duplicate documents, found before the split: a document at least THRESHOLD of whose shingles
(SHINGLE consecutive words, lowercased, punctuation stripped) also occur in a larger document is
dropped, and the larger one is kept. Words, not tokens: the same text rendered twice (HTML and
texinfo) differs in whitespace, quotes and line breaks, which change its tokens but not its words. That catches a copy of a page, and a page that a larger manual repeats
(the Python HTML docs inside python3.11.info), which a symmetric similarity (Jaccard, MinHash)
between documents of very different sizes would not.

Consistent sampling keeps it small: only the shingles whose hash falls in 1/SAMPLE of the hash space
are compared, the same shingles in every document, so a document's containment is estimated from
about a 1/SAMPLE of its shingles. The owner of a shingle is the largest document that has it (ties:
the first in corpus order); a document is covered where another document owns its shingle.
Deterministic: a word's id is its BLAKE2b hash, a shingle's a fixed polynomial over them.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

SHINGLE = 8                   # words per shingle
SAMPLE = 16                   # one shingle hash in SAMPLE is compared
THRESHOLD = 0.5               # the share of a document's sampled shingles that larger ones own
MIN_SAMPLED = 4               # fewer sampled shingles than this: too short to judge, kept
_MULT = np.uint64(0x9E3779B97F4A7C15)     # odd constants (the golden ratio's and splitmix64's)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


_NOT_WORD = re.compile(r"[\W_]+")


class WordIds:
    """Stable 64-bit ids of normalised words (cached: a corpus repeats its words)."""

    def __init__(self):
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        ids = []
        for w in text.split():
            v = self.cache.get(w)
            if v is None:
                norm = _NOT_WORD.sub("", w.lower())
                v = self.cache[w] = int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(),
                                                   "little") if norm else 0
            if v:
                ids.append(v)
        return np.array(ids, dtype=np.uint64)


def sampled_shingles(ids: np.ndarray) -> np.ndarray:
    """The distinct sampled shingle hashes of one document's word ids (uint64)."""
    n = len(ids) - SHINGLE + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    x = ids.astype(np.uint64)
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):                    # arithmetic modulo 2**64, on purpose
        for j in range(SHINGLE):
            h = h * _MULT + x[j:j + n] + np.uint64(1)
        h ^= h >> np.uint64(31)
        h *= _MIX
        h ^= h >> np.uint64(29)
    return np.unique(h[h % np.uint64(SAMPLE) == 0])


@dataclass(frozen=True)
class Duplicate:
    doc: int                  # index in the corpus order
    covered: float            # share of its sampled shingles that larger documents have
    by: int                   # the document that owns most of them


def near_duplicates(shingles: list[np.ndarray], sizes: list[int]) -> list[Duplicate]:
    """The documents to drop, in corpus order, from each one's sampled shingles and size."""
    n = len(sizes)
    # rank 0 = the largest document; ties keep corpus order
    order = sorted(range(n), key=lambda i: (-sizes[i], i))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    hashes = np.concatenate(shingles) if shingles else np.zeros(0, np.uint64)
    owner_doc = np.repeat(np.arange(n), [len(s) for s in shingles])
    ranks = rank[owner_doc]
    by_hash = np.lexsort((ranks, hashes))               # grouped by hash, the best rank first
    h_sorted, r_sorted = hashes[by_hash], ranks[by_hash]
    first = np.ones(len(h_sorted), bool)
    first[1:] = h_sorted[1:] != h_sorted[:-1]
    group = np.cumsum(first) - 1
    owner_rank = r_sorted[first][group]                 # the owner's rank, for every (hash, doc) entry
    owner = np.empty(len(hashes), np.int64)
    owner[by_hash] = owner_rank
    out = []
    start = 0
    for i, s in enumerate(shingles):
        o = owner[start:start + len(s)]
        start += len(s)
        if len(s) < MIN_SAMPLED:
            continue
        others = o[o != rank[i]]
        covered = len(others) / len(s)
        if covered >= THRESHOLD:
            by_rank = np.bincount(others).argmax()
            out.append(Duplicate(i, covered, int(order[by_rank])))
    return out
