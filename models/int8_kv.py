"""An Attention whose KV cache holds int8 codes with fixed per-head scales (the kv_int8 compress method's
result). It changes where K and V are kept, not how attention is computed; the scales come from calibration
(toolchain.compress.methods.kv_int8), never from this module."""

from __future__ import annotations

import torch
from torch import nn

from models.kv_cache import Int8KVCache, KVCache, dequantize_kv, quantize_kv
from models.llama import Attention


class Int8KVAttention(Attention):
    """Attention with an int8 KV cache and fixed per-head scales (see models/kv_cache.Int8KVCache)."""

    def __init__(self, attn: Attention, k_scale: torch.Tensor, v_scale: torch.Tensor):
        nn.Module.__init__(self)
        for name in ("n_heads", "n_kv_heads", "head_dim", "window", "scale", "softcap", "q_proj", "k_proj", "v_proj",
                     "o_proj", "q_norm", "k_norm"):  # q_norm / k_norm: Qwen3's and Gemma-3's only
            if hasattr(attn, name):
                setattr(self, name, getattr(attn, name))
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            self.register_buffer(name, t.detach().float().clone().reshape(self.n_kv_heads))
        self.kv_cache = None

    def _apply(self, fn, recurse=True):
        # Like QuantizedLinear: dtype casts keep the calibrated fp32 scales; device moves apply.
        k_scale, v_scale = self.k_scale, self.v_scale
        super()._apply(fn, recurse)
        device = fn(torch.zeros(0)).device
        self.k_scale, self.v_scale = k_scale.to(device), v_scale.to(device)
        return self

    def __setattr__(self, name, value):
        # Transformer.setup_cache assigns a float KVCache; this attention keeps its cache in int8.
        if name == "kv_cache" and isinstance(value, KVCache):
            B, H, S, D = value.k_cache.shape
            value = Int8KVCache(B, H, S, D, self.k_scale, self.v_scale, value.k_cache.dtype).to(value.k_cache.device)
        super().__setattr__(name, value)

    def read_kv(self, input_pos, k, v):
        if input_pos is not None:
            return self.kv_cache.update(input_pos, k, v)  # int8 codes in, dequantized cache out
        # No cache (evaluation): round K and V through int8 the same way, so the loss shows.
        return (dequantize_kv(quantize_kv(k, self.k_scale), self.k_scale, k.dtype),
                dequantize_kv(quantize_kv(v, self.v_scale), self.v_scale, v.dtype))
