"""llama.cpp backend for a GGUF artifact directory, through llama-cpp-python's low-level C API.

Checks the manifest's sha256 values, then `llama_model_load_from_file` + `llama_init_from_model`
with one sequence of `max_seq_len` positions and a batch as large, and runs each call as one
`llama_batch` through `llama_decode`, asking for logits only where they are used (every position
for `prefill`/`extend`, the last one for decodes and for generation's prefill); they are read
with `llama_get_logits`. `rewind(n)` removes positions >= n from the KV cache with
`llama_memory_seq_rm` (speculative rollback); `reset` clears the memory.

Threads: `n_threads` defaults to one for tiny models and one per core otherwise
(`runtimes.session.default_threads`): this llama.cpp build parallelizes with OpenMP, whose threads
spin-wait between the many tiny ops of a small model, which collapses its speed on a loaded
machine (DESIGN.md). `flash_attn` is off by default (llama-cpp-python's default; the llama.cpp CLI
turns it on): it changes the order of the attention sums, and the export parity check runs
without it. `kv_cache` is the cache's type: by default F32 for an fp32 artifact (llama.cpp defaults to
F16) so that it computes what the fp32 reference computes, F16 otherwise; "f16" halves the cache
traffic of long contexts. No sampling, no tokenizer (the Session has both).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.errors import EdgesmithError
from models.registry import BACKENDS
from runtimes.artifact import artifact_bytes, read_manifest
from runtimes.headers import gguf_header
from runtimes.session import Session, default_threads

RUNTIME_PACKAGE = "llama-cpp-python"
KV_TYPES = ("f32", "f16")
_backend_ready = False


@BACKENDS.register("llamacpp", formats=("gguf",))
class LlamaCppSession(Session):
    backend = "llamacpp"

    def __init__(self, directory: str | Path, n_threads: int | None = None, flash_attn: bool = False,
                 n_ctx: int | None = None, kv_cache: str | None = None, tokenizer=None, verbose: bool = False):
        import llama_cpp as lc

        if kv_cache is not None and kv_cache not in KV_TYPES:
            raise EdgesmithError(f"kv_cache {kv_cache!r}; allowed: {', '.join(KV_TYPES)} "
                                 "(default: f32 for fp32 artifacts)")

        global _backend_ready
        self.lc = lc
        self._model = self._ctx = self._batch = None
        directory = Path(directory)
        manifest = read_manifest(directory, "gguf")
        S = int(n_ctx or manifest["options"]["max_seq_len"])
        self.n_threads = n_threads or default_threads(artifact_bytes(manifest))
        self.flash_attn = bool(flash_attn)
        # llama-cpp-python prints llama.cpp's log through this logger. Quiet unless `verbose`: failures
        # surface as exceptions here, and a context longer than a tiny model's training length logs
        # an ERROR line for what is only a note (n_ctx is padded to 256).
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.CRITICAL + 1)
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True
        check_gguf(directory / manifest["entry"], manifest.get("model"))
        mparams = lc.llama_model_default_params()
        self._model = lc.llama_model_load_from_file(str(directory / manifest["entry"]).encode(), mparams)
        if not self._model:
            raise EdgesmithError(f"{directory / manifest['entry']}: llama.cpp could not load the model")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = S
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv_cache = kv_cache or ("f32" if manifest["precision"] == "fp32" else "f16")
        cparams.type_k = cparams.type_v = lc.GGML_TYPE_F32 if kv_cache == "f32" else lc.GGML_TYPE_F16
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise EdgesmithError(f"{directory}: llama.cpp could not create a context of {S} positions")
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(S, 0, 1)
        vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        super().__init__(S, vocab, tokenizer, manifest, directory)
        self.run_options = {"n_threads": self.n_threads, "flash_attn": self.flash_attn, "kv_cache": kv_cache}

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        lc, b, T = self.lc, self._batch, len(ids)
        b.n_tokens = T
        for i, token in enumerate(ids):
            b.token[i] = token
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == T - 1
        rc = lc.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {T} tokens at position {start}")
        rows = T if all_logits else 1
        out = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx), shape=(rows * self.vocab_size,))
        return out.reshape(rows, self.vocab_size).copy()  # the buffer is reused by the next call

    def _rewind(self, n: int) -> None:
        if n == 0:
            self.lc.llama_memory_clear(self._memory, True)
        elif not self.lc.llama_memory_seq_rm(self._memory, 0, n, -1):
            raise RuntimeError(f"llama_memory_seq_rm could not remove positions >= {n}")

    def close(self) -> None:
        lc = self.lc
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        if getattr(self, "lc", None) is not None:
            self.close()


GGUF_HPARAMS = {"llama.block_count": "n_layers", "llama.embedding_length": "dim",
                "llama.feed_forward_length": "ffn_dim", "llama.attention.head_count": "n_heads",
                "llama.attention.head_count_kv": "n_kv_heads", "llama.vocab_size": "vocab_size"}


def check_gguf(path: Path, model: dict | None = None) -> None:
    """Refuse, naming the file, the corruptions llama.cpp aborts the whole process on (GGML_ASSERT)
    instead of failing the load: a header whose counts, lengths or offsets do not fit the file
    (runtimes.headers, checked before gguf-py maps anything), an unreadable GGUF structure, a token
    listed twice, hyperparameters that differ from the model config the manifest records."""
    import gguf

    gguf_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... on a corrupt file
        detail = (str(e).splitlines() or [""])[0][:120]
        raise EdgesmithError(f"{path}: not a readable GGUF file ({type(e).__name__}: {detail})") from None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        # llama.cpp reads each token text as a C string: one cut short by a NUL byte can duplicate another
        texts = [bytes(tokens.parts[i]).split(b"\0", 1)[0] for i in tokens.data]
        if len(set(texts)) != len(texts):
            raise EdgesmithError(f"{path}: tokenizer.ggml.tokens lists a token twice, as llama.cpp reads them "
                                 "(up to a NUL byte; corrupt file)")
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "llama"
    for key, name in GGUF_HPARAMS.items() if isinstance(model, dict) else ():
        key = key.replace("llama.", f"{arch}.", 1)
        field = reader.fields.get(key)
        value = field.contents() if field is not None else None
        if name in model and value != model[name]:
            raise EdgesmithError(f"{path}: {key} is {value!r}, manifest.json records {name}={model[name]!r} "
                                 "(corrupt or replaced file)")


LlamaCppBackend = LlamaCppSession  # the name the exporter's parity check uses
