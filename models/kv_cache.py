"""Static KV cache: preallocated buffers written by index, never grown.

Shapes stay fixed at `(B, n_kv_heads, max_seq, head_dim)` so the same module trains, compiles
and exports (the gpt-fast / ExecuTorch layout). `update` writes in place and returns what attention
reads: in eager mode only the live prefix (positions `0..max(input_pos)`, a view of the buffers, never
a copy or a concatenation); in a traced graph (torch.compile, torch.export, jit tracing) the whole
buffers, so shapes never depend on values and exported graphs are what they always were. This module
does not decide what is valid to attend to; the attention mask built from `input_pos` does.
"""

import torch
from torch import nn


def traced() -> bool:
    """True while torch.compile, torch.export or jit tracing captures a graph (shapes must stay static)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def live_length(input_pos: torch.Tensor | None) -> int | None:
    """Cache positions a call at `input_pos` can see (`max(input_pos) + 1`), in eager mode; None without
    a cache or while traced, where the whole cache is read."""
    if input_pos is None or traced():
        return None
    return int(input_pos.max()) + 1


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        # persistent=False: the cache is state of a run, not of the model, so it stays out of checkpoints.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v `(B, n_kv, T, hd)` at positions `input_pos` `(T,)`; return the cache attention reads
        (eager: its live prefix, a view; traced: the whole buffers)."""
        B = k.shape[0]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        k_out[:, :, input_pos] = k.to(k_out.dtype)
        v_out[:, :, input_pos] = v.to(v_out.dtype)
        live = live_length(input_pos)
        return (k_out, v_out) if live is None else (k_out[:, :, :live], v_out[:, :, :live])

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()


# ----------------------------------------------------------------------------- int8


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x `(B, n_kv, T, hd)`, scale `(n_kv,)` -> int8 codes, round half away from zero, clamped to ±127."""
    y = x.float() / scale.float().view(1, -1, 1, 1)
    return (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-127, 127).to(torch.int8)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float().view(1, -1, 1, 1)).to(dtype)


class Int8KVCache(nn.Module):
    """The static cache stored as int8 codes with one fixed (calibrated) scale per KV head for K and
    one for V: `k = k_scale[h] * code`. Same interface as KVCache; `update` returns the cache
    dequantized to `dtype`, which the reference and the fused attention (kernels/modules.py) both read."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 k_scale: torch.Tensor, v_scale: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.dtype = dtype
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.int8), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.int8), persistent=False)
        self.register_buffer("k_scale", k_scale.detach().float().clone(), persistent=False)
        self.register_buffer("v_scale", v_scale.detach().float().clone(), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        k_out[:, :, input_pos] = quantize_kv(k, self.k_scale)
        v_out[:, :, input_pos] = quantize_kv(v, self.v_scale)
        live = live_length(input_pos)  # eager: dequantize only the live prefix
        if live is not None:
            k_out, v_out = k_out[:, :, :live], v_out[:, :, :live]
        return dequantize_kv(k_out, self.k_scale, self.dtype), dequantize_kv(v_out, self.v_scale, self.dtype)

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
