"""Quality of a model on a token file: perplexity, and the unigram baseline it must beat.

Works on the torch model with a full causal forward over non-overlapping windows. It does not
load checkpoints or corpora; the CLI does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import EdgesmithError
from models.llama import Transformer


@torch.no_grad()
def perplexity(model: Transformer, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None,
               batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over windows of `seq_len` predictions."""
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    n_windows = n // seq_len
    if n_windows == 0:
        raise EdgesmithError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        rows = [tokens[w * seq_len: w * seq_len + seq_len + 1].astype(np.int64)
                for w in range(start, min(start + batch_size, n_windows))]
        batch = torch.from_numpy(np.stack(rows))
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `val` of token frequencies counted on `train` (add-one smoothed)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-logp[np.asarray(val, dtype=np.int64)].mean())
