"""The Session API every runtime backend shares, written once over the backend's forward call.

A backend implements `_forward(ids, start, all_logits)`: run `ids` at positions `start ..
start + len(ids) - 1` against a KV cache that holds positions `[0, start)`, return float32 logits
`(len(ids), V)` (only the last row when `all_logits` is false). Where its cache needs it, it also
implements `_rewind(n)` (forget positions `>= n`); static caches written by position and read
through a position mask need nothing. Everything else lives here (the gpt-fast split):

- `prefill(ids)`, `decode(id)`, `extend(ids)` (several tokens at the current position: the
  speculative verifier), `rewind(n)`, `reset()`, with bounds checked before the runtime runs, so
  going past `max_seq_len` is an `EdgesmithError`, never garbage;
- `generate(ids, cfg, draft=None, draft_tokens=4)`: a streaming iterator through the one sampler
  in `runtimes.sampling`; with a draft session, speculative decoding (`runtimes.speculative`);
- `perplexity(ids, window)`: exp of the mean next-token loss computed from the runtime's own
  logits, in non-overlapping windows (see `perplexity`).

Batch size 1. This module knows nothing about files or formats; `runtimes.load` picks a backend.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import EdgesmithError
from runtimes.sampling import GenerationConfig, sample
from runtimes.speculative import speculative_generate
from runtimes.stats import GenerationStats

# Below this many weight bytes a forward is a few hundred microseconds of work, and waking (or
# spin-waiting) a second thread costs more than it saves, badly so on a loaded machine (DESIGN.md).
SMALL_MODEL_BYTES = 32 << 20


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(weight_bytes: int) -> int:
    """One thread for a tiny model, else one per core."""
    return 1 if weight_bytes < SMALL_MODEL_BYTES else cpu_cores()


class Session:
    """One loaded model and its KV cache. Subclasses set `backend` and implement `_forward`."""

    backend = "session"

    def __init__(self, max_seq_len: int, vocab_size: int, tokenizer=None, manifest: dict | None = None,
                 path=None):
        self.max_seq_len, self.vocab_size = int(max_seq_len), int(vocab_size)
        self.tokenizer, self.manifest, self.path = tokenizer, manifest, path
        self.pos = 0  # positions the cache holds
        self.stats = GenerationStats()
        self.run_options: dict = {}  # what this session runs with (threads, accuracy level, ...); set by backends

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path or ''} max_seq_len={self.max_seq_len} pos={self.pos}>"

    # ------------------------------------------------------------------------- backend hooks

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        raise NotImplementedError

    def _rewind(self, n: int) -> None:
        """Forget cached positions `>= n`. Nothing to do for a static cache written by position and
        read through a mask built from positions: entries past `n` are overwritten before they are read."""

    # ------------------------------------------------------------------------- the cache

    def reset(self) -> None:
        """Empty the KV cache: the next call starts at position 0."""
        self._rewind(0)
        self.pos = 0

    def rewind(self, n: int) -> None:
        """Keep only the first `n` cached positions (speculative decoding's rollback)."""
        if not 0 <= n <= self.pos:
            raise EdgesmithError(f"rewind: {n} is outside the cached positions 0..{self.pos}")
        self._rewind(n)
        self.pos = n

    def prefill(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Run `ids` from an empty cache; logits `(T, V)` (or `(1, V)`, the last, without `all_logits`)."""
        if len(ids) == 0:
            raise EdgesmithError("prefill: empty prompt (at least one token is needed, e.g. <|bos|>)")
        self.reset()
        return self._run(ids, all_logits)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; its logits `(V,)`."""
        return self._run([token], False)[-1]

    def extend(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Feed several tokens at the next positions in one forward; logits `(T, V)`."""
        if len(ids) == 0:
            raise EdgesmithError("extend: no tokens")
        return self._run(ids, all_logits)

    def check_room(self, n: int) -> None:
        if self.pos + n > self.max_seq_len:
            raise EdgesmithError(f"{self.pos + n} tokens exceed max_seq_len {self.max_seq_len} of this {self.backend} "
                                 f"session ({self.pos} cached + {n} new); the KV cache holds no more")

    def _run(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        ids = [int(i) for i in ids]
        self.check_room(len(ids))
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            raise EdgesmithError(f"token id {lo if lo < 0 else hi} is outside the vocabulary 0..{self.vocab_size - 1}")
        logits = self._forward(ids, self.pos, all_logits)
        self.pos += len(ids)
        return logits

    # ------------------------------------------------------------------------- generation

    def check_generation(self, prompt: Sequence[int], cfg: GenerationConfig, what: str = "") -> None:
        if len(prompt) == 0:
            raise EdgesmithError("prompt: empty (at least one token is needed, e.g. <|bos|>)")
        if len(prompt) + cfg.max_new_tokens > self.max_seq_len:
            raise EdgesmithError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                                 f"the {what or self.backend + ' session'}'s max_seq_len {self.max_seq_len}")

    def generate(self, prompt: Sequence[int], cfg: GenerationConfig | None = None, draft: Session | None = None,
                 draft_tokens: int = 4) -> Iterator[int]:
        """Stream up to `cfg.max_new_tokens` new tokens, stopping after a stop token. With `draft`, the
        draft session proposes `draft_tokens` tokens per round and this session verifies them in one
        forward; greedy output is the same either way. `self.stats` describes the run."""
        cfg = cfg or GenerationConfig()
        self.check_generation(prompt, cfg)
        if draft is not None:
            return speculative_generate(self, draft, list(prompt), cfg, draft_tokens)
        return self._generate(list(prompt), cfg)

    def _generate(self, prompt: list[int], cfg: GenerationConfig) -> Iterator[int]:
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt))
        generator = cfg.generator()
        history = list(prompt)
        t0 = time.perf_counter()
        logits = self.prefill(prompt, all_logits=False)[-1]
        for i in range(cfg.max_new_tokens):
            token = sample(torch.from_numpy(logits), cfg, generator, history)
            elapsed = time.perf_counter() - t0
            if i == 0:
                stats.prefill_s = elapsed
            else:
                stats.decode_s += elapsed
            stats.new_tokens += 1
            yield token
            if token in cfg.stop_tokens:
                return
            history.append(token)
            if i + 1 < cfg.max_new_tokens:
                t0 = time.perf_counter()
                logits = self.decode(token)

    # ------------------------------------------------------------------------- quality

    def perplexity(self, ids: Sequence[int], window: int | None = None, progress: bool = False) -> float:
        """exp(mean next-token cross-entropy) of `ids` under this runtime's own logits.

        Longer inputs than `window` (default and maximum: `max_seq_len`) are cut into
        non-overlapping windows of `window` tokens, consecutive windows sharing one boundary token,
        so that every token after the first is predicted exactly once (W - 1 predictions per full
        window, the remainder in a shorter last window). Each window is a fresh prefill from an
        empty cache: a window's first tokens see only the context inside it. With `window = L + 1`
        this scores what `toolchain.evaluate.perplexity` scores with `seq_len = L`. `progress` shows
        a bar over the windows (on stderr).
        """
        W = window or self.max_seq_len
        if not 2 <= W <= self.max_seq_len:
            raise EdgesmithError(f"perplexity window {W}: must be in 2..{self.max_seq_len} (this session's "
                                 "max_seq_len)")
        ids = [int(i) for i in ids]
        if len(ids) < 2:
            raise EdgesmithError(f"perplexity: needs at least 2 tokens, got {len(ids)}")
        nll, count = 0.0, 0
        starts = range(0, len(ids) - 1, W - 1)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"perplexity ({self.backend})", unit="window", leave=False)
        for start in starts:
            chunk = ids[start:start + W]
            logits = torch.from_numpy(self.prefill(chunk))[:-1].double()
            nll += float(F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
            count += len(chunk) - 1
        self.reset()
        return math.exp(nll / count)

    def close(self) -> None:
        """Release the runtime's resources (optional; garbage collection does the same)."""
