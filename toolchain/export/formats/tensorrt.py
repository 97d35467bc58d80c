"""TensorRT export: a TensorRT-ready ONNX, then the engine where TensorRT is installed.

The ONNX is the plain standard-op decoder graph (opset 17: ops TensorRT's ONNX parser takes; no
ONNX Runtime contrib ops), fp32 or fp16, with the KV cache as explicit inputs and outputs.
Quantized Linears become block-wise DequantizeLinear of int4/int8 codes + MatMul (opset 21), the
Q/DQ form TensorRT 10 builds as INT4/INT8 weight-only GEMMs; a quantized token embedding is the same
block-wise DequantizeLinear of its table, then Gather (TensorRT's INT4 weight-only path is documented
for GEMMs: whether a builder keeps the gathered table in INT4 or folds it to float is its choice,
either way the values are our `scale * code`; not verified here, no TensorRT on this machine).
Where `tensorrt` imports, `tensorrt_engine.build_engine` turns it into `model.plan` with prefill
and decode optimization profiles; elsewhere export stops after the ONNX and says so in one line
(and in the manifest). The parity check runs the same ONNX in ONNX Runtime, since that is the
graph the engine is built from; the engine itself is checked on the machine that builds it.
"""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import Checkpoint
from runtimes.backends.onnxruntime import OnnxRuntimeBackend
from toolchain.export.formats.onnx import save_onnx
from toolchain.export.onnx_graph import plain_graph
from toolchain.export.spec import FormatSpec, quantization_scheme, refuse_int8_kv_cache, register_format
from toolchain.export.tensorrt_engine import EngineShapes, build_engine, unavailable_reason

ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    refuse_int8_kv_cache(ckpt.model, "tensorrt")
    c = ckpt.config
    model = plain_graph(ckpt.model, cfg.precision, max_seq_len)
    files = save_onnx(model, tmp / ONNX_FILE)
    shapes = EngineShapes(max_seq_len=max_seq_len, n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim)
    options = {"graph": "plain", "onnx_file": ONNX_FILE, "opset": model.opset_import[0].version,
               "external_data": len(files) > 1,
               "profiles": {k: {n: list(map(list, v)) for n, v in p.items() if n == "input_ids" or n.endswith("0.key")}
                            for k, p in shapes.profiles().items()}}
    reason = unavailable_reason()
    quant = quantization_scheme(ckpt, {4: "INT4 weight-only (block-wise Q/DQ)", 8: "INT8 weight-only (block-wise Q/DQ)"},
                                {4: "INT4 block-wise DQ + Gather", 8: "INT8 block-wise DQ + Gather"})
    # 2:4-pruned weights (prune:method=2:4 in the lineage): TensorRT's sparse tactics can use them.
    sparse = any(p.get("kind") == "prune" and (p.get("config") or {}).get("method") == "2:4"
                 for p in ckpt.meta.get("lineage", {}).get("passes", []))
    options["sparse_weights"] = sparse
    if reason is None:
        build_engine(tmp / ONNX_FILE, tmp / PLAN_FILE, shapes, sparse_weights=sparse)
        return {"entry": PLAN_FILE, "options": {**options, "engine": PLAN_FILE}, "quantization": quant}
    return {"entry": ONNX_FILE, "options": {**options, "engine": None, "engine_skipped": reason},
            "quantization": quant, "notice": f"tensorrt: {reason}; wrote the TensorRT-ready {ONNX_FILE}"}


def _backend(directory: Path, **options):
    return OnnxRuntimeBackend(directory, fmt="tensorrt", **options)


register_format(FormatSpec(name="tensorrt", precisions=("fp32", "fp16"), write=write, backend=_backend,
                           runtime_package="onnxruntime", quant_exact=True,
                           toolkit="tensorrt", estimate_s=8.0))
