"""The train / validation split (moebench/data/split.py) and the near-duplicate filter
(moebench/data/dedup.py), through prepare() on synthetic corpora: the split's statistics hold, a
planted near-duplicate is removed and recorded, the same input gives byte-identical shards."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moebench.data import prepare
from moebench.data.dedup import WordIds, near_duplicates, sampled_shingles
from moebench.data.split import chunk, chunk_tokens, pick_val
from moebench.data.tokenizer import EOT
from test_data import WORDS, stream           # tests/ is on sys.path (prepend mode)


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_DATA", str(tmp_path / "data"))


def text(rng: np.random.Generator, words: int, tag: str) -> str:
    return f"{tag}. " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + "."


def corpus(folder, rng) -> None:
    """Three sources (folders) unlike each other: many short documents, two long ones, medium ones."""
    for name, n, words in (("short", 600, 80), ("long", 2, 70_000), ("mid", 100, 800)):
        (folder / name).mkdir(parents=True)
        docs = (text(rng, words, f"{name} {i}") for i in range(n))
        (folder / name / "docs.txt").write_text("\n<|endoftext|>\n".join(docs))


def test_split_keeps_the_source_mix_and_the_document_starts(tmp_path):
    corpus(tmp_path / "in", np.random.default_rng(0))
    m = prepare(tmp_path / "in", tmp_path / "out", val_frac=0.05, progress=False)
    assert list(m["sources"]) == ["long/*.txt", "mid/*.txt", "short/*.txt"]
    for name, s in m["sources"].items():                  # every source has val tokens, near its share
        share = s["tokens"]["val"] / sum(s["tokens"].values())
        assert 0.04 < share < 0.06, (name, share)
    st = m["split"]
    assert st["source_mix_tvd"] <= 0.02, st
    starts = st["doc_starts_per_1k_tokens"]
    assert abs(starts["val"] / starts["train"] - 1) <= 0.2, starts
    # the long documents lend chunks to val; no document goes whole to one side of a larger share
    assert m["sources"]["long/*.txt"]["chunks"]["val"] >= 8 and m["sources"]["long/*.txt"]["docs"]["val"] <= 1
    # each source's range of the val stream, in order, covering it
    ranges = m["splits"]["val"]["sources"]
    assert [ranges[n][1] - ranges[n][0] for n in m["sources"]] == [s["tokens"]["val"] for s in m["sources"].values()]
    assert ranges["long/*.txt"][0] == 0 and ranges["short/*.txt"][1] == len(stream(tmp_path / "out", "val"))
    assert "val_frac" in m["split_rule"] and m["near_duplicates"]["docs"] == 0


def test_a_planted_near_duplicate_is_removed_and_recorded(tmp_path, capsys):
    rng = np.random.default_rng(1)
    docs = [text(rng, 400, f"Page {i}") for i in range(30)]
    copy = docs[7].replace(" river ", " stream ", 2)           # a copy with a small edit
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("\n<|endoftext|>\n".join(docs))
    (folder / "b.txt").write_text(copy + "\n<|endoftext|>\n" + text(rng, 400, "Other"))
    m = prepare(folder, tmp_path / "out", val_frac=0.1, progress=False)
    dup = m["near_duplicates"]
    assert dup["docs"] == 1 and dup["tokens"] > 300
    assert dup["examples"][0]["by_doc"] == 7 or dup["examples"][0]["doc"] == 7
    assert "dropped 1 near-duplicate documents" in capsys.readouterr().err
    both = np.concatenate([stream(tmp_path / "out", "train"), stream(tmp_path / "out", "val")])
    assert (both == EOT).sum() == 31                           # 32 documents less the copy
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["near_duplicates"] == dup


def test_the_same_input_gives_byte_identical_shards(tmp_path):
    corpus(tmp_path / "in", np.random.default_rng(2))
    a = prepare(tmp_path / "in", tmp_path / "a", val_frac=0.02, progress=False, workers=2)
    b = prepare(tmp_path / "in", tmp_path / "b", val_frac=0.02, progress=False, workers=1)
    files = sorted(p.name for p in (tmp_path / "a").glob("*.bin"))
    assert files and files == sorted(p.name for p in (tmp_path / "b").glob("*.bin"))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["splits"] == b["splits"] and a["split"] == b["split"]


def test_chunks_and_val_picks():
    ids = np.arange(1000, dtype=np.uint16)
    pieces = chunk(ids, 256)
    assert [len(p) for p in pieces] == [256, 256, 256, 233] and pieces[0][0] == EOT
    assert np.array_equal(np.concatenate(pieces)[1:], ids)
    assert chunk_tokens(100_000_000, 0.01) == 8192 and chunk_tokens(1000, 0.01) == 256
    assert chunk_tokens(1_000_000, 0.01) == 625 and chunk_tokens(10_000_000, 0.01) == 6250
    val = pick_val([100] * 200, 0.05, "s")
    assert val.sum() == 10 and np.array_equal(val, pick_val([100] * 200, 0.05, "s"))     # seeded by name
    assert not np.array_equal(val, pick_val([100] * 200, 0.05, "another source"))
    assert pick_val([100], 0.05, "s").sum() == 0 and pick_val([100] * 3, 0.0, "s").sum() == 0
    assert pick_val([100] * 3, 0.01, "s").sum() == 1                 # a source of several chunks gives one


def test_near_duplicates_on_words():
    rng = np.random.default_rng(0)
    words = WordIds()
    vocab = [f"w{i}" for i in range(5000)]

    def doc(n):
        return [vocab[j] for j in rng.integers(0, len(vocab), n)]
    base = [doc(n) for n in (3000, 600, 2000)]
    manual = base[0] + doc(4000)                                      # holds doc 0
    edited = list(base[2][100:1600])
    edited[::50] = ["changed"] * len(edited[::50])                    # every 50th word changed
    # the same page rendered otherwise: other case, quotes and line breaks; same words
    restyled = "\n".join(f'"{w.upper()}",' for w in base[1])
    texts = [" ".join(d) for d in base] + [restyled, " ".join(edited), " ".join(manual), "too short"]
    got = {(d.doc, d.by) for d in near_duplicates([sampled_shingles(words(t)) for t in texts],
                                                   [len(t) for t in texts])}
    # doc 0 is inside the larger manual (5); 1 is 3 restyled, which is the larger (quotes, case) and
    # stays; 4 is an edited piece of 2
    assert got == {(0, 5), (1, 3), (4, 2)}
