"""Streaming generation with the torch model and its static KV cache.

`prefill` runs the prompt once, `decode_one_token` feeds one token at its position; the cache is
written by index and never grows. The Session API of the runtimes wraps these; this module knows
nothing about tokenizers or files.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models.errors import EdgesmithError
from models.llama import Transformer
from runtimes.sampling import GenerationConfig, sample


def prefill(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Run the prompt from position 0; return the logits of its last position `(V,)`."""
    tokens = torch.tensor([ids], dtype=torch.long)
    return model(tokens, torch.arange(len(ids)))[0, -1]


def decode_one_token(model: Transformer, token: int, pos: int) -> torch.Tensor:
    return model(torch.tensor([[token]], dtype=torch.long), torch.tensor([pos]))[0, -1]


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield up to `cfg.max_new_tokens` new tokens, stopping after a stop token."""
    if not prompt:
        raise EdgesmithError("prompt: empty (at least one token is needed, e.g. <|bos|>)")
    total = len(prompt) + cfg.max_new_tokens
    if total > model.config.max_seq_len:
        raise EdgesmithError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                             f"the model's max_seq_len {model.config.max_seq_len}")
    if model.cache_len < total:
        model.setup_cache(1, total)
    model.reset_cache()
    generator = cfg.generator()
    history = list(prompt)
    logits = prefill(model, prompt)
    for i in range(cfg.max_new_tokens):
        token = sample(logits, cfg, generator, history)
        yield token
        if token in cfg.stop_tokens:
            return
        history.append(token)
        if i + 1 < cfg.max_new_tokens:
            logits = decode_one_token(model, token, len(history) - 1)
