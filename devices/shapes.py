"""What the planner needs to know about a model: its shape, and how each weight is stored.

`resolve_model` accepts a `ModelConfig`, a named size (nano, micro, small), a well-known public
shape (PUBLIC: Llama-2-7B, TinyLlama-1.1B, Llama-3.2-1B/3B, Llama-3.1-8B, Qwen2.5-0.5B, Qwen3-0.6B,
SmolLM2-135M, Mistral-7B, Phi-3-mini-4k, Gemma-2-2B, Gemma-3-1B / 270M, from their published
config.json files), a checkpoint directory (config.json + edgesmith.json, whose quantization
section gives each Linear's bits) or an exported artifact directory (manifest.json). Weights are
never loaded. Counting bytes is `devices.planner`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from models.checkpoint import from_hf_config
from models.errors import EdgesmithError
from models.llama import SIZES, ModelConfig

# Published Hugging Face config.json values (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, intermediate_size, vocab_size, max_position_embeddings, rope_theta,
# tie_word_embeddings):
#   meta-llama/Llama-2-7b-hf, TinyLlama/TinyLlama-1.1B-Chat-v1.0, meta-llama/Llama-3.2-1B,
#   meta-llama/Llama-3.2-3B, meta-llama/Llama-3.1-8B
PUBLIC: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                              max_seq_len=4096),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                                  max_seq_len=2048),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True),
    "llama-3.2-3b": ModelConfig(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                                max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                max_seq_len=131072, rope_theta=500000.0),
    # the families (issue 21): Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B, HuggingFaceTB/SmolLM2-135M
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                                max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                                family="qwen2", attention_bias=True),
    "qwen3-0.6b": ModelConfig(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072,
                              max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                              head_dim_override=128, family="qwen3", qk_norm=True),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                                max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    # mistralai/Mistral-7B-v0.1, microsoft/Phi-3-mini-4k-instruct, google/gemma-2-2b, google/gemma-3-1b-pt,
    # google/gemma-3-270m (plus their sliding_window, head_dim, query_pre_attn_scalar, soft-capping, layer pattern)
    "mistral-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                              max_seq_len=32768, family="mistral", sliding_window=4096),
    "phi-3-mini-4k": ModelConfig(vocab_size=32064, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=8192,
                                 max_seq_len=4096, family="phi3", sliding_window=2047),
    "gemma-2-2b": ModelConfig(vocab_size=256000, dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, ffn_dim=9216,
                              max_seq_len=8192, norm_eps=1e-6, tie_embeddings=True, head_dim_override=256,
                              family="gemma2", sliding_window=4096, sliding_layers=tuple(range(0, 26, 2)),
                              hidden_act="gelu_tanh", embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=256,
                              attn_softcap=50.0, final_softcap=30.0),
    "gemma-3-1b": ModelConfig(vocab_size=262144, dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_dim=6912,
                              max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                              head_dim_override=256, family="gemma3", qk_norm=True, sliding_window=512,
                              sliding_layers=tuple(i for i in range(26) if (i + 1) % 6), hidden_act="gelu_tanh",
                              embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=256, rope_local_theta=10000.0),
    "gemma-3-270m": ModelConfig(vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048,
                                max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                                head_dim_override=256, family="gemma3", qk_norm=True, sliding_window=512,
                                sliding_layers=tuple(i for i in range(18) if (i + 1) % 6), hidden_act="gelu_tanh",
                                embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=256,
                                rope_local_theta=10000.0),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ModelConfig
    # HF tensor name -> {"bits", "group_size"} for quantized weights of a checkpoint or artifact
    quantized: dict[str, dict] = field(default_factory=dict)
    precision: str | None = None  # an artifact's float precision


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF name -> (out_features, in_features) of every Linear read per token, lm_head included."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = {"self_attn.q_proj": (q, cfg.dim), "self_attn.k_proj": (kv, cfg.dim),
                 "self_attn.v_proj": (kv, cfg.dim), "self_attn.o_proj": (cfg.dim, q),
                 "mlp.gate_proj": (cfg.ffn_dim, cfg.dim), "mlp.up_proj": (cfg.ffn_dim, cfg.dim),
                 "mlp.down_proj": (cfg.dim, cfg.ffn_dim)}
    shapes = {f"model.layers.{i}.{n}": s for i in range(cfg.n_layers) for n, s in per_layer.items()}
    shapes["lm_head"] = (cfg.vocab_size, cfg.dim)
    return shapes


def model_names() -> list[str]:
    return [*SIZES, *PUBLIC]


def resolve_model(model) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, ModelConfig):
        return ModelSpec("config", model)
    text = str(model)
    if text in SIZES:
        return ModelSpec(text, SIZES[text])
    if text.lower() in PUBLIC:
        return ModelSpec(text.lower(), PUBLIC[text.lower()])
    path = Path(text)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_manifest(path)
        if (path / "config.json").is_file():
            return _from_checkpoint(path)
        raise EdgesmithError(f"{path}: neither a checkpoint (config.json) nor an artifact directory (manifest.json)")
    raise EdgesmithError(f"--model {text!r}: not a directory; known shapes: {', '.join(model_names())}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{path}: not valid JSON ({e})") from None


def _from_checkpoint(path: Path) -> ModelSpec:
    cfg = from_hf_config(_read_json(path / "config.json"), str(path / "config.json"))
    meta = _read_json(path / "edgesmith.json") if (path / "edgesmith.json").is_file() else {}
    weights = (meta.get("quantization") or {}).get("weights") or {}
    return ModelSpec(path.name, cfg, dict(weights))


def _from_manifest(path: Path) -> ModelSpec:
    m = _read_json(path / "manifest.json")
    if not isinstance(m.get("model"), dict):
        raise EdgesmithError(f"{path / 'manifest.json'}: no model config (not an edgesmith artifact manifest)")
    cfg = ModelConfig.from_dict(m["model"], str(path / "manifest.json"))
    quant = m.get("quantization") or {}
    held = quant.get("held_bits") or {}  # codes a format holds in a wider form (5-bit as 8 in ONNX): as stored
    weights = {n: {**s, "bits": held.get(n, s.get("bits"))} for n, s in (quant.get("weights") or {}).items()}
    return ModelSpec(path.name, cfg, weights, m.get("precision"))
