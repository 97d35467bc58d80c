"""llama.cpp backend (through llama-cpp-python) for a GGUF artifact directory.

Loads `model.gguf` after checking the manifest's sha256 values, and exposes the minimal backend
contract the export parity check and the Session API build on: `prefill(ids)` returns the logits
of every prompt position `(T, V)`, `decode(id)` feeds one token and returns `(V,)`, `reset()`
empties the KV cache. It does no sampling and knows nothing about tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import EdgesmithError
from runtimes.artifact import read_manifest

RUNTIME_PACKAGE = "llama-cpp-python"


class LlamaCppBackend:
    def __init__(self, directory: str | Path, n_threads: int = 1, flash_attn: bool = False,
                 n_ctx: int | None = None):
        import llama_cpp

        directory = Path(directory)
        self.manifest = read_manifest(directory, "gguf")
        self.max_seq_len = int(n_ctx or self.manifest["options"]["max_seq_len"])
        # logits_all: prefill returns every position's logits, which the parity check compares.
        # n_threads=1 by default: on tiny models OpenMP spin-waiting across threads costs more than it saves.
        # llama.cpp keeps the KV cache in F16 by default; an fp32 artifact gets an F32 cache so that
        # it computes what the fp32 reference computes.
        kv_type = llama_cpp.GGML_TYPE_F32 if self.manifest["precision"] == "fp32" else llama_cpp.GGML_TYPE_F16
        self.llm = llama_cpp.Llama(str(directory / self.manifest["entry"]), n_ctx=self.max_seq_len,
                                   n_batch=self.max_seq_len, n_ubatch=self.max_seq_len, logits_all=True,
                                   n_threads=n_threads, n_threads_batch=n_threads, flash_attn=flash_attn,
                                   type_k=kv_type, type_v=kv_type, verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run `ids` from an empty cache; logits `(T, V)` of every position."""
        if not ids:
            raise EdgesmithError("prefill: empty prompt (at least one token is needed)")
        self._check_room(len(ids))
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; its logits `(V,)`."""
        self._check_room(1)
        self.llm.eval([int(token)])
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def _check_room(self, n: int) -> None:
        if self.llm.n_tokens + n > self.max_seq_len:
            raise EdgesmithError(f"{self.llm.n_tokens + n} tokens exceed the artifact's max_seq_len {self.max_seq_len}")
