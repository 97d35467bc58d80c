"""SmoothQuant W8A8: move activation outliers into the weights, then quantize activations to int8
dynamically per token (Xiao et al. 2022, arXiv:2211.10438).

Per stage, s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) over the input channel j, folded exactly into the
preceding RMSNorm or Linear (`common.fold_target`). Weights then take the canonical representation at
`bits` (8: W8A8, 4: W4A8, ExecuTorch's 8da4w) and every quantized Linear quantizes its input per
token to int8 at run time (`QuantizedLinear.act_bits = 8`). Skipped layers keep float activations too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.quant import QuantizedLinear, replace_module_
from models.registry import METHODS
from toolchain.compress.common import (WeightQuant, capture_inputs, fold_scales_, fold_target, plan_layers,
                                       progress, quantize_embeddings_, require_calibration, stages)


@dataclass(frozen=True)
class SmoothQuant(WeightQuant):
    bits: int = 8
    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise EdgesmithError(f"alpha={self.alpha!r} must be in [0, 1]")


@METHODS.register("smoothquant", config=SmoothQuant, estimate_s=5.0)
def smoothquant(model: nn.Module, cfg: SmoothQuant, ctx) -> nn.Module:
    plan = plan_layers(model, cfg, ctx.report)
    calib = require_calibration(ctx, cfg, "smoothquant")
    embeds = quantize_embeddings_(model, cfg)  # weights only: its output feeds a norm, not a matmul
    todo = [n for n, b in plan.items() if b is not None]
    all_stages = stages(model, todo)
    # Activation ranges of the float model, measured once before any fold.
    amax: dict[str, torch.Tensor] = {}

    def track(name, x):
        m = x.abs().amax(0)
        amax[name] = m if name not in amax else torch.maximum(amax[name], m)

    capture_inputs(model, [s[0] for s in all_stages], calib, track)
    with torch.no_grad():
        for stage in progress(all_stages, "smoothquant"):
            prev = fold_target(model, stage)
            if prev is not None:
                w_max = torch.stack([model.get_submodule(n).weight.abs().amax(0) for n in stage]).amax(0)
                s = (amax[stage[0]].clamp(min=1e-5).pow(cfg.alpha) / w_max.clamp(min=1e-5).pow(1 - cfg.alpha))
                fold_scales_(model, stage, prev, s.clamp(min=1e-5))
    # Quantize only after every fold: a fold into up_proj must land on its float weight.
    for name in todo:
        lin = model.get_submodule(name)
        replace_module_(model, name, QuantizedLinear.from_float(lin, plan[name], cfg.group_size, act_bits=8, name=name,
                                                                    target=cfg.target))
    ctx.report["layers"] = {**embeds, **plan}
    return model
