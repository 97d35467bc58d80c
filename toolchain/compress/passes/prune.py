"""Pruning: the `prune` pass. Unstructured methods live here, structured ones in prune_structured.py.

Methods (`prune:method=...`):

- `magnitude`: zero the `ratio` share of weights of smallest |w|, over all targeted Linears at once
  (`scope=global`) or the same share in each (`scope=layer`).
- `2:4`: in every group of four consecutive weights along the input dimension, zero the two of
  smallest |w| (NVIDIA's semi-structured sparsity; exactly 50 %).
- `heads`, `channels`, `layers`: structured; they remove parameters and return a smaller model with
  a smaller ModelConfig (see prune_structured.py).

What unstructured sparsity buys, honestly: the zeros are stored as dense zeros, so the checkpoint, every
exported file and every dense kernel (PyTorch, ONNX Runtime, llama.cpp, XNNPACK) cost exactly what the
unpruned model costs — no size and no speed gain. A 2:4 pattern is the one a runtime can exploit:
TensorRT's sparse tensor cores (Ampere and later GPUs, Jetson Orin) run 2:4 INT8/FP16 GEMMs up to
about 2x faster when the engine is built with sparse weights allowed; ExecuTorch/XNNPACK, ONNX Runtime
CPU and llama.cpp do not. Unstructured magnitude pruning has no runtime here that exploits it. The
pass says so in its report. Zeros stay zeros through distill and qat (`keep_zeros`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.llama import Transformer
from models.lowrank import LowRankLinear
from models.quant import Int8KVAttention
from models.registry import PASSES
from toolchain.compress.prune_structured import prune_structured

METHODS = ("magnitude", "2:4", "heads", "channels", "layers")
STRUCTURED = ("heads", "channels", "layers")
SCOPES = ("global", "layer")
UNITS = ("groups", "heads")
DEFAULT_TARGETS = r"layers\.\d+\.(self_attn|mlp)\.\w+_proj$"

NOTE_UNSTRUCTURED = ("unstructured sparsity: zeros are stored dense; no runtime here (PyTorch, ONNX Runtime, "
                     "llama.cpp, ExecuTorch/XNNPACK) skips them, so size and speed are unchanged")
NOTE_24 = ("2:4 sparsity: stored dense, so size is unchanged and dense CPU kernels run no faster; TensorRT's "
           "sparse tensor cores (Ampere+ GPUs, Jetson Orin) exploit 2:4 for up to ~2x GEMM speed; "
           "ExecuTorch/XNNPACK, ONNX Runtime CPU and llama.cpp do not")


@dataclass(frozen=True)
class Prune:
    method: str = "magnitude"
    ratio: float | None = None  # share to remove; 2:4 is always 0.5
    scope: str = "global"  # magnitude: one threshold over all targets, or the same share per layer
    unit: str = "groups"  # heads: whole KV groups (a KV head and its query heads) or query heads per group
    targets: str = DEFAULT_TARGETS  # magnitude / 2:4: which Linears (regex on module names)
    n_calib: int = 16  # structured: calibration sequences that rank heads, channels or layers
    drop: tuple[int, ...] | None = None  # layers: exactly these blocks (edgesmith tune's choice), instead of a ratio

    def __post_init__(self):
        if self.method not in METHODS:
            raise EdgesmithError(f"prune: method={self.method!r} is not supported; allowed: {', '.join(METHODS)}")
        if self.drop is not None:
            drop = (self.drop,) if isinstance(self.drop, int) and not isinstance(self.drop, bool) else self.drop
            if self.method != "layers" or self.ratio is not None:
                raise EdgesmithError("prune: drop= names blocks for method=layers, in place of ratio=")
            if not isinstance(drop, tuple) or not drop or len(set(drop)) != len(drop) or \
                    any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in drop):
                raise EdgesmithError(f"prune: drop={self.drop!r} must be distinct block indices >= 0")
            object.__setattr__(self, "drop", tuple(sorted(drop)))
        elif self.method == "2:4":
            if self.ratio not in (None, 0.5):
                raise EdgesmithError(f"prune: ratio={self.ratio!r} does not apply to 2:4 (always 0.5); leave it out")
        elif self.ratio is None:
            raise EdgesmithError(f"prune: method={self.method} needs ratio= (the share to remove, 0 < ratio < 1)")
        elif isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise EdgesmithError(f"prune: ratio={self.ratio!r} is out of range; allowed: 0 < ratio < 1")
        if self.scope not in SCOPES:
            raise EdgesmithError(f"prune: scope={self.scope!r} is not supported; allowed: {', '.join(SCOPES)}")
        if self.unit not in UNITS:
            raise EdgesmithError(f"prune: unit={self.unit!r} is not supported; allowed: {', '.join(UNITS)}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise EdgesmithError(f"prune: targets={self.targets!r} is not a valid regular expression ({e})") from None
        if isinstance(self.n_calib, bool) or not isinstance(self.n_calib, int) or self.n_calib < 1:
            raise EdgesmithError(f"prune: n_calib={self.n_calib!r} must be a positive integer")


def require_plain(model: nn.Module, method: str) -> None:
    """Pruning works on float weights of the plain model: refuse quantized or factorized modules by name."""
    if not isinstance(model, Transformer):
        raise EdgesmithError(f"prune {method}: expects the edgesmith Transformer, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, (LowRankLinear, Int8KVAttention)) or hasattr(m, "qweight"):  # quantized: codes, not weights
            raise EdgesmithError(f"prune {method}: {name} is a {type(m).__name__}; "
                                 "prune before quantize / lowrank passes")


def target_linears(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    found = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and re.search(pattern, n)}
    if not found:
        raise EdgesmithError(f"prune: targets={pattern!r} matches no float Linear")
    return found


# ----------------------------------------------------------------------------- unstructured


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], ratio: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the `ratio` share of smallest |w| removed, globally or per tensor (exact counts)."""
    def drop_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.ones(scores.numel(), dtype=torch.bool)
        keep[torch.argsort(scores.flatten(), stable=True)[:k]] = False
        return keep

    if scope == "layer":
        return {n: drop_smallest(w.abs(), round(ratio * w.numel())).view(w.shape) for n, w in weights.items()}
    flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
    keep = drop_smallest(flat, round(ratio * flat.numel()))
    masks, i = {}, 0
    for n, w in weights.items():
        masks[n] = keep[i:i + w.numel()].view(w.shape)
        i += w.numel()
    return masks


@torch.no_grad()
def two_four_mask(w: torch.Tensor, name: str = "?") -> torch.Tensor:
    """Keep-mask with the two largest |w| of every four consecutive input columns."""
    out_f, in_f = w.shape
    if in_f % 4:
        raise EdgesmithError(f"prune 2:4: {name} has {in_f} input features, not a multiple of 4")
    groups = w.abs().reshape(out_f, in_f // 4, 4)  # (out, in/4, 4)
    top2 = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return keep.reshape(out_f, in_f)


def _apply_masks_(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor], report: dict) -> None:
    layers, zeros, total = {}, 0, 0
    with torch.no_grad():
        for n, lin in linears.items():
            lin.weight.mul_(masks[n].to(lin.weight.dtype))
            z = int((lin.weight == 0).sum())
            layers[n] = round(z / lin.weight.numel(), 4)
            zeros, total = zeros + z, total + lin.weight.numel()
    report["sparsity"] = {"layers": layers, "zeros": zeros, "weights": total, "share": round(zeros / total, 4)}


def prune_magnitude(model: nn.Module, cfg: Prune, ctx) -> nn.Module:
    linears = target_linears(model, cfg.targets)
    masks = magnitude_masks({n: m.weight.detach() for n, m in linears.items()}, cfg.ratio, cfg.scope)
    _apply_masks_(linears, masks, ctx.report)
    ctx.report["note"] = NOTE_UNSTRUCTURED
    return model


def prune_two_four(model: nn.Module, cfg: Prune, ctx) -> nn.Module:
    linears = target_linears(model, cfg.targets)
    masks = {n: two_four_mask(m.weight.detach(), n) for n, m in linears.items()}
    _apply_masks_(linears, masks, ctx.report)
    ctx.report["note"] = NOTE_24
    return model


@PASSES.register("prune", config=Prune)
def prune(model: nn.Module, cfg: Prune, ctx) -> nn.Module:
    require_plain(model, cfg.method)
    if cfg.method == "magnitude":
        return prune_magnitude(model, cfg, ctx)
    if cfg.method == "2:4":
        return prune_two_four(model, cfg, ctx)
    return prune_structured(model, cfg, ctx)
