"""The cached tokenizer of a corpus, shared by the trainer, the benchmarks and the pipeline.

`edgesmith run` is the recipe pipeline now (toolchain/recipe.py, toolchain/pipeline.py, the bundled
`recipes/demo.toml`); this module keeps only what the first version of the main job had that other
code imports: a byte-level BPE tokenizer trained once per (corpus content, vocabulary size) and
cached under $EDGESMITH_CACHE/tokenizers.
"""

from __future__ import annotations

import hashlib
import shutil

from models.atomic import temp_dir_for
from models.tokenizer import Tokenizer, train_tokenizer
from toolchain.data import Corpus, cache_root


def cached_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Train a tokenizer on the train split once per (corpus content, vocab size)."""
    key = hashlib.sha256(f"{corpus.fingerprint()}\0{vocab_size}".encode()).hexdigest()[:24]
    out = cache_root() / "tokenizers" / key
    if not (out / "tokenizer.json").is_file():
        tok = train_tokenizer(corpus.texts("train"), vocab_size, length=len(corpus.train))
        tmp = temp_dir_for(out)  # and sweeps what a killed run left half-written
        tok.save(tmp)
        try:
            tmp.rename(out)
        except OSError:  # made concurrently by another process
            shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(out)
