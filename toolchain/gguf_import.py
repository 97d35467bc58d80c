"""A GGUF file becomes a checkpoint, its quantized tensors' codes kept exactly (`edgesmith import-gguf`).

The header is bounded first (runtimes.headers.gguf_header), then read with gguf-py. Architectures: `llama`
(Llama, SmolLM, Mistral), `qwen2`, `qwen3`, `phi3` (attn_qkv / ffn_up split by rows), `gemma2` and `gemma3` (their
window pattern, soft-caps and local RoPE base), with the tensor names toolchain/export/formats/gguf.py writes
(llama.cpp's).
Tensor types: F32 and F16 become floats; Q8_0, Q5_0 and Q4_0 become our codes and fp16 scales block for block
(Q4_0: `code = q - 8`, the block's first 16 weights in the low nibbles; Q5_0 the same with the fifth bits in qh,
`code = q - 16`), so `export` takes the checkpoint to ONNX or
ExecuTorch with the same numbers. The `llama` architecture's q/k rows go back to Hugging Face's rotate-half order
(the inverse of the exporter's permutation); qwen2/qwen3 rotate NEOX-style, which is rotate-half already.

The tokenizer: llama.cpp's `gpt2` model with the `gpt-2`, `llama-bpe`, `qwen2` or `smollm` split, or its `llama`
model (SentencePiece BPE, merges rebuilt from the scores), becomes tokenizer.json (toolchain/gguf_vocab.py).
Refused in one line, naming the key or tensor: other architectures, other tensor types (K-quants, i-quants, BF16),
other tokenizer models or pre-tokenizers (their split rules differ: a wrong tokenizer would be silent), a file
without its hyperparameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import save_checkpoint, sha256_file
from models.errors import EdgesmithError
from models.llama import ModelConfig, Transformer
from models.quant import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead, replace_module_
from models.tokenizer import Tokenizer
from runtimes.headers import gguf_header
from toolchain.export.formats.gguf import ARCH, NEOX, tensor_map
from toolchain.gguf_vocab import GGUFVocab, tokenizer_from_gguf

# llama.cpp architecture -> our family
FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3"}


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair row order -> HF rotate-half, per head (inverse of gguf.permute_rope_rows)."""
    out_features = w.shape[0]
    return w.reshape(n_heads, out_features // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def decode_q4_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 bytes `(rows, nb*18)` -> int8 codes in [-8, 7] `(rows, nb*32)` and fp16 scales `(rows, nb)`."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    qs = blocks[..., 2:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int8) - 8
    return torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(d.copy())


def decode_q5_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 bytes `(rows, nb*22)` -> int8 codes in [-16, 15] `(rows, nb*32)` and fp16 scales `(rows, nb)`."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 22)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    qh = blocks[..., 2:6].copy().view("<u4")  # (rows, nb, 1)
    qs = blocks[..., 6:]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4  # (rows, nb, 32)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int16) + high - 16
    return torch.from_numpy(codes.astype(np.int8).reshape(rows, -1)), torch.from_numpy(d.copy())


def decode_q8_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 bytes `(rows, nb*34)` -> int8 codes `(rows, nb*32)` and fp16 scales `(rows, nb)`."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    codes = blocks[..., 2:].copy().view(np.int8)
    return torch.from_numpy(codes.reshape(rows, -1).copy()), torch.from_numpy(d.copy())


def _field(reader, key: str, path: Path, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise EdgesmithError(f"{path}: {key} is missing")
        return None
    return field.contents()


def read_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch not in FAMILY:
        raise EdgesmithError(f"{path}: general.architecture {arch!r:.40} is not supported; allowed: "
                             f"{', '.join(FAMILY)}")
    get = lambda key, required=True: _field(reader, f"{arch}.{key}", path, required)  # noqa: E731
    dim, heads = get("embedding_length"), get("attention.head_count")
    key_length = get("attention.key_length", False)
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    kind, scaling = get("rope.scaling.type", False), None
    if "rope_freqs.weight" in names:
        raise EdgesmithError(f"{path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, Llama-3.1's scaling) "
                             "is not supported by import-gguf; import the transformers directory with import-hf")
    if kind == "linear":
        scaling = (("factor", float(get("rope.scaling.factor"))), ("rope_type", "linear"))
    elif kind not in (None, "none"):
        raise EdgesmithError(f"{path}: {arch}.rope.scaling.type {kind!r:.40} is not supported; allowed: none, linear")
    n_layers = get("block_count")
    head_dim = key_length or (dim // heads if isinstance(dim, int) and isinstance(heads, int) and heads else None)
    switches = window_and_gemma(arch, get, n_layers, dim, heads, head_dim)
    try:
        return ModelConfig(
            vocab_size=get("vocab_size", False) or len(tokens), dim=dim, n_layers=n_layers,
            n_heads=heads, n_kv_heads=get("attention.head_count_kv", False) or heads,
            ffn_dim=get("feed_forward_length"), max_seq_len=get("context_length"),
            rope_theta=float(get("rope.freq_base", False) or 10000.0),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in names,
            head_dim_override=key_length if key_length and key_length * heads != dim else None,
            family=FAMILY[arch], attention_bias="blk.0.attn_q.bias" in names, qk_norm=arch in ("qwen3", "gemma3"),
            rope_scaling=scaling, **switches)
    except (EdgesmithError, TypeError, ValueError) as e:
        raise EdgesmithError(f"{path}: its hyperparameters do not make a model ({e})") from None


def window_and_gemma(arch: str, get, n_layers, dim, heads, head_dim) -> dict:
    """The sliding window (Phi-3's as written, which llama.cpp itself turns off; Gemma's per-layer pattern, or
    llama.cpp's default one: every 2nd layer full for gemma2, every 6th for gemma3) and Gemma's switches, with the
    query scale llama.cpp computes (1/sqrt(head_dim); dim/heads for its 27B shapes)."""
    if arch not in ("phi3", "gemma2", "gemma3"):
        return {}
    window = get("attention.sliding_window", False) or (4096 if arch == "gemma2" else None)
    out = {"sliding_window": window or None}
    if arch == "phi3" or not isinstance(n_layers, int):
        return out
    pattern = get("attention.sliding_window_pattern", False)
    if pattern is None or isinstance(pattern, int):
        every = pattern or (2 if arch == "gemma2" else 6)
        pattern = [bool((i + 1) % every) for i in range(n_layers)]
    layers = tuple(i for i, sliding in enumerate(pattern) if sliding)
    big = n_layers == {"gemma2": 46, "gemma3": 62}[arch]
    out.update(sliding_window=window if layers and window else None,
               sliding_layers=layers if window and layers and len(layers) < n_layers else None,
               hidden_act="gelu_tanh", embed_scale=True, sandwich_norms=True,
               query_pre_attn_scalar=float(dim // heads if big else head_dim),
               attn_softcap=get("attn_logit_softcapping", False) if arch == "gemma2" else None,
               final_softcap=get("final_logit_softcapping", False))
    if arch == "gemma3":
        out["rope_local_theta"] = float(get("rope.freq_base_swa", False) or 10000.0)
    return out


def read_tokenizer(reader, path: Path) -> Tokenizer:
    """tokenizer.json from the file's vocabulary keys (toolchain/gguf_vocab.py rebuilds llama.cpp's split)."""
    get = lambda key, required=False: _field(reader, f"tokenizer.ggml.{key}", path, required)  # noqa: E731
    prefix = get("add_space_prefix")
    vocab = GGUFVocab(model=get("model", True), pre=get("pre"), tokens=get("tokens", True), types=get("token_type", True),
                      scores=get("scores"), merges=get("merges") or [],
                      add_space_prefix=True if prefix is None else bool(prefix), unk_id=get("unknown_token_id"))
    return tokenizer_from_gguf(vocab, get("bos_token_id"), get("eos_token_id"), str(path))


def _unpermute(cfg: ModelConfig, ours: str, t: torch.Tensor) -> torch.Tensor:
    if ARCH[cfg.family] in NEOX:
        return t
    if ours.endswith("q_proj.weight"):
        return unpermute_rope_rows(t, cfg.n_heads)
    if ours.endswith("k_proj.weight"):
        return unpermute_rope_rows(t, cfg.n_kv_heads)
    return t


def import_gguf(src: str | Path, out: str | Path) -> Path:
    """Convert the GGUF file `src` into a checkpoint at `out`; returns `out`."""
    import gguf

    path = Path(src)
    if not path.is_file():
        raise EdgesmithError(f"{path}: no such file")
    gguf_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, IndexError, KeyError, ... on a corrupt file
        raise EdgesmithError(f"{path}: not a readable GGUF file ({type(e).__name__})") from None
    cfg = read_config(reader, path)
    tokenizer = read_tokenizer(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    names = tensor_map(cfg)
    unexpected = sorted(set(tensors) - set(names.values()))
    if unexpected:
        raise EdgesmithError(f"{path}: tensor {unexpected[0]!r} is not one this architecture's model has")
    model = Transformer(cfg)
    state, T = {}, gguf.GGMLQuantizationType
    # phi3's attn_qkv / ffn_up hold several of ours, rows in order: (ours, first row, rows) per GGUF tensor
    rows, start = {}, {}
    for ours, name in names.items():
        n = model.get_submodule(ours.rsplit(".", 1)[0]).weight.shape[0] if ours.endswith("proj.weight") else None
        rows[ours], start[name] = (start.get(name, 0), n), start.get(name, 0) + (n or 0)
    for ours, name in names.items():
        if name not in tensors:
            raise EdgesmithError(f"{path}: tensor {name!r} is missing")
        t = tensors[name]
        first, n = rows[ours]
        part = slice(first, first + n) if n is not None and start[name] != n else slice(None)
        if t.tensor_type in (T.F32, T.F16):
            state[ours] = _unpermute(cfg, ours, torch.from_numpy(np.array(t.data, dtype=np.float32))[part])
            continue
        decode = {T.Q4_0: (4, decode_q4_0), T.Q5_0: (5, decode_q5_0), T.Q8_0: (8, decode_q8_0)}
        if t.tensor_type not in decode:
            raise EdgesmithError(f"{path}: tensor {name!r} is {t.tensor_type.name}; allowed: F32, F16, Q8_0, Q5_0, "
                                 "Q4_0")
        bits, fn = decode[t.tensor_type]
        codes, scales = fn(np.asarray(t.data)[part])
        codes, scales = _unpermute(cfg, ours, codes), _unpermute(cfg, ours, scales)
        module = ours.removesuffix(".weight")
        if module == "embed_tokens":
            q = QuantizedEmbedding.from_codes(codes, scales, bits, 32)
        else:
            bias = model.get_submodule(module).bias
            q = QuantizedLinear.from_codes(codes, scales, bits, 32, bias=bias)
        replace_module_(model, module, q)
    if cfg.tie_embeddings and isinstance(model.embed_tokens, QuantizedEmbedding):
        replace_module_(model, "lm_head", TiedQuantizedHead(model.embed_tokens))
    floats = model.state_dict()
    for ours, value in state.items():
        if tuple(value.shape) != tuple(floats[ours].shape):
            raise EdgesmithError(f"{path}: tensor {names[ours]!r} has shape {tuple(value.shape)}, the model "
                                 f"its hyperparameters describe has {tuple(floats[ours].shape)}")
    model.load_state_dict(state, strict=False)
    step = {"kind": "import-gguf", "source": str(path.resolve()), "sha256": sha256_file(path)}
    return save_checkpoint(model.eval(), tokenizer, out, lineage={"parent": None, "passes": [step]})
