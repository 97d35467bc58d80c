"""ExecuTorch backend for a .pte artifact directory, through `executorch.runtime`.

Checks the manifest's sha256 values and the program's header against the file's size
(runtimes.headers.pte_header), loads the program with ExecuTorch's full flatbuffer verification
(`Verification.InternalConsistency`, asked for explicitly: `executorch.runtime` defaults to it, its
pybindings' `_load_program` to `Minimal`, which checks only the identifier) and its
`forward(tokens (1, T), input_pos)` (T dynamic in 1..`options.max_tokens_per_call`, longer calls go in chunks of
that many; artifacts from before take max_seq_len): `input_pos` `(1,)` holding the first
position (manifest `options.input_pos = "start"`, the Llama runner's convention, what our exporter writes)
or `(T,)` every position (artifacts from before). The kernels of the custom op libraries the manifest names
(`options.custom_ops`: "llama", ExecuTorch's LLM ops) are loaded before the program. The KV cache lives in
the program's mutable buffers, written at the given positions, and persists between calls; `reset` and
`rewind` only move the position, because attention never reads past the positions of the current call
(ExecuTorch's static-cache runners do the same). A sliding layer's cache may be a ring (manifest
`options.ring_cache`): a rewind of more than one call's tokens is refused there. `n_threads` resizes
ExecuTorch's process-wide XNNPACK threadpool (the llama runner's `_unsafe_reset_threadpool`); by
default it is left as the runtime sized it. No sampling (the Session does it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.errors import EdgesmithError
from models.registry import BACKENDS
from runtimes.artifact import read_manifest
from runtimes.headers import pte_header
from runtimes.native_stderr import captured
from runtimes.probe import load_custom_ops, positions, probe
from runtimes.session import Session

RUNTIME_PACKAGE = "executorch"


@BACKENDS.register("executorch", formats=("executorch",))
class ExecuTorchSession(Session):
    backend = "executorch"

    def __init__(self, directory: str | Path, n_threads: int | None = None, tokenizer=None):
        from executorch.runtime import Runtime, Verification

        directory = Path(directory)
        manifest = read_manifest(directory, "executorch")
        if n_threads is not None:
            if n_threads < 1:
                raise EdgesmithError(f"n_threads: {n_threads} must be >= 1")
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(n_threads)
        program = directory / manifest["entry"]
        options = manifest["options"]
        method = options.get("method", "forward")
        self.input_pos = options.get("input_pos", "positions")  # "start": (1,), the Llama runner's convention
        if self.input_pos not in ("start", "positions"):
            raise EdgesmithError(f"{directory / 'manifest.json'}: options.input_pos {self.input_pos!r}; "
                                 "allowed: start, positions")
        custom_ops = options.get("custom_ops", [])
        if not isinstance(custom_ops, list):
            raise EdgesmithError(f"{directory / 'manifest.json'}: options.custom_ops must be a list")
        load_custom_ops(custom_ops)
        pte_header(program)
        # a program this machine has not seen run is run once in a child first: ExecuTorch aborts the process
        # on some programs its verification passes (runtimes/probe.py)
        probe(program, manifest["files"][manifest["entry"]]["sha256"], method, custom_ops=custom_ops,
              input_pos=self.input_pos)
        # a corrupt program: ExecuTorch prints its own line to stderr and raises a bare RuntimeError
        # with an error code; both go into our one line
        log = None
        try:
            with captured() as log:
                self.program = Runtime.get().load_program(program, verification=Verification.InternalConsistency)
                self.method = self.program.load_method(method)
        except (RuntimeError, KeyError, MemoryError) as e:  # KeyError: no such method in the program
            native = f": {log.line()}" if log and log.text.strip() else ""
            raise EdgesmithError(f"{program}: ExecuTorch could not load the program "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:200]}){native}") from None
        self.program_path = program
        self.per_call = int(options.get("max_tokens_per_call", options["max_seq_len"]))  # longer: in chunks
        self.ring = options.get("ring_cache")  # sliding layers on a ring of window + per_call positions
        self.written = -1  # the furthest position written since the last reset (a ring's stale slots)
        super().__init__(int(manifest["options"]["max_seq_len"]), int(manifest["model"]["vocab_size"]), tokenizer,
                         manifest, directory)
        self.run_options = {"n_threads": n_threads} if n_threads is not None else {}  # else ExecuTorch's own pool

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        if len(ids) > self.per_call:  # the program takes at most this many tokens per call: prefill in chunks
            n = self.per_call
            parts = [self._forward(ids[i:i + n], start + i, all_logits) for i in range(0, len(ids), n)]
            return np.concatenate(parts) if all_logits else parts[-1]
        tokens = torch.tensor([ids], dtype=torch.long)
        input_pos = positions(start, len(ids), self.input_pos)
        self.written = max(self.written, start + len(ids) - 1)
        try:
            (logits,) = self.method.execute((tokens, input_pos))
        except (RuntimeError, ValueError, TypeError) as e:  # a program that loaded but cannot run these inputs
            raise EdgesmithError(f"{self.program_path}: ExecuTorch could not run the program "
                                 f"({' '.join(str(e).split())[:200]})") from None
        logits = logits[0] if all_logits else logits[0, -1:]
        return logits.float().numpy()


    def _rewind(self, n: int) -> None:
        """A ring (toolchain/export/executorch_lowering.RingKVCache) masks stale slots up to per_call positions past
        the new end; a longer rewind would leave some in a window: refused (a reset leaves none)."""
        if n == 0:
            self.written = -1
        elif self.ring and self.written > n + self.per_call:
            raise EdgesmithError(f"rewind: to {n} from {self.written + 1} positions; this program's sliding layers keep "
                                 f"{self.ring['positions']} positions, a rewind of at most {self.per_call} (reset and "
                                 "prefill instead)")


ExecuTorchBackend = ExecuTorchSession  # the name the exporter's parity check uses
