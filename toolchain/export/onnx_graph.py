"""The decoder as an ONNX graph, written node by node with `onnx.helper`.

Two graphs from the same weights:

- **plain** (`--no-fuse`, also the TensorRT input): standard ops only (opset 17). The KV cache is
  explicit inputs `past_key_values.{i}.key/value` `(B, n_kv, P, hd)` and outputs `present.{i}.*`
  `(B, n_kv, P+T, hd)`; positions and the causal mask come from P, so one graph does a prefill of
  any length from an empty cache (P = 0) and one-token decodes.
- **fused**: ONNX Runtime contrib ops. `GroupQueryAttention` holds the cache in buffers of the
  full `max_seq_len` (past and present may share one buffer, so nothing is concatenated),
  `RotaryEmbedding` rotates q and k at explicit positions, `SimplifiedLayerNormalization` /
  `SkipSimplifiedLayerNormalization` fuse each RMSNorm with its residual add. Extra inputs:
  `seqlens_k` `(B,)` int32 (tokens in the cache after this call, minus one) and
  `total_sequence_length` () int32.

Weights are stored transposed `(in, out)` for MatMul. A quantized token embedding keeps its codes:
`GatherBlockQuantized` (com.microsoft: uint8 `code + 2^(bits-1)`, 4-bit packed two per byte with the
even column in the low nibble, default zero point 2^(bits-1), one scale per row and block) in the
fused graph, so only the looked-up rows are dequantized; block-wise DequantizeLinear of the int4 /
int8 table then Gather in the plain graph (standard ops cannot gather int4). Both give exactly
`scale * code`. Logits are always float32. This module builds graphs; `onnx.py` saves them and
registers the format.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from kernels.onnx import CONTRIB_OPS
from models.llama import ModelConfig, rope_tables
from models.lowrank import LowRankLinear
from models.quant import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead

OPSET = 17
OPSET_QDQ = 21  # block-wise DequantizeLinear and INT4 tensors
MS = "com.microsoft"
# contrib op names come from the one table of fused-op lowerings (kernels/onnx.py)
MATMUL_NBITS, ROTARY, GQA = (CONTRIB_OPS[k].op_type for k in ("weight_only_matmul", "rope", "flash_attention"))
SKIP_NORM, NORM = CONTRIB_OPS["add_rms_norm"].op_type, CONTRIB_OPS["rms_norm"].op_type
NP = {"fp32": np.float32, "fp16": np.float16}
ONNX_T = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


class Builder:
    """Accumulates nodes and initializers; every helper returns its output name(s)."""

    def __init__(self, precision: str, fused: bool, opset: int = OPSET):
        self.fused, self.opset = fused, opset
        self.precision, self.dtype, self.onnx_t = precision, NP[precision], ONNX_T[precision]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, t: torch.Tensor, transpose: bool = False) -> str:
        a = t.detach().float().numpy()
        return self.init(name, (a.T if transpose else a).astype(self.dtype))

    def ints(self, *values: int) -> str:
        return self.init(f"const_{len(self.inits)}", np.array(values, dtype=np.int64))

    def scalar(self, value: float, dtype=None) -> str:
        return self.init(f"const_{len(self.inits)}", np.array(value, dtype=dtype or self.dtype))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs):
        self.n += 1
        base = name or f"{op_type}_{self.n}"
        outputs = outputs or [f"{base}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, domain=domain, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", [x], to=to)

    def matmul(self, x: str, w: str) -> str:
        return self.op("MatMul", [x, w])

    def rms_norm(self, x: str, w: str, eps: float) -> str:
        """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
        h = self.cast(x, TensorProto.FLOAT) if self.precision != "fp32" else x
        sq = self.op("Mul", [h, h])
        if self.opset >= 18:  # ReduceMean's axes became an input in opset 18
            ms = self.op("ReduceMean", [sq, self.ints(-1)], keepdims=1)
        else:
            ms = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.scalar(eps, np.float32)])])])
        h = self.op("Mul", [h, inv])
        h = self.cast(h, self.onnx_t) if self.precision != "fp32" else h
        return self.op("Mul", [h, w])

    def linear(self, x: str, name: str, module) -> str:
        """x @ W^T (+ b): MatMul on a transposed float weight, or the quantized codes (see quant_linear)."""
        if isinstance(module, QuantizedLinear):
            y = self.quant_linear(x, name, module)
        elif isinstance(module, LowRankLinear):  # low-rank pass: two MatMuls, the factors stay factors
            return self.linear(self.linear(x, f"{name}.a", module.a), f"{name}.b", module.b)
        else:
            y = self.matmul(x, self.weight(f"{name}.weight_t", module.weight, True))
        if getattr(module, "bias", None) is not None:  # Qwen2's q/k/v projections
            y = self.op("Add", [y, self.weight(f"{name}.bias", module.bias)])
        return y

    def quant_linear(self, x: str, name: str, m) -> str:
        if self.fused:  # ONNX Runtime's MatMulNBits, B (N, blocks, blob) from our codes exactly
            if isinstance(m, TiedQuantizedHead) and any(t.name == "embed_tokens.qweight" for t in self.inits):
                # The tied head reads the embedding's table: GatherBlockQuantized's (V, dim*bits/8) bytes are
                # MatMulNBits' (N, K/g, g*bits/8) blob byte for byte, the scales the same values in the same order;
                # a Reshape of each (folded by ONNX Runtime at load) instead of a second copy in the file.
                blob_w = m.group_size * m.bits // 8
                blob = self.op("Reshape", ["embed_tokens.qweight", self.ints(m.out_features, -1, blob_w)])
                scales = self.op("Reshape", ["embed_tokens.scales", self.ints(-1)])
            else:
                blob, scales = matmulnbits_weight(m)
                blob = self.init(f"{name}.qweight", blob)
                scales = self.init(f"{name}.scales", scales.astype(self.dtype))
            return self.op(MATMUL_NBITS, [x, blob, scales], domain=MS, K=m.in_features, N=m.out_features,
                           bits=m.bits, block_size=m.group_size, accuracy_level=0)
        # Standard ops (opset 21): block-wise DequantizeLinear of int4/int8 codes stored (in, out).
        codes = self.codes(f"{name}.qweight_t", m.qweight.detach().T.contiguous().numpy(), m.bits)  # (K, N)
        scales = m.scales.detach().float().T.contiguous().numpy().astype(self.dtype)  # (K / g, N)
        w = self.op("DequantizeLinear", [codes, self.init(f"{name}.scales_t", scales)], axis=0, block_size=m.group_size)
        return self.matmul(x, w)

    def codes(self, name: str, codes: np.ndarray, bits: int) -> str:
        """An INT8 or INT4 initializer of signed codes (INT4 raw data: two's-complement nibbles, first
        element in the low nibble; every table here has an even element count)."""
        codes = codes.astype(np.int8)
        if bits == 8:
            return self.init(name, codes)
        flat = codes.reshape(-1).view(np.uint8) & 0xF
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
        self.inits.append(helper.make_tensor(name, TensorProto.INT4, codes.shape, packed, raw=True))
        return name

    def embedding(self, ids: str, m) -> str:
        """Rows of the token embedding `(B, T, dim)`: a Gather, or the quantized table's lookup."""
        if not isinstance(m, QuantizedEmbedding):
            return self.op("Gather", [self.weight("embed_tokens.weight", m.weight), ids], axis=0)
        scales = self.init("embed_tokens.scales", m.scales.detach().float().numpy().astype(self.dtype))  # (V, dim/g)
        if self.fused:
            q = (m.qweight.detach().numpy().astype(np.int16) + (1 << (m.bits - 1))).astype(np.uint8)  # (V, dim)
            if m.bits == 4:
                q = q[:, 0::2] | (q[:, 1::2] << 4)
            return self.op("GatherBlockQuantized", [self.init("embed_tokens.qweight", q), ids, scales], domain=MS,
                           gather_axis=0, quantize_axis=1, block_size=m.group_size, bits=m.bits)
        table = self.op("DequantizeLinear", [self.codes("embed_tokens.qweight", m.qweight.detach().numpy(), m.bits),
                                             scales], axis=1, block_size=m.group_size)
        return self.op("Gather", [table, ids], axis=0)

    def mlp(self, h: str, p: str, layer) -> str:
        g = self.linear(h, f"{p}.gate_proj", layer.mlp.gate_proj)
        u = self.linear(h, f"{p}.up_proj", layer.mlp.up_proj)
        if layer.mlp.gelu:  # Gemma: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), torch's gelu "tanh"
            inner = self.op("Mul", [self.op("Add", [g, self.op("Mul", [self.op("Mul", [self.op("Mul", [g, g]), g]),
                                                                       self.scalar(0.044715)])]),
                                    self.scalar(math.sqrt(2 / math.pi))])
            half_g = self.op("Mul", [g, self.scalar(0.5)])
            gate = self.op("Mul", [half_g, self.op("Add", [self.op("Tanh", [inner]), self.scalar(1.0)])])
        else:
            gate = self.op("Mul", [g, self.op("Sigmoid", [g])])
        return self.linear(self.op("Mul", [gate, u]), f"{p}.down_proj", layer.mlp.down_proj)

    def embed(self, ids: str, model) -> str:
        """The token embedding, times sqrt(dim) in the model's dtype where the family scales it (Gemma)."""
        x = self.embedding(ids, model.embed_tokens)
        if model.config.embed_scale:
            x = self.op("Mul", [x, self.scalar(float(torch.tensor(model.config.dim ** 0.5, dtype=torch.float32)))])
        return x

    def softcap(self, x: str, cap: float | None, dtype=None) -> str:
        """cap * tanh(x / cap) (Gemma-2's attention scores and final logits); x where cap is None."""
        if cap is None:
            return x
        return self.op("Mul", [self.op("Tanh", [self.op("Div", [x, self.scalar(cap, dtype)])]), self.scalar(cap, dtype)])

    def logits(self, model, h: str, precision: str) -> None:
        logits = self.softcap(self.linear(h, "lm_head", model.lm_head), model.config.final_softcap)
        self.op("Cast", [logits], to=TensorProto.FLOAT, outputs=["logits"]) if precision != "fp32" else \
            self.op("Identity", [logits], outputs=["logits"])


def matmulnbits_weight(m) -> tuple[np.ndarray, np.ndarray]:
    """Our codes as MatMulNBits' B `(N, K/g, g*bits/8)` uint8 and scales `(N * K/g,)`.

    The stored value is `code + 2^(bits-1)` so that MatMulNBits' default zero point (8 for 4 bits,
    128 for 8) gives back `scale * code`; 4-bit values pack two per byte, even column in the low nibble.
    """
    N, K, g = m.out_features, m.in_features, m.group_size
    q = (m.qweight.detach().numpy().astype(np.int16) + (1 << (m.bits - 1))).astype(np.uint8)  # (N, K)
    q = q.reshape(N, K // g, g)
    if m.bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), m.scales.detach().float().numpy().reshape(-1)


def dim_of(b: Builder, x: str, axis: int) -> str:
    """Dimension `axis` of x as an int64 scalar."""
    return b.op("Gather", [b.op("Shape", [x]), b.ints(axis)], axis=0)


# ----------------------------------------------------------------------------- plain graph


def plain_attention(b: Builder, cfg: ModelConfig, h: str, i: int, attn, cos: str, sin: str, mask: str):
    nh, nkv, hd, p = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, f"layers.{i}.self_attn"

    def heads(name: str, n: int) -> str:  # (B, T, n*hd) -> (B, n, T, hd)
        y = b.linear(h, f"{p}.{name}", getattr(attn, name))
        y = b.op("Reshape", [y, b.ints(0, 0, n, hd)])
        norm = getattr(attn, f"{name[0]}_norm", None) if name != "v_proj" else None
        if norm is not None:  # Qwen3: RMSNorm over each head, before the rotation
            y = b.rms_norm(y, b.weight(f"{p}.{name[0]}_norm.weight", norm.weight), cfg.norm_eps)
        return b.op("Transpose", [y], perm=[0, 2, 1, 3])

    def rope(x: str) -> str:
        x1 = b.op("Slice", [x, b.ints(0), b.ints(hd // 2), b.ints(-1)])
        x2 = b.op("Slice", [x, b.ints(hd // 2), b.ints(hd), b.ints(-1)])
        rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rotated, sin])])

    q, k, v = rope(heads("q_proj", nh)), rope(heads("k_proj", nkv)), heads("v_proj", nkv)
    k = b.op("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
    v = b.op("Concat", [f"past_key_values.{i}.value", v], axis=2, outputs=[f"present.{i}.value"])
    # Grouped heads without repeating K/V: q (B, nkv, rep, T, hd) against k (B, nkv, 1, S, hd).
    q5 = b.op("Reshape", [q, b.ints(0, nkv, nh // nkv, -1, hd)])
    k5 = b.op("Transpose", [b.op("Unsqueeze", [k, b.ints(2)])], perm=[0, 1, 2, 4, 3])
    scores = b.op("MatMul", [q5, k5])  # (B, nkv, rep, T, S)
    if b.precision != "fp32":
        scores = b.cast(scores, TensorProto.FLOAT)  # softmax in fp32, as SDPA's reference is
    scores = b.softcap(b.op("Mul", [scores, b.scalar(cfg.attn_scale, np.float32)]), cfg.attn_softcap, np.float32)
    scores = b.op("Add", [scores, mask])
    probs = b.op("Softmax", [scores], axis=-1)
    if b.precision != "fp32":
        probs = b.cast(probs, b.onnx_t)
    y = b.op("MatMul", [probs, b.op("Unsqueeze", [v, b.ints(2)])])  # (B, nkv, rep, T, hd)
    y = b.op("Transpose", [b.op("Reshape", [y, b.ints(0, nh, -1, hd)])], perm=[0, 2, 1, 3])  # (B, T, nh, hd)
    y = b.op("Reshape", [y, b.ints(0, 0, nh * hd)])
    return b.linear(y, f"{p}.o_proj", attn.o_proj)


def plain_graph(model, precision: str, max_seq_len: int) -> onnx.ModelProto:
    cfg = model.config
    quantized = any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    b = Builder(precision, fused=False, opset=OPSET_QDQ if quantized else OPSET)
    cos_t, sin_t = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    P = dim_of(b, "past_key_values.0.key", 2)
    T = dim_of(b, "input_ids", 1)
    total = b.op("Add", [P, T])
    one = b.init("one", np.array(1, dtype=np.int64))
    pos = b.op("Range", [P, total, one])
    cos = b.op("Gather", [b.init("rope_cos", cos_t.numpy().astype(b.dtype)), pos], axis=0)  # (T, hd)
    sin = b.op("Gather", [b.init("rope_sin", sin_t.numpy().astype(b.dtype)), pos], axis=0)
    cos_l, sin_l = cos, sin
    if cfg.rope_local_theta is not None:  # Gemma-3's sliding layers: their own base
        cos_lt, sin_lt = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_local_theta)
        cos_l = b.op("Gather", [b.init("rope_cos_local", cos_lt.numpy().astype(b.dtype)), pos], axis=0)
        sin_l = b.op("Gather", [b.init("rope_sin_local", sin_lt.numpy().astype(b.dtype)), pos], axis=0)
    key_pos = b.op("Range", [b.init("zero", np.array(0, dtype=np.int64)), total, one])
    visible = b.op("LessOrEqual", [b.op("Unsqueeze", [key_pos, b.ints(0)]), b.op("Unsqueeze", [pos, b.ints(1)])])
    zero, minus_inf = b.scalar(0.0, np.float32), b.scalar(float("-inf"), np.float32)
    mask = b.op("Where", [visible, zero, minus_inf])  # (T, S)
    if cfg.sliding_window is not None:  # a sliding layer's keys: also pos - window < j
        near = b.op("Greater", [b.op("Unsqueeze", [key_pos, b.ints(0)]),
                                b.op("Unsqueeze", [b.op("Sub", [pos, b.ints(cfg.sliding_window)]), b.ints(1)])])
        window = b.op("Where", [b.op("And", [visible, near]), zero, minus_inf])
    x = b.embed("input_ids", model)

    def norm(x: str, name: str) -> str:
        return b.rms_norm(x, b.weight(f"{name}.weight", model.get_submodule(name).weight), cfg.norm_eps)

    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        h = norm(x, f"{p}.input_layernorm")
        sliding = layer.self_attn.window is not None
        a = plain_attention(b, cfg, h, i, layer.self_attn, *((cos_l, sin_l, window) if sliding else (cos, sin, mask)))
        if cfg.sandwich_norms:  # Gemma: a norm on the attention's and on the MLP's output
            x = b.op("Add", [x, norm(a, f"{p}.post_attention_layernorm")])
            m = b.mlp(norm(x, f"{p}.pre_feedforward_layernorm"), f"{p}.mlp", layer)
            x = b.op("Add", [x, norm(m, f"{p}.post_feedforward_layernorm")])
            continue
        x = b.op("Add", [x, a])
        x = b.op("Add", [x, b.mlp(norm(x, f"{p}.post_attention_layernorm"), f"{p}.mlp", layer)])
    b.logits(model, norm(x, "norm"), precision)
    cache = ["batch", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
    present = ["batch", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    return finish(b, cfg, "edgesmith-plain", cache, present, extra_inputs=[], opset_ms=False)


# ----------------------------------------------------------------------------- fused graph


def fused_attention(b: Builder, cfg: ModelConfig, h: str, i: int, attn, pos_ids: str, rope: str = "") -> str:
    nh, nkv, hd, p = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, f"layers.{i}.self_attn"
    q = b.linear(h, f"{p}.q_proj", attn.q_proj)
    k = b.linear(h, f"{p}.k_proj", attn.k_proj)
    v = b.linear(h, f"{p}.v_proj", attn.v_proj)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head of q and k, (B, T, n*hd) seen as (B, T, n, hd)
        def head_norm(x: str, n: int, norm, name: str) -> str:
            x = b.op("Reshape", [x, b.ints(0, 0, n, hd)])
            x = b.op(NORM, [x, b.weight(f"{p}.{name}.weight", norm.weight)], axis=-1, epsilon=float(cfg.norm_eps),
                     stash_type=1)
            return b.op("Reshape", [x, b.ints(0, 0, n * hd)])
        q, k = head_norm(q, nh, attn.q_norm, "q_norm"), head_norm(k, nkv, attn.k_norm, "k_norm")
    q = b.op(ROTARY, [q, pos_ids, f"cos_cache{rope}", f"sin_cache{rope}"], domain=MS, interleaved=0, num_heads=nh)
    k = b.op(ROTARY, [k, pos_ids, f"cos_cache{rope}", f"sin_cache{rope}"], domain=MS, interleaved=0, num_heads=nkv)
    y = b.op(GQA,
             [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
              "total_sequence_length"], n_out=3, domain=MS,
             outputs=[f"{p}.gqa_out", f"present.{i}.key", f"present.{i}.value"],
             num_heads=nh, kv_num_heads=nkv, scale=float(cfg.attn_scale),
             **({} if cfg.attn_softcap is None else {"softcap": float(cfg.attn_softcap)}),
             # a sliding layer: the last `window` keys, the query's own included, as transformers counts them
             **({} if attn.window is None else {"local_window_size": attn.window}))
    return b.linear(y[0], f"{p}.o_proj", attn.o_proj)


def fused_graph(model, precision: str, max_seq_len: int) -> onnx.ModelProto:
    cfg = model.config
    b = Builder(precision, fused=True)
    cos_t, sin_t = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    half = cfg.head_dim // 2  # contrib RotaryEmbedding takes the non-repeated half of HF's tables
    b.init("cos_cache", cos_t[:, :half].numpy().astype(b.dtype))
    b.init("sin_cache", sin_t[:, :half].numpy().astype(b.dtype))
    if cfg.rope_local_theta is not None:  # Gemma-3's sliding layers: their own base
        cos_lt, sin_lt = rope_tables(cfg.head_dim, max_seq_len, cfg.rope_local_theta)
        b.init("cos_cache_local", cos_lt[:, :half].numpy().astype(b.dtype))
        b.init("sin_cache_local", sin_lt[:, :half].numpy().astype(b.dtype))
    T = dim_of(b, "input_ids", 1)
    total = b.cast("total_sequence_length", TensorProto.INT64)
    pos = b.op("Range", [b.op("Sub", [total, T]), total, b.init("one", np.array(1, dtype=np.int64))])
    pos_ids = b.op("Expand", [b.op("Unsqueeze", [pos, b.ints(0)]), b.op("Shape", ["input_ids"])])  # (B, T)
    x = b.embed("input_ids", model)
    eps = float(cfg.norm_eps)

    def w(name: str) -> str:
        return b.weight(f"{name}.weight", model.get_submodule(name).weight)

    def norm(x: str, name: str) -> str:
        return b.op(NORM, [x, w(name)], axis=-1, epsilon=eps, stash_type=1)

    h = norm(x, "layers.0.input_layernorm")
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        rope = "_local" if cfg.rope_local_theta is not None and layer.self_attn.window is not None else ""
        a = fused_attention(b, cfg, h, i, layer.self_attn, pos_ids, rope)
        if cfg.sandwich_norms:  # Gemma: the attention's output normalised before the residual add
            a = norm(a, f"{p}.post_attention_layernorm")
        pre_mlp = f"{p}.pre_feedforward_layernorm" if cfg.sandwich_norms else f"{p}.post_attention_layernorm"
        h, _, _, x = b.op(SKIP_NORM, [a, x, w(pre_mlp)], n_out=4, domain=MS, epsilon=eps)
        m = b.mlp(h, f"{p}.mlp", layer)
        if cfg.sandwich_norms:
            m = norm(m, f"{p}.post_feedforward_layernorm")
        nxt = "norm" if i + 1 == len(model.layers) else f"layers.{i + 1}.input_layernorm"
        h, _, _, x = b.op(SKIP_NORM, [m, x, w(nxt)], n_out=4, domain=MS, epsilon=eps)
    b.logits(model, h, precision)
    cache = ["batch", cfg.n_kv_heads, max_seq_len, cfg.head_dim]
    extra = [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
             helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    return finish(b, cfg, "edgesmith-fused", cache, cache, extra_inputs=extra, opset_ms=True)


def finish(b: Builder, cfg: ModelConfig, name: str, cache: list, present: list, extra_inputs: list,
           opset_ms: bool) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]), *extra_inputs]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", b.onnx_t, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", b.onnx_t, present))
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)
    opsets = [helper.make_opsetid("", b.opset)] + ([helper.make_opsetid(MS, 1)] if opset_ms else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgesmith")
    # IR 8 is readable by every ONNX Runtime and TensorRT parser of the last years; INT4 needs IR 10.
    model.ir_version = 10 if b.opset >= OPSET_QDQ else 8
    return model
