"""Low-rank factorization: the `lowrank` pass. A Linear W `(out, in)` becomes two Linears of rank r,
`W ≈ B A` with `A = S_r^1/2 V_r^T (r, in)` and `B = U_r S_r^1/2 (out, r)` from the SVD W = U S V^T
(models/lowrank.py `LowRankLinear`).

The rank of each targeted Linear is chosen by exactly one of:
- `energy=e`: the smallest r whose singular values keep the share e of ||W||_F^2;
- `budget=b`: one energy threshold for all targets, the highest whose total parameters stay within
  the share b of the targets' dense parameters (a global parameter budget);
- `rank=r`: the same rank everywhere (`rank=full`: min(out, in) of each Linear, an exact factorization
  that only checks the machinery: it never saves parameters).
Ranks from energy / budget are rounded up to a multiple of `multiple` (default 32, so the second
factor's input can be quantized in 32-wide groups) and capped at min(out, in). A Linear is factorized
only where it reduces parameters, r (out + in) < out x in (the break-even rank is out x in / (out + in));
`only_smaller=false` factorizes regardless (e.g. to check that full rank reproduces the model).

What it buys: fewer parameters and multiply-adds in the checkpoint, the ONNX graph and the ExecuTorch
program (both keep the two matmuls). GGUF cannot: llama.cpp's llama architecture has no factorized
Linear, so the GGUF exporter multiplies the factors back and the .gguf is as large as the dense model.
`transformers.LlamaForCausalLM` cannot load a factorized checkpoint either (like a quantized one, it is
ours). The ranks are chosen from the weights alone; activation-aware choices are not made here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import EdgesmithError
from models.lowrank import LowRankLinear
from models.quant import replace_module_
from models.registry import PASSES
from toolchain.compress.passes.prune import DEFAULT_TARGETS


@dataclass(frozen=True)
class LowRank:
    energy: float | None = None
    budget: float | None = None
    rank: int | str | None = None  # an integer, or "full"
    multiple: int = 32
    targets: str = DEFAULT_TARGETS
    only_smaller: bool = True

    def __post_init__(self):
        given = [k for k in ("energy", "budget", "rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise EdgesmithError("lowrank: give exactly one of energy=, budget=, rank= "
                                 f"(got {', '.join(given) or 'none'})")
        if self.energy is not None and (isinstance(self.energy, bool) or not 0 < self.energy <= 1):
            raise EdgesmithError(f"lowrank: energy={self.energy!r} is out of range; allowed: 0 < energy <= 1")
        if self.budget is not None and (isinstance(self.budget, bool) or not 0 < self.budget < 1):
            raise EdgesmithError(f"lowrank: budget={self.budget!r} is out of range; allowed: 0 < budget < 1")
        if self.rank is not None and self.rank != "full" and (
                isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise EdgesmithError(f"lowrank: rank={self.rank!r} is out of range; allowed: an integer >= 1, or full")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise EdgesmithError(f"lowrank: multiple={self.multiple!r} must be an integer >= 1")
        if not isinstance(self.only_smaller, bool):
            raise EdgesmithError(f"lowrank: only_smaller={self.only_smaller!r}; allowed: true, false")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise EdgesmithError(f"lowrank: targets={self.targets!r} is not a valid regular expression ({e})") from None


@torch.no_grad()
def factorize(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W `(out, in)` -> (B `(out, r)`, A `(r, in)`), the best rank-r approximation B A (float64 SVD)."""
    U, S, Vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).to(w.dtype), (root.unsqueeze(1) * Vh[:rank]).to(w.dtype)


def break_even(out_f: int, in_f: int) -> float:
    return out_f * in_f / (out_f + in_f)


def _allowed_ranks(out_f: int, in_f: int, multiple: int) -> list[int]:
    top = min(out_f, in_f)
    return sorted({min(r, top) for r in range(multiple, top + multiple, multiple)})


def _energy_curve(w: torch.Tensor) -> torch.Tensor:
    """Share of ||W||_F^2 kept by the first r singular values, r = 1..min(out, in)."""
    s2 = torch.linalg.svdvals(w.detach().double()).pow(2)
    return s2.cumsum(0) / s2.sum().clamp(min=1e-300)


def _rank_for_energy(curve: torch.Tensor, energy: float, allowed: list[int]) -> int:
    need = int(torch.searchsorted(curve, torch.tensor(energy - 1e-12, dtype=curve.dtype))) + 1
    return next((r for r in allowed if r >= need), allowed[-1])


def _cost(out_f: int, in_f: int, r: int, only_smaller: bool) -> int:
    return r * (out_f + in_f) if (r * (out_f + in_f) < out_f * in_f or not only_smaller) else out_f * in_f


def choose_ranks(linears: dict[str, nn.Linear], cfg: LowRank) -> dict[str, int]:
    """Rank per targeted Linear (before the only-where-smaller filter)."""
    if cfg.rank == "full":
        return {n: min(m.out_features, m.in_features) for n, m in linears.items()}
    if cfg.rank is not None:
        for n, m in linears.items():
            if cfg.rank > min(m.out_features, m.in_features):
                raise EdgesmithError(f"lowrank: rank={cfg.rank} is out of range for {n} ({m.out_features} x "
                                     f"{m.in_features}); allowed: 1..{min(m.out_features, m.in_features)}")
        return {n: cfg.rank for n in linears}
    curves = {n: _energy_curve(m.weight) for n, m in linears.items()}
    allowed = {n: _allowed_ranks(m.out_features, m.in_features, cfg.multiple) for n, m in linears.items()}
    if cfg.energy is not None:
        return {n: _rank_for_energy(curves[n], cfg.energy, allowed[n]) for n in linears}
    dense = sum(m.weight.numel() for m in linears.values())

    def total(threshold: float) -> tuple[int, dict[str, int]]:
        ranks = {n: _rank_for_energy(curves[n], threshold, allowed[n]) for n in linears}
        return sum(_cost(m.out_features, m.in_features, ranks[n], cfg.only_smaller) for n, m in linears.items()), ranks

    floor, ranks = total(0.0)
    if floor > cfg.budget * dense:
        raise EdgesmithError(f"lowrank: budget={cfg.budget} is below what the smallest rank ({cfg.multiple}) in every "
                             f"target needs ({floor / dense:.3f} of their parameters); "
                             f"allowed: budget >= {floor / dense:.3f}")
    candidates = sorted({float(curves[n][r - 1]) for n in linears for r in allowed[n]})
    lo, hi = 0, len(candidates) - 1  # the largest threshold whose cost fits (cost grows with the threshold)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(candidates[mid])[0] <= cfg.budget * dense:
            lo = mid
        else:
            hi = mid - 1
    cost, best = total(candidates[lo])
    return best if cost <= cfg.budget * dense else ranks


@PASSES.register("lowrank", config=LowRank)
def lowrank(model: nn.Module, cfg: LowRank, ctx) -> nn.Module:
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and re.search(cfg.targets, n)}
    biased = sorted(n for n, m in linears.items() if m.bias is not None)  # LowRankLinear holds no bias: left dense
    if biased:
        ctx.report.setdefault("warnings", []).append(f"lowrank: {len(biased)} Linear(s) with a bias left dense "
                                                     f"({biased[0]}, ...)")
        linears = {n: m for n, m in linears.items() if m.bias is None}
    if not linears:
        raise EdgesmithError(f"lowrank: targets={cfg.targets!r} matches no float Linear (quantized or already "
                             "factorized layers are not factorized again)")
    ranks = choose_ranks(linears, cfg)
    layers, before, after = {}, 0, 0
    for name, lin in linears.items():
        r, (o, i) = ranks[name], lin.weight.shape
        energy = float(_energy_curve(lin.weight)[r - 1])
        entry = {"shape": [o, i], "rank": r, "break_even": round(break_even(o, i), 1), "energy": round(energy, 5)}
        before += o * i
        if cfg.only_smaller and r * (o + i) >= o * i:
            entry["factorized"] = False  # not below the break-even rank: a factorization would grow it
            after += o * i
        else:
            b, a = factorize(lin.weight, r)
            replace_module_(model, name, LowRankLinear.from_factors(b, a).to(lin.weight.device))
            entry["factorized"] = True
            after += r * (o + i)
        layers[name] = entry
    ctx.report.update({"layers": layers, "target_params": [before, after],
                       "factorized": sum(e["factorized"] for e in layers.values()),
                       "note": "ONNX and ExecuTorch keep both factors (two matmuls); GGUF multiplies them back "
                               "(llama.cpp has no factorized Linear), so a .gguf does not shrink"})
    return model
