"""int8 KV cache: one fixed scale per KV head for K (after RoPE, as cached) and one for V, set to the
head's largest magnitude on calibration data / 127, so no calibration value clips.

Swaps each Attention for `models.quant.Int8KVAttention`; weights are untouched, so this pass composes
with any weight method (run it after it). Per-head static scales are what a fused int8 attention
kernel and ExecuTorch's quantized cache can use without a per-token side tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.llama import Attention, apply_rope
from models.quant import Int8KVAttention, replace_module_
from models.registry import METHODS
from toolchain.compress.common import require_calibration


@dataclass(frozen=True)
class KVInt8:
    n_calib: int = 16

    def __post_init__(self):
        if isinstance(self.n_calib, bool) or not isinstance(self.n_calib, int) or self.n_calib < 1:
            raise EdgesmithError(f"n_calib={self.n_calib!r} must be a positive integer")


@torch.no_grad()
def head_amax(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Largest |k| (post-RoPE) and |v| per KV head of every attention, over the calibration tokens."""
    names = [n for n, m in model.named_modules() if isinstance(m, Attention) and not isinstance(m, Int8KVAttention)]
    amax = {n: [None, None] for n in names}
    T = calib.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]

    def hook(name, which):
        attn = model.get_submodule(name)

        def fn(mod, inp, out):
            B = out.shape[0]
            x = out.float().view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
            if which == 0:
                x = apply_rope(x, cos, sin)
            m = x.abs().amax(dim=(0, 2, 3))
            cur = amax[name][which]
            amax[name][which] = m if cur is None else torch.maximum(cur, m)
        return fn

    hooks = [model.get_submodule(f"{n}.{p}").register_forward_hook(hook(n, i))
             for n in names for i, p in enumerate(("k_proj", "v_proj"))]
    try:
        for i in range(0, calib.shape[0], batch_size):
            model(calib[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: (k, v) for n, (k, v) in amax.items()}


@METHODS.register("kv_int8", config=KVInt8, estimate_s=5.0)
def kv_int8(model: nn.Module, cfg: KVInt8, ctx) -> nn.Module:
    calib = require_calibration(ctx, cfg, "kv_int8")
    scales = {}
    for name, (k, v) in head_amax(model, calib).items():
        ks, vs = k.clamp(min=1e-6) / 127, v.clamp(min=1e-6) / 127
        replace_module_(model, name, Int8KVAttention(model.get_submodule(name), ks, vs))
        scales[name] = {"k_scale": ks.tolist(), "v_scale": vs.tolist()}
    ctx.report["kv_scales"] = scales
    return model
