"""Build a TensorRT engine (`.plan`) from the TensorRT-ready ONNX, through the TensorRT Python API.

ONNX parser -> network (strongly typed: the ONNX already says which tensors are fp16, fp32 or
Q/DQ int8, so no precision flags can silently change them) -> two optimization profiles, one for
the prefill shapes (any prompt length, empty cache) and one for one-token decodes against a
cache of 1 .. max_seq_len-1 positions -> serialized plan. It runs wherever `tensorrt` imports
(a Jetson, a GPU host); `unavailable_reason()` says why it cannot run here. This module imports
only the standard library and, lazily, `tensorrt`, so it type-checks alone against the
published `tensorrt-stubs` (see tests/toolchain/export/test_tensorrt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import EdgesmithError

Shape = tuple[int, ...]
MinOptMax = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class EngineShapes:
    max_seq_len: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    opt_prompt: int = 128

    def profiles(self) -> dict[str, dict[str, MinOptMax]]:
        """{profile: {input: (min, opt, max)}} for the plain decoder graph's inputs (batch 1)."""
        S, kv, hd = self.max_seq_len, self.n_kv_heads, self.head_dim
        opt_prompt = min(self.opt_prompt, S)
        prefill: dict[str, MinOptMax] = {"input_ids": ((1, 1), (1, opt_prompt), (1, S))}
        decode: dict[str, MinOptMax] = {"input_ids": ((1, 1), (1, 1), (1, 1))}
        for name in self.cache_inputs():
            prefill[name] = ((1, kv, 0, hd),) * 3  # prefill starts from an empty cache
            decode[name] = ((1, kv, 1, hd), (1, kv, max(1, S // 2), hd), (1, kv, S - 1, hd))
        return {"prefill": prefill, "decode": decode}

    def cache_inputs(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]


def unavailable_reason() -> str | None:
    """None when a TensorRT builder can run here, else one line saying why not."""
    try:
        import tensorrt as trt
    except ImportError:
        return "engine not built: the tensorrt Python package is not installed on this machine"
    if not hasattr(trt, "Builder"):  # e.g. only type stubs on the path
        return "engine not built: `tensorrt` imports but has no Builder (stubs only?)"
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        return f"engine not built: tensorrt {trt.__version__} is too old; allowed: 10.x or newer"
    return None


def build_engine(onnx_path: Path, plan_path: Path, shapes: EngineShapes, workspace_bytes: int = 1 << 30,
                 sparse_weights: bool = False) -> int:
    """Parse `onnx_path`, build with the prefill and decode profiles, write `plan_path`; returns its bytes.

    `sparse_weights`: let TensorRT pick 2:4 structured-sparse GEMM tactics (Ampere and later, Jetson
    Orin) for weights that follow the pattern -- set for models pruned with `prune:method=2:4`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgesmithError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for profile_shapes in shapes.profiles().values():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes.items():
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
    serialized: Any = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgesmithError(f"{onnx_path}: TensorRT failed to build the engine (see the log above)")
    data = bytes(memoryview(serialized))
    plan_path.write_bytes(data)
    return len(data)
