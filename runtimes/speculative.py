"""Speculative decoding: a draft session proposes k tokens, the target verifies them in one forward.

Each round (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"):

1. the draft feeds the last emitted token (plus any accepted tokens it has not seen) and proposes
   `d1..dk` one decode at a time, sampling with the same `GenerationConfig` as the target;
2. the target runs `[last, d1..dk]` as ONE multi-token forward at its current position
   (`Session.extend`), giving the distribution after each prefix;
3. greedy: `d_i` is accepted while it equals the target's own greedy choice after `d1..d(i-1)`;
   the first mismatch is replaced by the target's token, and when all k match the target's next
   token is a bonus. Sampled: `d_i` is accepted with probability min(1, p(d_i) / q(d_i)); on
   rejection the token is drawn from normalize(max(p - q, 0)). That keeps the target's
   distribution exactly, so sampled output has the same law as plain sampling but (drawing
   different random numbers) not the same tokens for a seed;
4. both caches are rolled back to the accepted length (`Session.rewind`: a position reset for
   static caches, `llama_memory_seq_rm` in llama.cpp, a slice for growing caches).

Greedy speculative output is the target's greedy output token for token: every emitted token is
the target's argmax after exactly the emitted prefix. Probabilities come from
`runtimes.sampling.probabilities`, the sampler's own distribution. This module holds no backend code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from models.errors import EdgesmithError
from runtimes.sampling import GenerationConfig, probabilities, sample
from runtimes.stats import GenerationStats

class Session(Protocol):
    """What speculative decoding uses of a `runtimes.session.Session`, named here rather than imported:
    the session module imports this one for `generate(draft=...)`."""
    vocab_size: int
    max_seq_len: int
    pos: int
    tokenizer: object
    stats: GenerationStats

    def prefill(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray: ...
    def extend(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray: ...
    def decode(self, token: int) -> np.ndarray: ...
    def rewind(self, n: int) -> None: ...
    def check_generation(self, prompt: Sequence[int], cfg: GenerationConfig, what: str = "") -> None: ...
    def generate(self, prompt: Sequence[int], cfg: GenerationConfig | None = None, draft=None,
                 draft_tokens: int = 4) -> Iterator[int]: ...


def check_compatible(target: Session, draft: Session) -> None:
    if draft is target:
        raise EdgesmithError("--draft: the draft must be another session than the target (it keeps its own cache)")
    if draft.vocab_size != target.vocab_size:
        raise EdgesmithError(f"--draft: vocabulary of {draft.vocab_size} tokens, the target has {target.vocab_size} "
                             "(draft and target must share a tokenizer)")
    fingerprints = [getattr(s.tokenizer, "fingerprint", None) for s in (target, draft)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise EdgesmithError("--draft: its tokenizer.json differs from the target's (draft and target must share a "
                             "tokenizer)")


def speculative_generate(target: Session, draft: Session, prompt: list[int], cfg: GenerationConfig,
                         k: int) -> Iterator[int]:
    """Stream tokens as `target.generate` would, proposing `k` tokens per round with `draft`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EdgesmithError(f"--draft-tokens: {k!r} must be an integer >= 1")
    check_compatible(target, draft)
    draft.check_generation(prompt, cfg, "draft session")
    return _rounds(target, draft, prompt, cfg, k)


def _rounds(target: Session, draft: Session, prompt: list[int], cfg: GenerationConfig, k: int) -> Iterator[int]:
    stats = target.stats = GenerationStats(prompt_tokens=len(prompt), draft_tokens=k)
    generator = cfg.generator()
    history = list(prompt)
    t0 = time.perf_counter()
    last = sample(torch.from_numpy(target.prefill(prompt, all_logits=False)[-1]), cfg, generator, history)
    draft.prefill(prompt, all_logits=False)
    stats.prefill_s = time.perf_counter() - t0
    unseen: list[int] = []  # accepted tokens the draft has not fed yet
    while True:
        stats.new_tokens += 1
        yield last
        if last in cfg.stop_tokens or stats.new_tokens == cfg.max_new_tokens:
            return
        history.append(last)
        t0 = time.perf_counter()
        n = min(k, cfg.max_new_tokens - stats.new_tokens - 1)  # this round emits at most n + 1 tokens
        base = target.pos  # the target has fed everything but `last`
        proposed, q = _propose(draft, unseen + [last], n, cfg, generator, history, stats)
        rows = target.extend([last, *proposed])
        stats.target_forwards += 1
        emitted = _verify(rows, proposed, q, cfg, generator, history)
        accepted = len(emitted) - 1
        stats.rounds += 1
        stats.proposed += n
        stats.accepted += accepted
        target.rewind(base + 1 + accepted)  # keep `last` and the accepted proposals
        draft.rewind(min(draft.pos, base + 1 + accepted))
        unseen = [last, *proposed[:accepted]][draft.pos - base:]
        stats.decode_s += time.perf_counter() - t0
        for token in emitted[:-1]:
            stats.new_tokens += 1
            yield token
            if token in cfg.stop_tokens:
                return
            history.append(token)
        last = emitted[-1]


def _propose(draft: Session, feed: list[int], n: int, cfg: GenerationConfig, generator: torch.Generator,
             history: list[int], stats: GenerationStats) -> tuple[list[int], list[torch.Tensor | None]]:
    """n draft tokens and, when sampling, the draft's distribution each was drawn from."""
    proposed: list[int] = []
    q: list[torch.Tensor | None] = []
    for i in range(n):
        logits = draft.extend(feed, all_logits=False)[-1] if i == 0 else draft.decode(proposed[-1])
        stats.draft_forwards += 1
        seen = history + proposed
        if cfg.temperature == 0:
            proposed.append(sample(torch.from_numpy(logits), cfg, generator, seen))
            q.append(None)
        else:
            dist = probabilities(torch.from_numpy(logits), cfg, seen)
            proposed.append(int(torch.multinomial(dist, 1, generator=generator)))
            q.append(dist)
    return proposed, q


def _verify(rows: np.ndarray, proposed: list[int], q: list[torch.Tensor | None], cfg: GenerationConfig,
            generator: torch.Generator, history: list[int]) -> list[int]:
    """The accepted proposals followed by one token of the target's own: the correction or the bonus."""
    out: list[int] = []
    for i, token in enumerate(proposed):
        logits = torch.from_numpy(rows[i])
        seen = history + out
        if cfg.temperature == 0:
            choice = sample(logits, cfg, generator, seen)
            if choice != token:
                return out + [choice]
        else:
            p, qi = probabilities(logits, cfg, seen), q[i]
            ratio = float(p[token] / qi[token])
            if float(torch.rand((), generator=generator)) >= ratio:
                residual = (p - qi).clamp_min(0)
                residual = residual / residual.sum() if float(residual.sum()) > 0 else p
                return out + [int(torch.multinomial(residual, 1, generator=generator))]
        out.append(token)
    return out + [sample(torch.from_numpy(rows[len(proposed)]), cfg, generator, history + out)]


def compare_speculative(target: Session, draft: Session, prompt: list[int], cfg: GenerationConfig,
                        k: int) -> dict:
    """Run plain and speculative generation on the same prompt; tokens, stats and the speedup
    (speculative / plain decode tokens per second, both excluding the prefill)."""
    plain = list(target.generate(prompt, cfg))
    plain_stats = target.stats
    spec = list(target.generate(prompt, cfg, draft=draft, draft_tokens=k))
    spec_stats = target.stats
    plain_rate = plain_stats.decode_tokens_per_s
    speedup = spec_stats.decode_tokens_per_s / plain_rate if plain_rate > 0 else float("nan")
    return {"plain": plain, "speculative": spec, "identical": plain == spec, "plain_stats": plain_stats,
            "speculative_stats": spec_stats, "acceptance_rate": spec_stats.acceptance_rate, "speedup": speedup}
