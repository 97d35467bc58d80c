"""Module swaps that put our one Transformer into the form ExecuTorch's fast kernels run.

- **Attention** (`swap_attention_`): each layer's Attention becomes `CustomOpAttention`, whose static cache is
  `(1, max_seq, n_kv_heads, head_dim)` (the layout of ExecuTorch's LLM custom ops) written in place by
  `llama::update_cache` and read by `llama::custom_sdpa` (causal, grouped-query, from `start_pos`): the same ops
  ExecuTorch's own Llama export uses. The program's forward is `StartPosDecoder`: `tokens (1, T)` and
  `input_pos (1,)` holding the first position, the convention of ExecuTorch's Llama runner.
- **Quantized Linears** (`XnnpackGroupLinear`): our codes as XNNPACK's dynamically quantized group-wise int4
  fully-connected (`qd8-f32-qb4w`: int8 per-token asymmetric activations, int4 weights, one bf16 scale per
  (row, group)), through torchao's `choose_qparams / quantize / dequantize_affine` pattern the partitioner
  lowers. That kernel needs every scale > 0 and codes in [-8, 7], so a group with scale s < 0 is stored as
  (|s|, -code) (exact), an all-zero group as (1, 0), and:
    4 bits: -code = +8 does not fit. The fast form clamps it to 7 (|dw| = |s| on that weight); `exact`
            adds a second plane with codes {0, 1} at the same scales (twice the weight bytes of that Linear).
    8 bits: code = 16 * hi + lo, two int4 planes with scales 16|s| and |s|; hi = 8 (codes >= 120 after
            folding) is clamped to 7 in the fast form, or (`exact`) a third plane holds it.
  Codes quantized with `target=xnnpack` (models/quant.py) always fit: no clamp, no extra plane.
  The serializer stores the scales in bf16 (8 significant bits; ours are fp16 with 11): scales that bf16 does
  not hold move each weight by at most 2^-8 of its value (round to nearest); `target=xnnpack` scales are
  bf16-exact.
  `deviation(model)` measures both (max |dw| over every weight) for the manifest.
- **Quantized token embedding** (`ExecuTorchEmbedding`): our codes through ExecuTorch's quantized kernels
  (`quantized_decomposed::embedding_4bit` / `embedding_byte`, what export_llama's `-E` writes; the runtime must
  have them: the manifest's `options.custom_ops` names "quantized"), or with `portable=True` a lookup in portable
  ops (embedding, bitwise and / shift, cast, mul) that every ExecuTorch runtime has. Either way only the
  looked-up rows are unpacked, as `(float) code * scale`: exactly the fake-quant value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.llama import MLP, Attention, RMSNorm, Transformer, softcapped_attention
from models.quant import QuantizedEmbedding, QuantizedLinear, replace_module_


def _load_custom_ops() -> None:
    """Register ExecuTorch's LLM custom ops (`torch.ops.llama.*`) and its quantized ops
    (`torch.ops.quantized_decomposed.embedding_*`) with torch, for export."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


# ----------------------------------------------------------------------------- attention


class CustomOpKVCache(nn.Module):
    """The static cache in the custom ops' layout `(1, max_seq, n_kv_heads, head_dim)`."""

    def __init__(self, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (1, max_seq_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)


class RingKVCache(CustomOpKVCache):
    """A sliding layer's cache as a ring of `window + per_call` positions: position p lives in slot p % size, so a
    call of up to `per_call` tokens writes first and still finds the window of its first query (ExecuTorch's own
    RingKVCache keeps twice the window for the same reason). Which position a slot holds is computed from the
    call's positions alone, no state beside the buffers: after a call ending at `end`, slot j holds
    `end - (end - j) mod size` (negative: never written since a reset). A rewind of up to `per_call` positions
    leaves only stale slots that the window masks (runtimes/backends/executorch.py refuses a longer one)."""

    def __init__(self, n_kv_heads: int, window: int, per_call: int, head_dim: int, dtype: torch.dtype):
        super().__init__(n_kv_heads, window + per_call, head_dim, dtype)
        self.window = window

    def write(self, k: torch.Tensor, v: torch.Tensor, start) -> torch.Tensor:
        """Write k, v `(1, T, nkv, hd)` at positions start..start+T-1; the `(T, size)` bool mask of what each
        query sees (held, not after it, within its window)."""
        T, size = k.shape[1], self.k_cache.shape[1]
        pos = torch.arange(T, dtype=torch.long) + start  # (T,)
        slots = torch.remainder(pos, size).view(1, T)
        torch.ops.llama.update_cache_with_indices(k.to(self.k_cache.dtype), self.k_cache, start, slots)
        torch.ops.llama.update_cache_with_indices(v.to(self.v_cache.dtype), self.v_cache, start, slots)
        end = start + T - 1
        held = end - torch.remainder(end - torch.arange(size, dtype=torch.long), size)  # (size,)
        age = pos.view(T, 1) - held.view(1, size)  # (T, size)
        return (held.view(1, size) >= 0) & (age >= 0) & (age < self.window)


class CustomOpAttention(Attention):
    """Attention through `llama::update_cache` + `llama::custom_sdpa` (export only; batch 1)."""

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D): no transposes
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.norm_qk(q, k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, D)
        q, k = rope_by_matmul(q, cos, sin, self.rotate_half), rope_by_matmul(k, cos, sin, self.rotate_half)
        cache = self.kv_cache
        start = input_pos[0].item()
        torch._check(start >= 0)
        if isinstance(cache, RingKVCache):
            mask = cache.write(k, v, start)  # (T, size): the window over the ring
        else:
            torch._check(start + T <= cache.k_cache.shape[1])
            torch.ops.llama.update_cache(k.to(cache.k_cache.dtype), cache.k_cache, start)
            torch.ops.llama.update_cache(v.to(cache.v_cache.dtype), cache.v_cache, start)
        if self.softcap is not None:  # Gemma-2: custom_sdpa does not soft-cap; plain ops over the whole cache. The
            # cache and q are read through index_select, which XNNPACK does not take: one partition would otherwise
            # hold the projections (through q) and the attention after the cache update (a dependency cycle).
            first = torch.zeros(1, dtype=torch.long)
            k_all, v_all = (c.index_select(0, first).transpose(1, 2) for c in (cache.k_cache, cache.v_cache))
            y = softcapped_attention(q.index_select(0, first).transpose(1, 2), k_all, v_all, mask, self.scale,
                                     self.softcap).transpose(1, 2)
        elif isinstance(cache, RingKVCache) or (self.window is not None and self.window < cache.k_cache.shape[1]):
            # A sliding layer: the ring's mask, or the model's window mask rows `(T, S)`, as an additive mask
            # (ExecuTorch's own ring-buffer attention passes its mask the same way; start_pos is then unused).
            bias = torch.where(mask.view(T, -1), 0.0, float("-inf")).to(q.dtype)
            y = torch.ops.llama.custom_sdpa(q, cache.k_cache, cache.v_cache, 0, bias, 0.0, False, self.scale)
        else:
            y = torch.ops.llama.custom_sdpa(q, cache.k_cache, cache.v_cache, start, None, 0.0, True, self.scale)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


def rotate_half_matrix(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """W `(D, D)` with `x @ W.T == cat(-x2, x1)` (HF's rotate-half): one 1 or -1 per row, so the product is exact."""
    half = head_dim // 2
    w = torch.zeros(head_dim, head_dim, dtype=dtype)
    w[torch.arange(half), torch.arange(half) + half] = -1
    w[torch.arange(half) + half, torch.arange(half)] = 1
    return w


def rope_by_matmul(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_half: torch.Tensor) -> torch.Tensor:
    """models.llama.apply_rope with the halves swapped by a matmul: XNNPACK takes a matmul into the partition around
    it, while the slices of `chunk` (dynamic sequence length) would end it."""
    return x * cos.to(x.dtype) + F.linear(x, rotate_half) * sin.to(x.dtype)


class XnnpackRMSNorm(RMSNorm):
    """RMSNorm with its mean of squares as a sum by a matmul with a row of ones, then a division: the norm stays
    inside the XNNPACK partition around it (XNNPACK's mean takes only 4-D inputs, and the reshapes to get there
    are symbolic with a dynamic sequence length, which ends a partition too). Export only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        ms = F.linear(h * h, self.row_of_ones) / self.width  # (..., 1); a tensor: a Python int becomes a constant
        # the program copies on every call
        return self.weight * (h * torch.rsqrt(ms + self.eps)).to(x.dtype)


class TanhGeluMLP(MLP):
    """Gemma's gelu_tanh written out (0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), torch's formula): ExecuTorch
    lowers aten.gelu to XNNPACK's GELU whatever its `approximate`, and XNNPACK's is the erf GELU, 1e-4 of the
    logits away from the model on a tiny Gemma. Export only."""

    def act(self, gate, up):
        inner = (gate + 0.044715 * gate * gate * gate) * math.sqrt(2 / math.pi)
        return 0.5 * gate * (1 + torch.tanh(inner)) * up


def ring_layers(cfg, max_seq_len: int, per_call: int | None) -> list[int]:
    """The sliding layers whose cache is a ring: those where `window + per_call` positions save memory."""
    return [i for i in range(cfg.n_layers)
            if per_call and cfg.window_of(i) is not None and cfg.window_of(i) + per_call < max_seq_len]


def swap_attention_(model: Transformer, max_seq_len: int, dtype: torch.dtype, per_call: int | None = None) -> None:
    """Every layer's attention through the custom ops, with a cache of `max_seq_len` positions, or a ring of
    `window + per_call` (ring_layers); every RMSNorm as XnnpackRMSNorm. A layer is then two XNNPACK partitions."""
    _load_custom_ops()
    rings = ring_layers(model.config, max_seq_len, per_call)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.__class__ = CustomOpAttention  # same parameters and submodules; only forward differs
        if i in rings:
            attn.kv_cache = RingKVCache(attn.n_kv_heads, attn.window, per_call, attn.head_dim, dtype)
        else:
            attn.kv_cache = CustomOpKVCache(attn.n_kv_heads, max_seq_len, attn.head_dim, dtype)
        attn.register_buffer("rotate_half", rotate_half_matrix(attn.head_dim, dtype), persistent=False)
    for mlp in [m for m in model.modules() if type(m) is MLP and m.gelu]:
        mlp.__class__ = TanhGeluMLP
    for norm in [m for m in model.modules() if type(m) is RMSNorm]:
        norm.__class__ = XnnpackRMSNorm
        norm.register_buffer("row_of_ones", torch.ones(1, norm.weight.shape[0]), persistent=False)
        norm.register_buffer("width", torch.tensor([float(norm.weight.shape[0])]), persistent=False)


class StartPosDecoder(nn.Module):
    """`forward(tokens (1, T), input_pos (1,)) -> logits (1, T, V)` in fp32: T tokens from position input_pos[0]."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], dtype=torch.long) + input_pos
        return self.model(tokens, positions).float()


# ----------------------------------------------------------------------------- quantized Linears


def split_codes(q: QuantizedLinear, exact: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Our codes as int4 planes `(codes int8 (out, in) in [-8, 7], scales fp32 (out, in/g) > 0)` whose sum is
    `q.dequantize()` (before bf16 scales) when `exact` or when nothing had to be clamped; and the number of codes
    clamped (0 when `exact`)."""
    out_f, in_f = q.qweight.shape
    s = q.scales.float()  # (out, ng), signed
    if q.bits == 4 and bool((s > 0).all()) and int(q.qweight.min()) >= -8 and int(q.qweight.max()) <= 7:
        return [(q.qweight, s)], 0  # the codes as they are (target=xnnpack): no temporaries, no copy
    c = q.qweight.to(torch.int32).reshape(out_f, s.shape[1], q.group_size)
    c = torch.where((s < 0)[..., None], -c, c).masked_fill((s == 0)[..., None], 0)
    pos = s.abs().masked_fill(s == 0, 1.0)
    if q.bits == 4:
        digits = [(c, pos)]
    else:
        lo = torch.remainder(c + 8, 16) - 8
        digits = [(torch.div(c - lo, 16, rounding_mode="floor"), pos * 16), (lo, pos)]
    first, first_scale = digits[0]  # only the leading digit can leave [-8, 7] (by +1: +8)
    kept = first.clamp(-8, 7)
    over = first - kept  # 0 or 1
    planes = [(kept, first_scale)] + digits[1:]
    n_over = int(over.count_nonzero())
    if n_over and exact:
        planes.append((over, first_scale))
    planes = [(p.reshape(out_f, in_f).to(torch.int8), sc) for p, sc in planes]
    return planes, 0 if exact else n_over


def dq8_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8 asymmetric per-token quantize-dequantize, as torchao's 8da configs write it (the pattern
    XNNPACK fuses into its dynamically quantized input). The registered ops themselves (`torch.ops.torchao.*`),
    not their public wrappers: those are decorated `@torch.no_grad()`, and every grad-mode region in a traced graph
    is split out and inlined again by torch.export (two per Linear: 14 of 17 s of a 6-layer export, quadratic in
    the number of regions)."""
    from torchao.quantization.quant_primitives import _choose_qparams_affine, _quantize_affine, dequantize_affine

    block = [1] * (x.dim() - 1) + [x.shape[-1]]
    scale, zero = _choose_qparams_affine(x, "ASYMMETRIC", block, torch.int8, -128, 127, None, None, torch.int8)
    q = _quantize_affine(x, block, scale, zero, torch.int8, -128, 127)
    return dequantize_affine(q, tuple(block), scale, zero, torch.int8, -128, 127, output_dtype=x.dtype)


class XnnpackGroupLinear(nn.Module):
    """A QuantizedLinear as XNNPACK's qd8-f32-qb4w planes (see the module docstring)."""

    def __init__(self, q: QuantizedLinear, exact: bool = False):
        super().__init__()
        planes, self.clamped = split_codes(q, exact)
        self.group_size, self.n_planes = q.group_size, len(planes)
        for i, (codes, scales) in enumerate(planes):
            self.register_buffer(f"codes{i}", codes)
            self.register_buffer(f"scales{i}", scales)
            self.register_buffer(f"zeros{i}", torch.zeros(scales.shape, dtype=torch.int8))
        bias = getattr(q, "bias", None)  # Qwen2's q/k/v: float, added after the planes
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def stored_weight(self) -> torch.Tensor:
        """The float weight the program computes with (scales rounded to bf16 as the serializer stores them)."""
        w = 0
        for i in range(self.n_planes):
            s = getattr(self, f"scales{i}").to(torch.bfloat16).float().repeat_interleave(self.group_size, dim=1)
            w = w + getattr(self, f"codes{i}").float() * s
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import dequantize_affine

        y = None
        for i in range(self.n_planes):  # each plane is its own dynamically quantized linear
            w = dequantize_affine(getattr(self, f"codes{i}"), (1, self.group_size), getattr(self, f"scales{i}"),
                                  getattr(self, f"zeros{i}"), torch.int8, -8, 7, output_dtype=x.dtype)
            part = F.linear(dq8_per_token(x), w)
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------- embedding


class ExecuTorchEmbedding(nn.Module):
    """A QuantizedEmbedding as a lookup of its codes (see the module docstring): 4-bit codes packed two per byte as
    `code + 8` (the quantized kernel: even column in the high nibble; portable: in the low one), 8-bit as int8,
    scales fp32 (exact widening of ours)."""

    def __init__(self, q: QuantizedEmbedding, portable: bool = False):
        super().__init__()
        if not portable:
            _load_custom_ops()
        self.bits, self.group_size, self.portable = q.bits, q.group_size, portable
        codes = q.qweight.detach()
        if q.bits == 4:
            u = (codes.to(torch.int16) + 8).to(torch.uint8)  # (V, dim) in [0, 15]
            even, odd = u[:, 0::2], u[:, 1::2]
            codes = even | (odd << 4) if portable else (even << 4) | odd  # (V, dim / 2)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", q.scales.detach().float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.portable:
            if self.bits == 4:
                return torch.ops.quantized_decomposed.embedding_4bit.dtype(self.codes, self.scales, None, -8, 7, ids,
                                                                           dtype=torch.float32)
            return torch.ops.quantized_decomposed.embedding_byte.dtype(self.codes, self.scales, None, -128, 127, ids,
                                                                       dtype=torch.float32)
        rows = F.embedding(ids, self.codes)  # (..., dim) int8, or (..., dim / 2) packed uint8
        if self.bits == 4:
            pairs = torch.stack([torch.bitwise_and(rows, 15), torch.bitwise_right_shift(rows, 4)], dim=-1)
            codes = pairs.flatten(-2).to(torch.float32) - 8.0  # (..., dim)
        else:
            codes = rows.to(torch.float32)
        scales = F.embedding(ids, self.scales)  # (..., dim / g)
        return (codes.unflatten(-1, (-1, self.group_size)) * scales.unsqueeze(-1)).flatten(-2)


def swap_quantized_(model: nn.Module, exact: bool = False, portable_embedding: bool = False) -> dict[str, dict]:
    """Replace every QuantizedLinear by its XnnpackGroupLinear and a QuantizedEmbedding by its
    ExecuTorchEmbedding; per swapped Linear what it became: planes, codes clamped, max |dw| against our weights."""
    out = {}
    for name in [n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]:
        m = model.get_submodule(name)
        if isinstance(m, QuantizedEmbedding):
            replace_module_(model, name, ExecuTorchEmbedding(m, portable_embedding))
            continue
        x = XnnpackGroupLinear(m, exact)
        dw = float((x.stored_weight() - m.dequantize(torch.float32)).abs().max())
        out[name] = {"bits": m.bits, "planes": x.n_planes, "clamped_codes": x.clamped, "max_abs_dw": dw}
        replace_module_(model, name, x)
    return out
