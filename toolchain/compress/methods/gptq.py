"""GPTQ: quantize a Linear column by column, pushing each column's rounding error onto the columns
not yet quantized through the inverse Hessian of the layer's calibration inputs (Frantar et al. 2022,
arXiv:2210.17323; the blocked, Cholesky-based form of its reference implementation).

Stages run in forward order, so every stage's Hessian is measured on inputs that already went through
the quantized stages before it. `act_order` visits columns by decreasing Hessian diagonal; group
scales are then fixed up front from the float weights ("static groups"), so codes stay in the
canonical contiguous-group layout that every export format reads (no g_idx).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.quant import group_scales, quantize_codes
from models.registry import METHODS
from toolchain.compress.common import (WeightQuant, capture_inputs, plan_layers, progress, quantize_embeddings_,
                                       require_calibration, stages, swap_quantized_)

BLOCK = 128  # columns per lazy-update block; a multiple of every allowed group size


@dataclass(frozen=True)
class GPTQ(WeightQuant):
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.act_order, bool):
            raise EdgesmithError(f"act_order={self.act_order!r}; allowed: true, false")
        if not 0 < self.damp < 1:
            raise EdgesmithError(f"damp={self.damp!r} must be in (0, 1)")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
                  damp: float = 0.01, target: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """W `(out, in)`, H `(in, in)` -> (codes int8 `(out, in)`, scales fp16 `(out, in/g)`)."""
    W = W.detach().float().clone()
    H = H.clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = in_f // group_size
    scales = torch.zeros(out_f, n_groups)
    if act_order:  # static groups: scales from the float weights before any update
        scales = group_scales(W.reshape(out_f, n_groups, group_size), bits, target).squeeze(-1)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(in_f)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_f)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    codes = torch.zeros(out_f, in_f, dtype=torch.int8)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:
                scales[:, g] = group_scales(W1[:, i:i + group_size], bits, target).squeeze(-1)
            d32 = scales[:, g]
            q = quantize_codes(W1[:, i], d32, bits, target)
            codes[:, col] = q
            deq = q.float() * d32.half().float()  # what the stored fp16 scale reproduces
            err = (W1[:, i] - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales.half()


@METHODS.register("gptq", config=GPTQ, estimate_s=15.0)
def gptq(model: nn.Module, cfg: GPTQ, ctx) -> nn.Module:
    plan = plan_layers(model, cfg, ctx.report)
    calib = require_calibration(ctx, cfg, "gptq")
    embeds = quantize_embeddings_(model, cfg)
    todo = [n for n, b in plan.items() if b is not None]
    for stage in progress(stages(model, todo), "gptq"):
        in_f = model.get_submodule(stage[0]).in_features
        acc = {"H": torch.zeros(in_f, in_f), "n": 0}

        def add(name, x, acc=acc):
            acc["H"] += x.T @ x
            acc["n"] += x.shape[0]

        capture_inputs(model, stage[:1], calib, add)  # a stage's Linears share one input
        H = 2.0 * acc["H"] / max(acc["n"], 1)
        for name in stage:
            lin = model.get_submodule(name)
            codes, scales = gptq_quantize(lin.weight, H, plan[name], cfg.group_size, cfg.act_order, cfg.damp,
                                          cfg.target)
            swap_quantized_(model, name, codes, scales, plan[name], cfg.group_size)
    ctx.report["layers"] = {**embeds, **plan}
    return model
