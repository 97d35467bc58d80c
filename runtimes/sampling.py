"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

One implementation shared by every backend, so a seed gives the same tokens wherever the logits
agree. It knows nothing about models or caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import EdgesmithError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise EdgesmithError(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise EdgesmithError(f"temperature: {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise EdgesmithError(f"top_k: {self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EdgesmithError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise EdgesmithError(f"repetition_penalty: {self.repetition_penalty} must be > 0")

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def penalize(logits: torch.Tensor, cfg: GenerationConfig, history: list[int] | None) -> torch.Tensor:
    """A float copy of logits `(V,)` with the repetition penalty applied to the tokens in `history`."""
    logits = logits.float().clone()  # never write into the caller's (or a runtime's) buffer
    if cfg.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
    return logits


def probabilities(logits: torch.Tensor, cfg: GenerationConfig, history: list[int] | None = None) -> torch.Tensor:
    """The distribution `sample` draws from when `cfg.temperature > 0`: penalty, temperature, top-k,
    top-p, softmax. Speculative decoding compares the target's and the draft's with it."""
    if cfg.temperature == 0:
        raise EdgesmithError("probabilities: greedy decoding (temperature 0) has no sampling distribution")
    logits = penalize(logits, cfg, history) / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= cfg.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator,
           history: list[int] | None = None) -> int:
    """logits `(V,)` -> one token id."""
    if cfg.temperature == 0:
        return int(torch.argmax(penalize(logits, cfg, history)))
    return int(torch.multinomial(probabilities(logits, cfg, history), 1, generator=generator))
