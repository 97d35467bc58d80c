"""Readable PyTorch references of the fused ops: the numbers every implementation must match.

Each function here has the same signature as its fused CPU (kernels/cpu.py) and Triton
(kernels/triton_kernels.py) counterparts. They are written for clarity, not speed: attention builds
the whole score matrix and repeats K/V for grouped-query heads, the weight-only matmul dequantizes
the whole weight. The model's own inline code (models/llama.py) computes the same things and stays
the default path; `merge_partials` / `partial_attention` spell out the split-KV log-sum-exp merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.llama import apply_rope
from models.quant import dequantize


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(weight * rmsnorm(x + residual), x + residual); without a residual the second is None.
    Normalises in fp32 and casts back before the weight, as HF LlamaRMSNorm does."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y, None if residual is None else h


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x `(B, H, T, D)` in place by the rows cos/sin `(T, D)` (HF rotate-half convention)."""
    x.copy_(apply_rope(x, cos, sin))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def flash_attention(q, k, v, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal grouped-query attention: q `(B, H, T, D)`, k/v `(B, Hkv, S, D)`; query t sees key j iff
    j <= q_pos[t]. Softmax in fp32."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T, S)
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= q_pos[:, None]  # (T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def decode_attention(q, k_cache, v_cache, input_pos: torch.Tensor, scale: float, split: int = 0) -> torch.Tensor:
    """One query per head `(B, H, 1, D)` against the cache's live keys 0..input_pos (the split is an
    implementation choice; the reference attends over all live keys at once)."""
    return flash_attention(q, k_cache, v_cache, input_pos.reshape(1), scale)


def partial_attention(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q `(..., D)` over one tile of keys k/v `(..., n, D)`: (output normalised within the
    tile `(..., D)`, log-sum-exp of the tile's scores `(...)`)."""
    s = (k @ q.unsqueeze(-1)).squeeze(-1) * scale  # (..., n)
    return (s.softmax(-1).unsqueeze(-2) @ v).squeeze(-2), torch.logsumexp(s, -1)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Merge per-tile outputs `(..., n_tiles, D)` by their log-sum-exps `(..., n_tiles)`: tile c gets
    weight exp(lse_c - logsumexp(lse)), exactly its share of the full softmax."""
    w = torch.softmax(lses, dim=-1)  # exp(lse_c - logsumexp_c lse_c)
    return (w.unsqueeze(-1) * outs).sum(-2)


def weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x `(..., K)` @ W^T with W = scales * codes (canonical group-quantized weight, models/quant.py)."""
    return F.linear(x, dequantize(qweight, scales, x.dtype))
