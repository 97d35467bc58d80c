"""A Linear factorized into two: `LowRankLinear`, and the checkpoint metadata that rebuilds it.

`LowRankLinear(in_features, out_features, rank)` computes `y = b(a(x))` with `a` an `nn.Linear(in, r)`
and `b` an `nn.Linear(r, out)`, both bias-free: `W ≈ b.weight @ a.weight`, `r (in + out)` parameters
instead of `in x out`. The factors are ordinary Linears, so every later pass sees them (a quantization
pass quantizes `q_proj.a` and `q_proj.b` like any Linear; their names follow the module's, with `.a`
/ `.b` appended). `dense_weight()` multiplies them back (dequantizing quantized factors) for formats
that have no factorized Linear (GGUF).

`lowrank_meta(model)` / `apply_lowrank_meta_(model, meta)`: the `edgesmith.json` "lowrank" entry
(`{"version": 1, "layers": {HF module name: rank}}`) and the module swaps that make a model's state
dict match a factorized checkpoint before its tensors load. This module does not choose ranks or
compute SVDs (toolchain/compress/lowrank.py does).
"""

from __future__ import annotations

import torch
from torch import nn

from models.errors import EdgesmithError
from models.quant import QuantizedLinear, replace_module_

META_VERSION = 1


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise EdgesmithError(f"rank={rank!r} is out of range for a {out_features} x {in_features} Linear; "
                                 f"allowed: 1..{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)

    @classmethod
    def from_factors(cls, b_weight: torch.Tensor, a_weight: torch.Tensor) -> LowRankLinear:
        """`b_weight (out, r) @ a_weight (r, in)` as a module."""
        m = cls(a_weight.shape[1], b_weight.shape[0], a_weight.shape[0])
        with torch.no_grad():
            m.a.weight.copy_(a_weight)
            m.b.weight.copy_(b_weight)
        return m.to(a_weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `(out, in)` weight the two factors compute, multiplied out in float32."""
        def w(m):
            return m.dequantize(torch.float32) if isinstance(m, QuantizedLinear) else m.weight.detach().float()
        return (w(self.b) @ w(self.a)).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _hf(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def lowrank_meta(model: nn.Module) -> dict | None:
    """The edgesmith.json "lowrank" entry, or None when no Linear is factorized."""
    layers = {_hf(n): m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {"version": META_VERSION, "layers": layers} if layers else None


def apply_lowrank_meta_(model: nn.Module, meta: dict | None, source: str = "edgesmith.json") -> nn.Module:
    """Swap each Linear named in `meta` for an empty LowRankLinear of its rank, so the factors load into place."""
    if not meta:
        return model
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise EdgesmithError(f"{source}: lowrank.version={meta.get('version') if isinstance(meta, dict) else meta!r}"
                             f" is not supported; allowed: {META_VERSION}")
    for hf_name, rank in (meta.get("layers") or {}).items():
        name = hf_name.removeprefix("model.")
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise EdgesmithError(f"{source}: lowrank names unknown layer {hf_name!r}") from None
        if not isinstance(lin, nn.Linear):
            raise EdgesmithError(f"{source}: lowrank names {hf_name!r}, which is not a Linear")
        try:
            replace_module_(model, name, LowRankLinear(lin.in_features, lin.out_features, rank))
        except EdgesmithError as e:
            raise EdgesmithError(f"{source}: {hf_name}: {e}") from None
    return model
