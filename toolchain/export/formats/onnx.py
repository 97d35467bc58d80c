"""ONNX export: a decoder with the KV cache as explicit inputs/outputs, for ONNX Runtime.

By default the fused graph (GroupQueryAttention holding the cache, RotaryEmbedding,
Simplified/SkipSimplifiedLayerNormalization); `--no-fuse` writes the plain standard-op graph. Both
are built by `onnx_graph` from the same weights, fp32 or fp16, and are parity-checked through
`runtimes.backends.onnxruntime`. Quantized Linears keep their codes exactly: MatMulNBits (bits 4/8, block =
group size) in the fused graph, block-wise DequantizeLinear (opset 21) in the plain one; a quantized
token embedding is GatherBlockQuantized (fused) or DequantizeLinear + Gather (plain). Models
whose weights pass EXTERNAL_DATA_BYTES are saved with external data (`model.onnx.data`), since a
protobuf file cannot exceed 2 GB. This module does not optimize graphs with ORT's transformers
optimizer: the fused ops are written directly.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from models.checkpoint import Checkpoint
from runtimes.backends.onnxruntime import OnnxRuntimeBackend
from toolchain.export.onnx_graph import fused_graph, plain_graph
from toolchain.export.spec import EMBEDDING, FormatSpec, quantization_scheme, refuse_int8_kv_cache, register_format

FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_BYTES = 1 << 30


def save_onnx(model: onnx.ModelProto, path: Path, check: bool = True,
              external_data_bytes: int | None = None) -> list[str]:
    """Save (and check) the graph; weights go to `<name>.data` beside it past the threshold.

    The ONNX checker knows only standard ops: SimplifiedLayerNormalization is an ONNX Runtime op
    registered in the default domain, so the fused graph is validated by loading it in ONNX
    Runtime (the parity check) instead.
    """
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > (EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
    if check:
        onnx.checker.check_model(str(path))  # by path, so that external data is checked too
    return [path.name] + ([f"{path.name}.data"] if external else [])


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    refuse_int8_kv_cache(ckpt.model, "onnx")
    graph = "fused" if cfg.fuse else "plain"
    build = fused_graph if cfg.fuse else plain_graph
    model = build(ckpt.model, cfg.precision, max_seq_len)
    files = save_onnx(model, tmp / FILE, check=not cfg.fuse)
    stored = {4: "MatMulNBits bits=4", 8: "MatMulNBits bits=8"} if cfg.fuse else \
        {4: "DequantizeLinear int4 (block-wise)", 8: "DequantizeLinear int8 (block-wise)"}
    embedding = {4: "GatherBlockQuantized bits=4", 8: "GatherBlockQuantized bits=8"} if cfg.fuse else \
        {4: "DequantizeLinear int4 (block-wise) + Gather", 8: "DequantizeLinear int8 (block-wise) + Gather"}
    return {"entry": FILE, "options": {"graph": graph, "onnx_file": FILE, "external_data": len(files) > 1,
                                       "opset": model.opset_import[0].version},
            "quantization": quantization_scheme(ckpt, stored, embedding)}


def runtime_options(ckpt: Checkpoint, cfg) -> dict:
    """Quantized Linears run as MatMulNBits at accuracy level 4 (int8 activations, integer dot products: ONNX
    Runtime's fast CPU path, the numerics family of llama.cpp's Q4_0 x Q8_0); the parity check holds the artifact
    to the quantized thresholds then, as GGUF's are. Float graphs need no option."""
    weights = (ckpt.meta.get("quantization") or {}).get("weights") or {}
    return {"accuracy_level": 4} if any(name != EMBEDDING for name in weights) else {}


register_format(FormatSpec(name="onnx", precisions=("fp32", "fp16"), write=write, backend=OnnxRuntimeBackend,
                           runtime_package="onnxruntime", quant_exact=lambda options: not options.get("accuracy_level"),
                           runtime_options=runtime_options, toolkit="onnxruntime", estimate_s=6.0))
