"""The token stream a run reads, split among ranks by position.

The flat train token file is cut into windows of `seq_len + 1` tokens (stride `seq_len`); each epoch
visits every window once in an order fixed by (seed, epoch). A run's data position is the number of
windows consumed so far. Step s consumes the next `global_batch` windows; rank r of W takes rows
`(a * W + r) * micro_batch ...` for accumulation step a, so ranks read distinct slices and the
global batch -- not the process count -- decides what the model sees. Resuming is setting the
position. This module does not tokenize or shuffle documents.
"""

from __future__ import annotations

import numpy as np
import torch

from models.errors import EdgesmithError


class TokenStream:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise EdgesmithError(f"--seq-len: the train split has {len(tokens)} tokens, fewer than "
                                 f"seq_len + 1 = {seq_len + 1}")
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.n_windows))
        return self._order[1]

    def windows(self, position: int, count: int) -> torch.Tensor:
        """Windows `position .. position + count` of the stream: `(count, seq_len + 1)` int64."""
        rows = []
        for p in range(position, position + count):
            epoch, i = divmod(p, self.n_windows)
            start = int(self._epoch_order(epoch)[i]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return torch.from_numpy(np.stack(rows))

    def micro_batch(self, position: int, accum_step: int, rank: int, world: int,
                    micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets `(micro_batch, seq_len)` of one rank at one accumulation step."""
        offset = (accum_step * world + rank) * micro_batch
        w = self.windows(position + offset, micro_batch)
        return w[:, :-1], w[:, 1:]
