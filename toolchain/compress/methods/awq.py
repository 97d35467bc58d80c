"""AWQ: activation-aware per-input-channel scales, searched on calibration data and folded into the
layer before (Lin et al. 2023, arXiv:2306.00978).

For each stage, s = mean|x|^a (normalised), a on a grid in [0, 1): the a whose round-to-nearest
quantization of `W * s` (inputs divided by s) best reproduces the float stage output wins. a = 0 is
plain RTN, so the search never does worse than RTN on the calibration outputs. The scales are folded
exactly into the preceding RMSNorm weight or Linear rows (`common.fold_target`); stages with no such
layer (o_proj under grouped-query attention) are quantized with s = 1. Then, as the paper's second
step, each group's range is clipped: the scale is shrunk by the ratio (1.0 down to `min_clip`) that
minimises that group's contribution to the output error on calibration inputs; ratio 1.0 is RTN again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.quant import (QuantizedLinear, dequantize, fit_scales, group_scales, quantize_codes, quantize_rtn,
                          replace_module_)
from models.registry import METHODS
from toolchain.compress.common import (WeightQuant, capture_inputs, fold_scales_, fold_target, plan_layers,
                                       progress, quantize_embeddings_, require_calibration, stages)


CLIP_TOKENS = 1024  # calibration rows in the clip search (AutoAWQ uses 512)


@dataclass(frozen=True)
class AWQ(WeightQuant):
    n_grid: int = 20
    max_tokens: int = 4096  # calibration rows used in the loss of the scale and clip searches
    n_clip: int = 10
    min_clip: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise EdgesmithError(f"n_grid={self.n_grid!r} must be a positive integer")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise EdgesmithError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if isinstance(self.n_clip, bool) or not isinstance(self.n_clip, int) or self.n_clip < 1:
            raise EdgesmithError(f"n_clip={self.n_clip!r} must be a positive integer")
        if not 0 < self.min_clip <= 1:
            raise EdgesmithError(f"min_clip={self.min_clip!r} must be in (0, 1]")


def collect_input(model: nn.Module, name: str, calib: torch.Tensor, max_tokens: int) -> torch.Tensor:
    xs = []
    capture_inputs(model, [name], calib, lambda n, x: xs.append(x))
    X = torch.cat(xs)
    if X.shape[0] > max_tokens:
        X = X[torch.linspace(0, X.shape[0] - 1, max_tokens).long()]
    return X


@torch.no_grad()
def search_scales(X: torch.Tensor, weights: list[torch.Tensor], bits: list[int], group_size: int,
                  n_grid: int, target: str = "any") -> tuple[torch.Tensor, float]:
    """Best per-input-channel scales for Linears reading X, and the exponent that produced them."""
    x_mean = X.abs().mean(0)
    refs = [X @ w.float().T for w in weights]
    best, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for k in range(n_grid):
        a = k / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, b, ref in zip(weights, bits, refs):
            wq = dequantize(*quantize_rtn(w.float() * s, b, group_size, target)) / s
            loss += (X @ wq.T - ref).pow(2).mean().item()
        if loss < best:
            best, best_s, best_a = loss, s, a
    return best_s, best_a


@torch.no_grad()
def clip_search(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int, n_clip: int,
                min_clip: float, target: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and fp16 scales of W `(out, in)` with each group's scale shrunk by the ratio that minimises
    |X_g (w_g - q(w_g))|^2 over the calibration rows X `(n, in)` (ratio 1.0 = round to nearest)."""
    out_f, in_f = W.shape
    ng = in_f // group_size
    Wg = W.float().reshape(out_f, ng, group_size)  # (out, ng, g)
    Xg = X.float().reshape(-1, ng, group_size)  # (n, ng, g)
    d0 = group_scales(Wg, bits, target)  # (out, ng, 1)
    best_err = torch.full((out_f, ng), float("inf"))
    best_d = d0.clone()
    for k in range(n_clip):
        r = 1.0 - (1.0 - min_clip) * k / max(n_clip - 1, 1)
        d = fit_scales(d0 * r, target)
        deq = quantize_codes(Wg, d, bits, target).float() * d.half().float()
        err = torch.einsum("njk,ojk->noj", Xg, Wg - deq).pow(2).sum(0)  # (out, ng)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better.unsqueeze(-1), d, best_d)
    codes = quantize_codes(Wg, best_d, bits, target).reshape(out_f, in_f)
    return codes, best_d.squeeze(-1).half()


@METHODS.register("awq", config=AWQ, estimate_s=60.0)
def awq(model: nn.Module, cfg: AWQ, ctx) -> nn.Module:
    plan = plan_layers(model, cfg, ctx.report)
    calib = require_calibration(ctx, cfg, "awq")
    embeds = quantize_embeddings_(model, cfg)
    todo = [n for n, b in plan.items() if b is not None]
    chosen = {}
    block_of = lambda stage: stage[0].split(".")[1] if stage[0].startswith("layers.") else stage[0]  # noqa: E731
    for _, block in progress(itertools.groupby(stages(model, todo), key=block_of), "awq"):
        block = list(block)
        for stage in block:  # search and fold on float weights; quantize the block afterwards
            prev = fold_target(model, stage)
            if prev is None:
                continue
            X = collect_input(model, stage[0], calib, cfg.max_tokens)
            weights = [model.get_submodule(n).weight for n in stage]
            s, a = search_scales(X, weights, [plan[n] for n in stage], cfg.group_size, cfg.n_grid, cfg.target)
            fold_scales_(model, stage, prev, s)
            chosen[",".join(stage)] = a
        for stage in block:
            X = collect_input(model, stage[0], calib, CLIP_TOKENS)
            for name in stage:
                codes, scales = clip_search(model.get_submodule(name).weight, X, plan[name], cfg.group_size,
                                            cfg.n_clip, cfg.min_clip, cfg.target)
                replace_module_(model, name, QuantizedLinear.from_codes(codes, scales, plan[name], cfg.group_size,
                                                                        bias=model.get_submodule(name).bias))
    ctx.report["layers"] = {**embeds, **plan}
    ctx.report["awq_alpha"] = chosen
    return model
