"""Streaming generation straight from a torch model (no files): `generate(model, prompt, cfg)`.

A thin wrapper over the torch Session (`runtimes.backends.torch.TorchSession`), kept for callers that hold a
model rather than a checkpoint path (the demo). The model's static KV cache is set up to its
`max_seq_len`; its weights are not touched. This module knows nothing about tokenizers or files.
"""

from __future__ import annotations

from collections.abc import Iterator

from models.llama import Transformer
from runtimes.backends.torch import TorchSession
from runtimes.sampling import GenerationConfig


def generate(model: Transformer, prompt: list[int], cfg: GenerationConfig) -> Iterator[int]:
    """Yield up to `cfg.max_new_tokens` new tokens, stopping after a stop token."""
    return TorchSession(model).generate(prompt, cfg)
