"""LoRA and QLoRA adapters: module swaps that make only low-rank updates trainable.

`apply_lora_(model, LoRA(...))` freezes every parameter, then wraps each Linear whose name matches
`targets` in a `LoRALinear`: `y = base(x) + scale * B(A(x))`, A `(r, in)` Kaiming-uniform, B `(out, r)`
zeros, so training starts from the base model exactly. With `qlora`, every Linear of the blocks becomes
the canonical 4-bit group-32 `models.quant.QuantizedLinear` first (int8 codes + fp16 scales, dequantized
on the fly in forward); the embedding and `lm_head` stay float, as QLoRA leaves them. `merge_lora_`
folds the adapters into plain float Linears (a QLoRA base is dequantized), giving a model every
exporter accepts. Adapters save to and load from safetensors. This module does not train.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from models.checkpoint import read_json, read_safetensors, replace_dir, temp_dir_for
from models.confine import confined
from models.errors import EdgesmithError
from models.quant import QuantizedLinear, replace_module_

DEFAULT_TARGETS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
QLORA_BITS, QLORA_GROUP = 4, 32
ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float | None = None  # None: 2 x rank
    targets: str = DEFAULT_TARGETS
    qlora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise EdgesmithError(f"--lora-rank: {self.rank!r} must be an integer >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise EdgesmithError(f"--lora-alpha: {self.alpha!r} must be > 0")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise EdgesmithError(f"--targets: {self.targets!r} is not a valid regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank


class LoRALinear(nn.Module):
    """A frozen base Linear (float or QuantizedLinear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, scale: float):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, scale
        for p in base.parameters():
            p.requires_grad_(False)
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def base_weight(self) -> torch.Tensor:
        b = self.base
        return b.dequantize(torch.float32) if isinstance(b, QuantizedLinear) else b.weight.detach().float()

    def merged(self) -> nn.Linear:
        w = self.base_weight() + (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return _float_linear(w, self.base.bias)


def _float_linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding `w` and a copy of `bias` (Qwen2's q/k/v keep theirs through a merge)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device)
    lin.weight.data.copy_(w)
    if bias is not None:
        lin.bias.data.copy_(bias.detach().float())
    return lin


def _tied_names(model: nn.Module) -> set[str]:
    return {"lm_head"} if getattr(model.config, "tie_embeddings", False) else set()


def apply_lora_(model: nn.Module, cfg: LoRA) -> list[str]:
    """Freeze `model`, (QLoRA: quantize its block Linears to 4 bits) and wrap the targets; names wrapped."""
    pattern = re.compile(cfg.targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linears if pattern.search(n) and n not in _tied_names(model)]
    if not targets:
        raise EdgesmithError(f"--targets: {cfg.targets!r} matches no Linear; names look like "
                             f"{', '.join(linears[:3])}, ..., {linears[-1]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.qlora:
        for name in linears:
            if name.startswith("layers."):
                replace_module_(model, name, QuantizedLinear.from_float(model.get_submodule(name), QLORA_BITS,
                                                                        QLORA_GROUP, name=name))
    for name in targets:
        replace_module_(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.scale))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain float Linear and dequantize any remaining QuantizedLinear."""
    for name, m in lora_modules(model).items():
        replace_module_(model, name, m.merged())
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        replace_module_(model, name, _float_linear(m.dequantize(torch.float32), m.bias))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a QLoRA base's codes count as parameters of the base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.qweight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    return trainable, total


# ----------------------------------------------------------------------------- adapter files


def save_adapter(model: nn.Module, cfg: LoRA, out: Path, base: str) -> Path:
    """Write `<out>/adapter.safetensors` (lora_A / lora_B by module name) and `adapter_config.json`."""
    out = Path(out)
    tensors = {}
    for name, m in lora_modules(model).items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().contiguous().cpu()
    tmp = temp_dir_for(out)
    try:
        save_file(tensors, str(tmp / ADAPTER_FILE))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps({**asdict(cfg), "base_checkpoint": base,
                                                      "modules": sorted(lora_modules(model))}, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_adapter_(model: nn.Module, path: Path) -> LoRA:
    """Apply the adapter saved at `path` to a base `model` (float or, for QLoRA, quantized in place)."""
    path = Path(path)
    meta = read_json(confined(path, ADAPTER_CONFIG, what="adapter config"))
    missing = [k for k in ("rank", "alpha", "targets", "qlora") if k not in meta]
    if missing:
        raise EdgesmithError(f"{path / ADAPTER_CONFIG}: missing field {missing[0]!r}")
    cfg = LoRA(rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"], qlora=meta["qlora"])
    adapter = confined(path, ADAPTER_FILE, what="adapter")
    names = apply_lora_(model, cfg)
    tensors = read_safetensors(adapter)
    for name in names:
        m = model.get_submodule(name)
        for key in ("lora_A", "lora_B"):
            t = tensors.get(f"{name}.{key}")
            if t is None or t.shape != getattr(m, key).shape:
                raise EdgesmithError(f"{path / ADAPTER_FILE}: missing or mis-shaped tensor {name}.{key}")
            getattr(m, key).data.copy_(t)
    return cfg
