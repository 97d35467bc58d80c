"""Round-to-nearest weight quantization: llama.cpp's Q4_0 / Q8_0 rule per group, no calibration.

The baseline every other method must beat; its codes equal llama.cpp's own quantizer's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.quant import QuantizedLinear, replace_module_
from models.registry import METHODS
from toolchain.compress.common import WeightQuant, plan_layers, quantize_embeddings_


@dataclass(frozen=True)
class RTN(WeightQuant):
    pass


@METHODS.register("rtn", config=RTN, estimate_s=3.0)
def rtn(model: nn.Module, cfg: RTN, ctx) -> nn.Module:
    plan = plan_layers(model, cfg, ctx.report)
    embeds = quantize_embeddings_(model, cfg)
    for name, bits in plan.items():
        if bits is not None:
            lin = model.get_submodule(name)
            replace_module_(model, name, QuantizedLinear.from_float(lin, bits, cfg.group_size, name=name,
                                                                    target=cfg.target))
    ctx.report["layers"] = {**embeds, **plan}
    return model
