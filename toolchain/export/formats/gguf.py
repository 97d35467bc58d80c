"""GGUF export for llama.cpp: the family's llama.cpp architecture, F32 / F16 tensors, the tokenizer embedded.

Tensor names and metadata follow llama.cpp's architecture for the family (`llama` for Llama and
Mistral, `qwen2`, `qwen3`: q/k/v biases and q/k norms under their names there; `phi3`: q/k/v as one
`attn_qkv` and gate/up as one `ffn_up`, rows appended, codes too). Our attention uses Hugging
Face's rotate-half RoPE while llama.cpp's llama RoPE rotates adjacent pairs, so for `llama` the rows of
q_proj / k_proj are permuted per head the way llama.cpp's convert_hf_to_gguf.py does
(`LlamaModel.permute`: reshape (heads, 2, hd/2, in), swap axes 1 and 2); qwen2, qwen3 and phi3 use NEOX
rotation, which is rotate-half, and are written as they are. The tokenizer goes in as
llama.cpp's tokenizer of the same kind (toolchain/gguf_vocab.py: `gpt2` byte-level BPE with the family's split,
or `llama` SentencePiece BPE with scores), padded with unused tokens up to the model's vocab_size. Norm weights stay F32 at every precision, as
llama.cpp's converter keeps them.

Quantized checkpoints (models/quant.py `QuantizedLinear`, `QuantizedEmbedding`) keep their codes:
4-bit group-32 becomes Q4_0 and 8-bit group-32 Q8_0, block for block, without re-quantizing
(`d = scale`, Q4_0 `q = code + 8` with columns 0..15 in the low nibbles and 16..31 in the high
ones, Q8_0 `qs = code`). The token embedding's table has the same layout (rows = tokens, blocks
along the embedding dim), so `token_embd` is Q4_0 / Q8_0 exactly as llama.cpp's own quantizer
writes it, and llama.cpp's get_rows dequantizes exactly our `scale * code`. A tied model writes no
`output.weight`: llama.cpp then runs the head from `token_embd`, which is what our
`TiedQuantizedHead` computes. A scheme a GGUF block cannot hold is refused with one line naming the
tensor. The rest (norms, any layer left float) is F32 or F16 per `--precision`. This module writes
the file; parity runs it through `runtimes.backends.llamacpp`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Checkpoint
from models.errors import EdgesmithError
from models.llama import ModelConfig, Transformer, rope_frequencies
from models.lowrank import LowRankLinear
from models.quant import Int8KVAttention, QuantizedEmbedding, QuantizedLinear
from models.tokenizer import Tokenizer
from runtimes.backends.llamacpp import LlamaCppBackend
from toolchain.gguf_vocab import vocab_for_gguf
from toolchain.export.spec import FormatSpec, quantization_scheme, register_format

FILE = "model.gguf"


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved-pair order, per head (q_proj or k_proj)."""
    out_features = w.shape[0]
    return (w.reshape(n_heads, 2, out_features // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


# family -> llama.cpp architecture (convert_hf_to_gguf.py: Mistral is written as llama; Qwen2/3 are their own,
# with NEOX rotary embeddings, i.e. Hugging Face's rotate-half: their q/k rows are not permuted)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma2": "gemma2",
        "gemma3": "gemma3"}
NEOX = ("qwen2", "qwen3", "phi3", "gemma2", "gemma3")
SWA = ("gemma2", "gemma3")  # llama.cpp architectures that apply a sliding window (per layer, from a pattern)
# llama.cpp's phi3 reads q/k/v as one attn_qkv and gate/up as one ffn_up (gate rows first), as Phi-3 stores them
FUSED_NAMES = {"phi3": {"q": "attn_qkv", "k": "attn_qkv", "v": "attn_qkv", "gate": "ffn_up", "up": "ffn_up"}}


def tensor_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state-dict key -> the GGUF tensor name (llama.cpp's names for the family's architecture)."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if cfg.sandwich_norms:  # Gemma: the norms after attention and around the MLP
        per_layer.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                          "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                          "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    if cfg.attention_bias:
        per_layer.update({f"self_attn.{x}_proj.bias": f"attn_{x}.bias" for x in "qkv"})
    if cfg.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"})
    for part, fused in FUSED_NAMES.get(cfg.family, {}).items():  # several of ours into one of theirs, in row order
        ours = f"self_attn.{part}_proj.weight" if part in "qkv" else f"mlp.{part}_proj.weight"
        per_layer[ours] = f"{fused}.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"blk.{i}.{theirs}"
    return names


def pack_q4_0(qweight: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes in [-8, 7] `(out, in)` + fp16 scales `(out, in/32)` -> Q4_0 bytes `(out, in/32*18)`."""
    out_f, in_f = qweight.shape
    q = (qweight.numpy().astype(np.int16) + 8).astype(np.uint8).reshape(out_f, in_f // 32, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)  # (out, nb, 16)
    d = scales.numpy().astype(np.float16).reshape(out_f, in_f // 32, 1).view(np.uint8)  # (out, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1)


def pack_q5_0(qweight: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes in [-16, 15] `(out, in)` + fp16 scales `(out, in/32)` -> Q5_0 bytes `(out, in/32*22)`: d, then
    qh (bit j: bit 4 of column j's `code + 16`, little-endian uint32), then Q4_0's nibble layout of the low 4 bits."""
    out_f, in_f = qweight.shape
    q = (qweight.numpy().astype(np.int16) + 16).astype(np.uint32).reshape(out_f, in_f // 32, 32)
    qh = ((q >> 4) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)  # (out, nb)
    lo = (q & 0xF).astype(np.uint8)
    qs = lo[..., :16] | (lo[..., 16:] << 4)  # (out, nb, 16)
    d = scales.numpy().astype(np.float16).reshape(out_f, in_f // 32, 1).view(np.uint8)  # (out, nb, 2)
    qh = qh.astype("<u4").reshape(out_f, in_f // 32, 1).view(np.uint8)  # (out, nb, 4)
    return np.concatenate([d, qh, qs], axis=-1).reshape(out_f, -1)


def pack_q8_0(qweight: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """int8 codes `(out, in)` + fp16 scales `(out, in/32)` -> Q8_0 bytes `(out, in/32*34)`."""
    out_f, in_f = qweight.shape
    qs = qweight.numpy().astype(np.int8).reshape(out_f, in_f // 32, 32).view(np.uint8)
    d = scales.numpy().astype(np.float16).reshape(out_f, in_f // 32, 1).view(np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1)


def check_holdable(model: Transformer) -> None:
    """Refuse, naming the tensor, what GGUF's Q4_0 / Q8_0 blocks cannot hold exactly."""
    for name, m in model.named_modules():
        if isinstance(m, Int8KVAttention):
            raise EdgesmithError(f"{name}: an int8 KV cache with calibrated per-head scales cannot be held by "
                                 "GGUF (llama.cpp quantizes its cache itself); export the checkpoint before that pass")
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and m.group_size != 32:
            qtype = f"Q{m.bits}_0"
            raise EdgesmithError(f"{name}.weight: {m.bits}-bit group {m.group_size} cannot be held by GGUF "
                                 f"{qtype} (blocks of 32 with one scale each); allowed: group_size 32")


def gguf_tensors(model: Transformer, precision: str) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (array, raw GGML type or None) as the file stores it (RoPE permutation applied)."""
    import gguf

    cfg = model.config
    state = model.state_dict()
    out = {}
    permute = ARCH[cfg.family] not in NEOX
    for ours, name in tensor_map(cfg).items():
        module = model.get_submodule(ours.rsplit(".", 1)[0])
        heads = cfg.n_heads if ours.endswith("q_proj.weight") else cfg.n_kv_heads if ours.endswith("k_proj.weight") else 0
        heads = heads if permute else 0
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)) and ours.endswith(".weight"):
            qweight, scales = module.qweight.detach(), module.scales.detach()
            if heads:  # rows move together with their scales; blocks run along the input, so they stay whole
                qweight, scales = permute_rope_rows(qweight, heads), permute_rope_rows(scales, heads)
            pack = {4: pack_q4_0, 5: pack_q5_0, 8: pack_q8_0}[module.bits]
            tensor = (pack(qweight, scales), getattr(gguf.GGMLQuantizationType, f"Q{module.bits}_0"))
        else:
            # A low-rank pair is multiplied back: llama.cpp's llama architecture has no factorized Linear.
            w = module.dense_weight() if isinstance(module, LowRankLinear) and ours.endswith(".weight") \
                else state[ours].detach().float()
            if heads:
                w = permute_rope_rows(w, heads)
            dtype = np.float16 if precision == "fp16" and w.dim() == 2 else np.float32
            tensor = (w.numpy().astype(dtype), None)
        if name in out:  # a fused tensor (phi3's attn_qkv, ffn_up): rows appended; a GGUF tensor has one type
            if out[name][1] != tensor[1] or out[name][0].dtype != tensor[0].dtype:
                raise EdgesmithError(f"{ours}: {name} holds q/k/v (or gate/up) as one tensor of one type in "
                                     f"llama.cpp's {ARCH[cfg.family]}; quantize them alike")
            tensor = (np.concatenate([out[name][0], tensor[0]]), tensor[1])
        out[name] = tensor
    return out


def file_type(model: Transformer, precision: str):
    import gguf

    bits = {m.bits for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    if bits:
        return getattr(gguf.LlamaFileType, f"MOSTLY_Q{min(bits)}_0")  # the narrowest, as llama.cpp names a mix
    return gguf.LlamaFileType.MOSTLY_F16 if precision == "fp16" else gguf.LlamaFileType.ALL_F32


def check_gemma(cfg: ModelConfig) -> None:
    """What llama.cpp's gemma2 / gemma3 compute differently from the model, in one line: its query scale is
    1/sqrt(head_dim) (1/sqrt(dim/heads) for the 27B shapes), gemma2 always soft-caps attention and the final
    logits, gemma3 never caps attention."""
    if cfg.family not in ("gemma2", "gemma3"):
        return
    big = cfg.n_layers == {"gemma2": 46, "gemma3": 62}[cfg.family]  # llama.cpp's 27B type
    theirs = (cfg.dim // cfg.n_heads if big else cfg.head_dim) ** -0.5
    if abs(cfg.attn_scale - theirs) > 1e-9 * theirs:
        raise EdgesmithError(f"gguf: query_pre_attn_scalar={cfg.query_pre_attn_scalar:g}: llama.cpp's {cfg.family} scales "
                             f"queries by 1/sqrt({round(theirs ** -2)}); export it to onnx or executorch")
    if cfg.family == "gemma2" and (cfg.attn_softcap is None or cfg.final_softcap is None):
        raise EdgesmithError("gguf: a gemma2 model without attention and final-logit soft-capping: llama.cpp's gemma2 "
                             "always applies both; export it to onnx or executorch")
    if cfg.family == "gemma3" and cfg.attn_softcap is not None:
        raise EdgesmithError(f"gguf: attn_softcap={cfg.attn_softcap:g} on a gemma3 model: llama.cpp's gemma3 does not "
                             "soft-cap attention; export it to onnx")


def write_gguf(path: Path, model: Transformer, tokenizer: Tokenizer, precision: str, max_seq_len: int,
               name: str = "edgesmith") -> None:
    import gguf

    cfg = model.config
    check_holdable(model)
    if cfg.family == "qwen2" and cfg.n_heads * cfg.head_dim != cfg.dim:
        raise EdgesmithError(f"gguf: {cfg.n_heads} heads x head_dim {cfg.head_dim} != dim {cfg.dim} (a head-pruned "
                             "Qwen2): llama.cpp's qwen2 architecture takes q/k/v as dim-wide; export it to onnx or "
                             "executorch")
    if cfg.family == "phi3" and cfg.n_heads * cfg.head_dim != cfg.dim:
        raise EdgesmithError(f"gguf: {cfg.n_heads} heads x head_dim {cfg.head_dim} != dim {cfg.dim} (a head-pruned "
                             "Phi-3): llama.cpp's phi3 architecture takes attention as dim-wide; export it to onnx or "
                             "executorch")
    if dict(cfg.rope_scaling or {}).get("rope_type") == "llama3" and ARCH[cfg.family] != "llama":
        raise EdgesmithError(f"gguf: rope_scaling llama3 on a {cfg.family} model: llama.cpp reads its frequency "
                             "factors (rope_freqs) for the llama architecture; export it to onnx or executorch")

    check_gemma(cfg)
    window = cfg.sliding_window
    if window is not None and window < max_seq_len and ARCH[cfg.family] not in SWA:
        raise EdgesmithError(f"gguf: sliding_window={window} binds past {window} tokens of this {cfg.family} model and "
                             f"llama.cpp's {ARCH[cfg.family]} architecture attends to the whole context; export with "
                             f"--max-seq-len {window} (the window never binds), or to onnx or executorch")

    w = gguf.GGUFWriter(str(path), arch=ARCH[cfg.family])
    w.add_name(name)
    w.add_context_length(max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.n_heads * cfg.head_dim != cfg.dim:  # head-pruned: llama.cpp would assume dim / n_heads
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    scaling = dict(cfg.rope_scaling or {})
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.family == "phi3":  # the keys llama.cpp's converter writes for Phi-3 (a window never binds here)
        w.add_rope_scaling_orig_ctx_len(max_seq_len)
        w.add_sliding_window(cfg.sliding_window or 0)
    if ARCH[cfg.family] in SWA:  # Gemma: the window and which layers have it, head width, caps, local rope base
        w.add_sliding_window(cfg.sliding_window or 0)
        w.add_sliding_window_pattern([cfg.window_of(i) is not None for i in range(cfg.n_layers)])
        if cfg.n_heads * cfg.head_dim == cfg.dim:  # (otherwise written below)
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if cfg.attn_softcap is not None:
            w.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap is not None:
            w.add_final_logit_softcapping(cfg.final_softcap)
        if cfg.rope_local_theta is not None:
            w.add_rope_freq_base_swa(cfg.rope_local_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type(model, precision))
    vocab = vocab_for_gguf(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id is not None:
        w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)  # our callers put <|bos|> themselves, as everywhere else
    for tname, (array, raw_dtype) in gguf_tensors(model, precision).items():
        w.add_tensor(tname, array, raw_dtype=raw_dtype)
    if scaling.get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor (rope_freqs)
        base = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        w.add_tensor("rope_freqs.weight", (base / rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
                     .numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    write_gguf(tmp / FILE, ckpt.model, ckpt.tokenizer, cfg.precision, max_seq_len)
    types = sorted({"F16" if cfg.precision == "fp16" else "F32"} |
                   {f"Q{m.bits}_0" for m in ckpt.model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))})
    lowrank = [n for n, m in ckpt.model.named_modules() if isinstance(m, LowRankLinear)]
    notice = (f"gguf: {len(lowrank)} low-rank Linear(s) multiplied back to dense float weights (llama.cpp has no "
              "factorized Linear): this file is not smaller than the unfactorized model's") if lowrank else None
    options = {"tensor_types": types, **({"lowrank_multiplied_back": len(lowrank)} if lowrank else {})}
    return {"entry": FILE, "options": options,
            "quantization": quantization_scheme(ckpt, {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}), "notice": notice}


def runtime_options(ckpt: Checkpoint, cfg) -> dict:
    """An fp16 KV cache (llama.cpp's default; half the bytes read per token at long context) where it meets the
    artifact's parity threshold, quantized or fp16 weights, and flash attention off, recorded as such: on the CPU
    llama.cpp's flash-attention kernel decodes slower than its plain attention, 119 against 166 tok/s at 896
    tokens of context on a 245 M Llama (scripts/bench_runtime.py --rows llama-q4,llama-q4-nofa, BENCHMARKS.md),
    and no faster at 128; `--flash-attn on` still runs it. An fp32 float artifact keeps llama.cpp's exact path
    (an f32 cache): fp16 rounding is about 5e-4 of the logits, over the fp32 threshold (1e-4)."""
    quantized = bool((ckpt.meta.get("quantization") or {}).get("weights"))
    return {"flash_attn": False, "kv_cache": "f16"} if quantized or cfg.precision != "fp32" else {}


def activations(ckpt: Checkpoint) -> tuple[str, str] | None:
    """llama.cpp's CPU GELU (ggml_vec_gelu_f32, GGML_GELU_FP16) looks each activation up in an fp16 table: a
    GELU model's fp32 GGUF is held to the fp16 threshold (measured 1.5e-4 of the logits on a tiny Gemma)."""
    if ckpt.config.hidden_act == "gelu_tanh":
        return "fp16", "llama.cpp computes GELU through an fp16 table (GGML_GELU_FP16)"
    return None


register_format(FormatSpec(name="gguf", precisions=("fp32", "fp16"), write=write, backend=LlamaCppBackend,
                           runtime_package="llama-cpp-python", activations=activations,
                           toolkit="llama_cpp", estimate_s=5.0, code_bits=(4, 5, 8),
                           runtime_options=runtime_options))
