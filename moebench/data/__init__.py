"""Real English text as GPT-2 tokens: tokenizer, prepare() (text -> uint16 shards + manifest),
TokenData (memory-mapped splits), BatchSampler (random windows, resumable) and val_batches().

    from moebench.data import prepare, TokenData, BatchSampler, val_batches
    manifest = prepare(corpus="prose", max_tokens=200_000)      # idempotent; returns manifest + "dir"
    data = TokenData(manifest["dir"])
    x_BL, y_BL = BatchSampler(data, batch=8, ctx=256, seed=0).next()
"""
from moebench.data.loader import BatchSampler, Split, TokenData, ValBatch, val_batches
from moebench.data.prep import FORMAT, default_data_dir, prepare
from moebench.data.sources import CORPORA, data_root, effective_corpus, find_shared_data
from moebench.data.tokenizer import EOT, VOCAB_SIZE, Tokenizer, get_tokenizer

__all__ = ["BatchSampler", "CORPORA", "EOT", "FORMAT", "Split", "TokenData", "Tokenizer", "VOCAB_SIZE",
           "data_root", "default_data_dir", "effective_corpus", "find_shared_data", "get_tokenizer",
           "prepare", "ValBatch", "val_batches"]
