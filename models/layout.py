"""What a family's checkpoint stores differently from how our one model holds it.

Phi-3 writes q/k/v as one `self_attn.qkv_proj` (rows: the query heads, then the key heads, then the value
heads) and gate/up as one `mlp.gate_up_proj` (gate rows, then up rows). Our one model has q_proj, k_proj,
v_proj, gate_proj and up_proj as in Llama, so a checkpoint is split where it is read and fused again where it is
written (float weights only: a quantized projection keeps its codes under its own name, which only edgesmith reads).
Gemma's RMSNorms compute `x * (1 + w)` and store w; ours computes `x * w`, so the norms hold 1 + w, added in fp32 at
read as transformers adds it at run time (the same value, exactly) and taken off at write (exact for every
w >= -0.5: fl(1 + w) - 1 is then representable). This module knows names and row counts; it reads and writes no
files.
"""

from __future__ import annotations

import torch

from models.errors import EdgesmithError
from models.llama import ModelConfig

# family -> fused HF projection -> the projections it holds, in row order
FUSED = {"phi3": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}}


NORM_OFFSET = ("gemma2", "gemma3")  # families whose norm weights are stored as w for x * (1 + w)


def _offset(tensors: dict[str, torch.Tensor], cfg: ModelConfig, sign: int) -> dict[str, torch.Tensor]:
    if cfg.family not in NORM_OFFSET:
        return tensors
    return {k: (v.float() + sign).to(v.dtype if sign < 0 else torch.float32) if k.endswith("norm.weight") else v
            for k, v in tensors.items()}


def _rows(cfg: ModelConfig, fused: str) -> tuple[int, ...]:
    if fused == "mlp.gate_up_proj":
        return cfg.ffn_dim, cfg.ffn_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    return cfg.n_heads * cfg.head_dim, kv, kv


def fuse_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors with each fused projection of the family written as one tensor, where every part is a
    float `.weight`, and Gemma's norms as w (meta tensors work too: the expected shapes of a checkpoint)."""
    out = dict(_offset(tensors, cfg, -1))
    for fused, parts in FUSED.get(cfg.family, {}).items():
        for name in list(out):
            if name.endswith(f".{parts[0]}.weight"):
                prefix = name[: -len(f"{parts[0]}.weight")]
                keys = [f"{prefix}{p}.weight" for p in parts]
                if all(k in out for k in keys):
                    out[f"{prefix}{fused}.weight"] = torch.cat([out.pop(k) for k in keys])
    return out


def split_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source) -> dict[str, torch.Tensor]:
    """The inverse of fuse_hf: each fused projection's rows back to the projections it holds (views, no copy),
    Gemma's norms as 1 + w."""
    groups = FUSED.get(cfg.family, {})
    out = {}
    for name, t in _offset(tensors, cfg, +1).items():
        fused = next((f for f in groups if name.endswith(f".{f}.weight")), None)
        if fused is None:
            out[name] = t
            continue
        rows = _rows(cfg, fused)
        if t.dim() != 2 or t.shape[0] != sum(rows):
            raise EdgesmithError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                 f"({sum(rows)}, {cfg.dim})")
        prefix = name[: -len(f"{fused}.weight")]
        for part, chunk in zip(groups[fused], t.split(rows)):
            out[f"{prefix}{part}.weight"] = chunk
    return out
