"""Rotary position embeddings in Hugging Face's rotate-half convention: frequencies (plain, "linear" and
Llama-3's "llama3" scaling, as transformers computes them), the cos/sin tables and their application. The model
(models/llama.py) and the exporters' graphs read the same tables. Nothing here knows about layers or files.
"""

from __future__ import annotations

import math

import torch

from models.errors import EdgesmithError

ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(s: dict) -> None:
    """One line naming the key when a rope_scaling is not one we represent."""
    kind = s.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise EdgesmithError(f"rope_scaling: rope_type={kind!r:.40} is not supported; allowed: {', '.join(ROPE_SCALINGS)}")
    for key in ROPE_SCALINGS[kind]:
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise EdgesmithError(f"rope_scaling: {key}={v!r:.40} must be a positive finite number")
    extra = sorted(set(s) - {"rope_type", *ROPE_SCALINGS[kind]})
    if extra:
        raise EdgesmithError(f"rope_scaling: {extra[0]}={s[extra[0]]!r:.40} is not supported for rope_type {kind!r}")
    if kind == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
        raise EdgesmithError("rope_scaling: high_freq_factor must be greater than low_freq_factor")


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> torch.Tensor:
    """Inverse frequencies `(head_dim / 2,)`, scaled as transformers scales them ("linear": all divided by the
    factor; "llama3": long wavelengths divided, short ones kept, a smooth blend between)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    s = dict(scaling)
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                scaling: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `(max_seq_len, head_dim)` in HF's layout: frequencies repeated in halves."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `(B, nh, T, hd)`, cos/sin `(T, hd)`: rotate the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
