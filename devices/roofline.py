"""The decode roofline of an exported artifact: bytes it reads per token, from its manifest.

Every Linear (lm_head included; a tied head reads the embedding table) at the precision the
artifact stores it in, plus the KV cache at the context reached. How each format stores a b-bit
group-g weight: b/8 bytes of code plus one scale per group, the scale fp16 in GGUF (Q4_0/Q8_0's
`d`) and ExecuTorch, and the artifact's float precision in ONNX (MatMulNBits, Q/DQ) and TensorRT.
Float weights take the artifact's precision. The KV cache takes the runtime's element size:
llama.cpp's session follows the artifact's precision, llama-bench keeps f16, and an int8 KV
scheme stores one byte; a run that reports its KV cache type (runtime option `kv_cache`: f32, f16) uses that. The embedding row read per token is ignored (one row of `dim`).
"""

from __future__ import annotations

from devices.planner import keeps_window, kv_cache_bytes
from devices.shapes import linear_shapes
from models.llama import ModelConfig

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
KV_TYPE_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}  # llama.cpp cache types (block scale included)
SCALE_BYTES = {"gguf": 2, "executorch": 2}  # others: the artifact's float precision


def weight_bytes_per_token(manifest: dict) -> float:
    fmt = manifest.get("format")
    precision_bytes = PRECISION_BYTES.get(manifest.get("precision"), 4)
    scheme = (manifest.get("quantization") or {}).get("weights") or {}
    cfg = model_config(manifest)
    total = 0.0
    for name, (o, i) in linear_shapes(cfg).items():
        q = scheme.get(name) or (scheme.get("model.embed_tokens") if name == "lm_head" and cfg.tie_embeddings
                                 else None)
        if q:
            scale = SCALE_BYTES.get(fmt, precision_bytes)
            total += o * i * (int(q["bits"]) / 8 + scale / int(q.get("group_size", 32)))
        else:
            total += o * i * precision_bytes
    return total


def kv_bytes_per_element(manifest: dict, runner: str = "agent", kv_cache: str | None = None) -> float:
    if kv_cache in KV_TYPE_BYTES:
        return KV_TYPE_BYTES[kv_cache]
    kv = (manifest.get("quantization") or {}).get("kv_cache")
    if kv:
        return 1
    if runner == "llama-bench":
        return 2
    return PRECISION_BYTES.get(manifest.get("precision"), 4)


def bytes_per_token(manifest: dict, context: float, runner: str = "agent", kv_cache: str | None = None) -> float:
    """Bytes read to decode one token with `context` tokens in the cache."""
    cfg = model_config(manifest)
    kv = kv_bytes_per_element(manifest, runner, kv_cache)
    return weight_bytes_per_token(manifest) + kv_cache_bytes(cfg, context, kv,
                                                             windows=keeps_window(manifest.get("format"), cfg))


def model_config(manifest: dict) -> ModelConfig:
    return ModelConfig.from_dict(manifest["model"], "manifest.json")


def decode_bound(manifest: dict, bandwidth_bytes_s: float, prompt_len: int, gen_len: int,
                 runner: str = "agent", kv_cache: str | None = None) -> tuple[float, float]:
    """(tok/s bound, bytes per token) at the mean context of a decode run: prompt + half the tokens;
    `kv_cache`: the cache type the run reported (None: as the module docstring says)."""
    read = bytes_per_token(manifest, prompt_len + gen_len / 2, runner, kv_cache)
    return bandwidth_bytes_s / read, read

