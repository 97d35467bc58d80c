"""TensorRT backend for a TensorRT artifact directory (`model.plan`, built by the exporter where
`tensorrt` imports), through the TensorRT Python API.

The engine is the plain decoder graph with two optimization profiles (toolchain/export
tensorrt_engine.EngineShapes): 0 = prefill (any prompt length, empty cache), 1 = one-token decode
against a cache of 1 .. max_seq_len - 1 positions. One execution context runs both, switching
profile with `set_optimization_profile_async` when the call kind changes. Device memory is torch
CUDA tensors: per cache tensor two preallocated buffers of `max_seq_len` positions; the graph reads
`past` (P positions) from one and writes `present` (P + T) into the other, then they swap roles,
so nothing is allocated or copied by us per token (the graph's own Concat writes `present`). The
logits go to one preallocated `(1, max_seq_len, V)` buffer and only the rows used are copied to
the host. `rewind(n)` copies the first n positions into the other buffer (a contiguous
`(1, kv, n, hd)` is not a prefix of `(1, kv, P, hd)`).

A multi-token call at a nonzero position has no profile, so a TensorRT session cannot be the
target of speculative decoding (it can be the draft). Where `tensorrt` does not import (no GPU
here) the constructor says so in one line; the artifact's TensorRT-ready ONNX then runs with
`runtimes.load(path, backend="onnxruntime")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import EdgesmithError
from models.registry import BACKENDS
from runtimes.artifact import read_manifest
from runtimes.session import Session

RUNTIME_PACKAGE = "tensorrt"
PREFILL, DECODE = 0, 1  # optimization profile indices, in the order the exporter adds them


def unavailable_reason() -> str | None:
    """None when a TensorRT engine can run here, else one line saying why not."""
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt Python package is not installed on this machine"
    if not hasattr(trt, "Runtime"):
        return "`tensorrt` imports but has no Runtime (type stubs only?)"
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch (TensorRT needs a GPU)"
    return None


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
    if dtype not in table:
        raise EdgesmithError(f"tensorrt engine: tensor type {dtype} is not supported by this runtime")
    return table[dtype]


@BACKENDS.register("tensorrt", formats=("tensorrt",))
class TensorRTSession(Session):
    backend = "tensorrt"

    def __init__(self, directory: str | Path, tokenizer: Any = None, device: int = 0) -> None:
        directory = Path(directory)
        manifest = read_manifest(directory, "tensorrt")
        plan = manifest["options"].get("engine")
        if not plan:
            raise EdgesmithError(f"{directory}: no TensorRT engine in this artifact "
                                 f"({manifest['options'].get('engine_skipped', 'not built')}); run its "
                                 "TensorRT-ready ONNX with backend='onnxruntime'")
        reason = unavailable_reason()
        if reason is not None:
            raise EdgesmithError(f"tensorrt backend: {reason}; run the artifact's TensorRT-ready ONNX with "
                                 "backend='onnxruntime'")
        import tensorrt as trt

        self.trt = trt
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((directory / plan).read_bytes())
        if self.engine is None:
            raise EdgesmithError(f"{directory / plan}: TensorRT could not deserialize the engine (built for "
                                 "another TensorRT version or GPU?)")
        if self.engine.num_optimization_profiles < 2:
            raise EdgesmithError(f"{directory / plan}: expected the prefill and decode optimization profiles, "
                                 f"found {self.engine.num_optimization_profiles}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        S, cfg = int(manifest["options"]["max_seq_len"]), manifest["model"]
        super().__init__(S, int(cfg["vocab_size"]), tokenizer, manifest, directory)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.cache_names = [n.removeprefix("past_key_values.") for n in names if n.startswith("past_key_values.")]
        self.kv_shape = (int(cfg["n_kv_heads"]), int(cfg.get("head_dim_override") or cfg["dim"] // cfg["n_heads"]))
        size = self.kv_shape[0] * S * self.kv_shape[1]
        dtype = torch_dtype(trt, self.engine.get_tensor_dtype(f"past_key_values.{self.cache_names[0]}"))
        # two flat buffers per cache tensor: [reading, writing]
        self.buffers = {n: [torch.zeros(size, dtype=dtype, device=self.device) for _ in range(2)]
                        for n in self.cache_names}
        self.logits = torch.empty(S * self.vocab_size, dtype=torch.float32, device=self.device)
        self.input_ids = torch.zeros(S, dtype=torch.int64, device=self.device)
        self.profile: int | None = None

    def _view(self, flat: torch.Tensor, length: int) -> torch.Tensor:
        kv, hd = self.kv_shape
        return flat[: kv * length * hd].view(1, kv, length, hd)

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        T = len(ids)
        if start == 0:
            profile = PREFILL
        elif T == 1:
            profile = DECODE
        else:
            raise EdgesmithError(f"tensorrt engine: no optimization profile for {T} tokens at position {start} "
                                 "(prefill from 0 and one-token decodes only); it cannot verify speculative drafts")
        ctx, stream = self.context, self.stream.cuda_stream
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, stream)
            self.profile = profile
        self.input_ids[:T].copy_(torch.tensor(ids, dtype=torch.int64))
        ctx.set_input_shape("input_ids", (1, T))
        ctx.set_tensor_address("input_ids", self.input_ids.data_ptr())
        for n, (past, present) in self.buffers.items():
            ctx.set_input_shape(f"past_key_values.{n}", tuple(self._view(past, start).shape))
            ctx.set_tensor_address(f"past_key_values.{n}", past.data_ptr())
            ctx.set_tensor_address(f"present.{n}", present.data_ptr())
        ctx.set_tensor_address("logits", self.logits.data_ptr())
        with torch.cuda.device(self.device):
            torch.cuda.current_stream().synchronize()  # the host-to-device copies above
            if not ctx.execute_async_v3(stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {T} tokens at position {start}")
            self.stream.synchronize()
        for pair in self.buffers.values():
            pair.reverse()  # present (start + T positions) is the next call's past
        rows = self.logits[: T * self.vocab_size].view(T, self.vocab_size)
        return (rows if all_logits else rows[-1:]).cpu().numpy()

    def _rewind(self, n: int) -> None:
        if n == 0:
            return  # the prefill profile reads an empty past
        for pair in self.buffers.values():
            past, other = pair
            self._view(other, n).copy_(self._view(past, self.pos)[:, :, :n])
            pair.reverse()
