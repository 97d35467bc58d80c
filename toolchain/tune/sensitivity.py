"""Per-layer sensitivity: how much the whole model's output moves when only one unit is quantized.

A *unit* is what `edgesmith tune` assigns a precision to: the token embedding, each transformer block
(`layers.N`: its attention and MLP Linears) and `lm_head` (with tied embeddings the head is the
embedding: one unit). For each bit width searched (4 and 8; 5 too where the size is a GGUF's, which holds it as
Q5_0) the model is quantized once, whole, with the chosen
method; then each unit alone is swapped into the float model and the mean KL divergence of the
next-token distribution against the float model is measured on calibration windows of the TRAIN
split (validation stays for judging the candidates). Each unit's deployed bytes at each width come from
the same quantized modules. With `drop`, each block is also measured skipped (structured layer pruning:
state "drop", 0 bytes). The result is cached in a JSON file keyed by the checkpoint's weights sha256
and the settings, so a second tune (or a killed one, resumed) does not measure it again.
This module builds no candidate and reads no artifact.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.atomic import write_text_atomic
from models.confine import read_json
from models.quant import linear_names, replace_module_
from toolchain.compress import Context, apply, config_class
from toolchain.compress.common import embedding_names

BITS = (4, 8)  # the widths every format stores at their own size; 5 (GGUF's Q5_0) is asked for by the driver
FLOAT = "float"  # a unit kept in floating point (fp16 as deployed)
DROP = "drop"  # a block removed (prune:method=layers)


class Skip(nn.Module):
    """A dropped block: the residual stream passes through unchanged (the block's attention stays readable, not
    registered, for what the model asks of each layer)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["self_attn"] = block.self_attn

    def forward(self, x, *args, **kwargs):
        return x


def units(model: nn.Module) -> dict[str, list[str]]:
    """unit -> the module names it covers, in forward order: embed_tokens, layers.0 .. layers.N-1, lm_head."""
    linears = linear_names(model)
    out = {"embed_tokens": embedding_names(model)}
    for i in range(model.config.n_layers):
        out[f"layers.{i}"] = [n for n in linears if n.startswith(f"layers.{i}.")]
    if model.config.tie_embeddings:
        out["embed_tokens"] += [n for n in linears if n == "lm_head"]
    else:
        out["lm_head"] = [n for n in linears if n == "lm_head"]
    return {u: names for u, names in out.items() if names}


def unit_rule(unit: str) -> str:
    """The regex (first-match rule pattern, models' module names) that selects a unit's modules."""
    return rf"{unit.replace('.', chr(92) + '.')}\..*" if unit.startswith("layers.") else unit


def deployed_bytes(module: nn.Module) -> int:
    """Bytes of one module as deployed: b/8 per code + 2 per fp16 scale when quantized, else 2 per parameter."""
    if all(hasattr(module, a) for a in ("qweight", "scales", "bits")):
        return module.qweight.numel() * module.bits // 8 + 2 * module.scales.numel()
    return 2 * sum(p.numel() for p in module.parameters(recurse=False))


def cache_key(weights_sha256: str, method: str, group_size: int, calib: torch.Tensor, drop: bool = False,
              bits: tuple[int, ...] = BITS) -> str:
    widths = "" if tuple(bits) == BITS else f"{','.join(map(str, bits))}|"  # (4, 8): the keys written before 5 bits
    h = hashlib.sha256(f"{weights_sha256}|{method}|{group_size}|{'drop|' if drop else ''}{widths}".encode())
    h.update(calib.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _mean_kld(model: nn.Module, calib: torch.Tensor, ref_logp: list[torch.Tensor], batch: int) -> float:
    total, count = 0.0, 0
    for i, ref in zip(range(0, calib.shape[0], batch), ref_logp):
        logp = F.log_softmax(model(calib[i:i + batch]).float(), dim=-1)
        total += (ref.exp() * (ref - logp)).sum(-1).clamp_min(0).sum().item()
        count += ref.shape[0] * ref.shape[1]
    return total / count


@torch.no_grad()
def measure(model: nn.Module, calib: torch.Tensor, method: str, group_size: int, tokenizer=None,
            batch: int = 4, progress: bool = True, drop: bool = False, bits: tuple[int, ...] = BITS) -> dict:
    """{"units": {unit: {"4": kld, "8": kld}}, "bytes": {unit: {"4": b, "8": b, "float": b}}} for `model` (float),
    one entry per width in `bits`; with `drop`, blocks also {"drop": kld} and 0 bytes."""
    model.eval()
    plan = units(model)
    ref_logp = [F.log_softmax(model(calib[i:i + batch]).float(), dim=-1) for i in range(0, calib.shape[0], batch)]
    kld = {u: {} for u in plan}
    size = {u: {FLOAT: sum(deployed_bytes(model.get_submodule(n)) for n in names)} for u, names in plan.items()}
    blocks = [u for u in plan if u.startswith("layers.")] if drop else []
    steps = tqdm(total=len(bits) * (1 + len(plan)) + len(blocks), desc=f"sensitivity ({method})", unit="step",
                 disable=not progress)
    for unit in blocks:
        i = int(unit.split(".")[1])
        block = model.layers[i]
        model.layers[i] = Skip(block)
        try:
            kld[unit][DROP], size[unit][DROP] = _mean_kld(model, calib, ref_logp, batch), 0
        finally:
            model.layers[i] = block
        steps.update()
    for width in bits:
        cfg = config_class(method)(bits=width, group_size=group_size, n_calib=calib.shape[0])
        ctx = Context(tokenizer=tokenizer, calibration=calib, reference=model)
        quantized = apply(copy.deepcopy(model), cfg, ctx)
        steps.update()
        for unit, names in plan.items():
            originals = {n: model.get_submodule(n) for n in names}
            swapped = {n: quantized.get_submodule(n) for n in names}
            size[unit][str(width)] = sum(deployed_bytes(m) for m in swapped.values())
            try:
                for n, m in swapped.items():
                    replace_module_(model, n, m)
                kld[unit][str(width)] = _mean_kld(model, calib, ref_logp, batch)
            finally:
                for n, m in originals.items():
                    replace_module_(model, n, m)
            steps.update()
    steps.close()
    return {"units": kld, "bytes": size}


def sensitivities(model: nn.Module, calib: torch.Tensor, method: str, group_size: int, weights_sha256: str,
                  cache_dir: Path, tokenizer=None, progress: bool = True, drop: bool = False,
                  bits: tuple[int, ...] = BITS) -> dict:
    """`measure`, read from `cache_dir` when these settings were measured before (written atomically after)."""
    key = cache_key(weights_sha256, method, group_size, calib, drop, bits)
    path = Path(cache_dir) / f"sensitivity-{key}.json"
    if path.is_file():
        cached = read_json(path)
        if cached.get("key") == key and set(cached.get("units", {})) == set(units(model)):
            return {**cached, "cached": True}
    result = {"key": key, "method": method, "group_size": group_size, "calibration_windows": list(calib.shape),
              **measure(model, calib, method, group_size, tokenizer, progress=progress, drop=drop, bits=bits)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}
