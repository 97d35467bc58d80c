"""ExecuTorch backend for a .pte artifact directory, through `executorch.runtime`.

Checks the manifest's sha256 values, loads the program's `forward(tokens (1, T), input_pos (T,))`
and exposes `prefill(ids) -> (T, V)`, `decode(id) -> (V,)`, `reset()`. The KV cache lives in the
program's mutable buffers and persists between calls; `reset` only rewinds the position, because
the causal mask built from `input_pos` never lets attention read past what was written. No
sampling, no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import EdgesmithError
from runtimes.artifact import read_manifest

RUNTIME_PACKAGE = "executorch"


class ExecuTorchBackend:
    def __init__(self, directory: str | Path):
        from executorch.runtime import Runtime

        directory = Path(directory)
        self.manifest = read_manifest(directory, "executorch")
        self.max_seq_len = int(self.manifest["options"]["max_seq_len"])
        self.program = Runtime.get().load_program(directory / self.manifest["entry"])
        self.method = self.program.load_method(self.manifest["options"].get("method", "forward"))
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run `ids` from position 0; logits `(T, V)` of every position."""
        if not ids:
            raise EdgesmithError("prefill: empty prompt (at least one token is needed)")
        self.reset()
        return self._run(ids)

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; its logits `(V,)`."""
        return self._run([int(token)])[0]

    def _run(self, ids: list[int]) -> np.ndarray:
        T = len(ids)
        if self.pos + T > self.max_seq_len:
            raise EdgesmithError(f"{self.pos + T} tokens exceed the artifact's max_seq_len {self.max_seq_len}")
        tokens = torch.tensor([ids], dtype=torch.long)
        input_pos = torch.arange(self.pos, self.pos + T, dtype=torch.long)
        (logits,) = self.method.execute((tokens, input_pos))
        self.pos += T
        return logits[0].float().numpy()
