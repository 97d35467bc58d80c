"""What the quantization methods share: the base config, the per-layer plan, calibration checks,
activation capture with hooks, the stage order, folding per-channel scales into the layer before, and
the token embedding (round to nearest for every method).

A *stage* is a set of Linears that read the same input (q/k/v; o; gate/up; down; lm_head), in
forward order. Methods that need calibration process stages in order, so each stage sees inputs
produced by the already-quantized stages before it. This module chooses no Linear's codes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from models.errors import EdgesmithError
from models.quant import (QuantizedLinear, _shared_weight_names, check_scheme, check_target, linear_names, quantize_embedding_,
                          replace_module_)
from toolchain.compress.rules import bits_for, parse_rules, resolve


@dataclass(frozen=True)
class WeightQuant:
    """Fields every weight-quantization method has. `rules`: ordered (regex, 4 | 8 | "skip"). `target`:
    "any" (llama.cpp's Q4_0 / Q8_0 rule) or "xnnpack" (codes and scales ExecuTorch's XNNPACK kernels hold
    exactly, and so does every other format; models/quant.py TARGETS)."""
    bits: int = 4
    group_size: int = 32
    rules: tuple = ()
    n_calib: int = 16
    target: str = "any"

    def __post_init__(self):
        check_scheme(self.bits, self.group_size)
        check_target(self.target)
        object.__setattr__(self, "rules", parse_rules(self.rules))
        if isinstance(self.n_calib, bool) or not isinstance(self.n_calib, int) or self.n_calib < 1:
            raise EdgesmithError(f"n_calib={self.n_calib!r} must be a positive integer")


def embedding_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def plan_layers(model: nn.Module, cfg: WeightQuant, report: dict) -> dict[str, int | None]:
    """Bits for every float Linear (None: stays float), validated against each layer's shape.

    The rules are matched against the float token embedding too, which is validated here but
    quantized by `quantize_embeddings_` (so it is not in the returned plan)."""
    shared = _shared_weight_names(model)
    embeds = embedding_names(model)
    names = [n for n in linear_names(model) if n not in shared]
    plan, problems = resolve(names + embeds, cfg.rules, cfg.bits)
    for name, bits in plan.items():
        if bits is not None:
            m = model.get_submodule(name)
            check_scheme(bits, cfg.group_size, m.embedding_dim if isinstance(m, nn.Embedding) else m.in_features, name)
    notes = []
    for n in sorted(set(shared) - set(embeds)):
        table = next((e for e in embeds if model.get_submodule(e).weight is model.get_submodule(n).weight), None)
        notes.append(f"{n}: tied to {table}, reads its {plan[table]}-bit table" if table and plan[table] else
                     f"{n}: weight shared with another module, left float")
    report.setdefault("warnings", []).extend(problems + notes)
    return {n: b for n, b in plan.items() if n not in embeds}


def quantize_embeddings_(model: nn.Module, cfg: WeightQuant) -> dict[str, int | None]:
    """Round-to-nearest codes for each float token embedding at the bits its rule gives (None: left
    float), whatever the method: a lookup has no input activations for GPTQ / AWQ / SmoothQuant to
    weigh its errors by. A tied lm_head then reads the quantized table. Methods call this before any
    calibration forward, so every later stage sees the quantized embedding's output."""
    done = {}
    for name in embedding_names(model):
        done[name] = bits_for(name, cfg.rules, cfg.bits)
        if done[name] is not None:
            quantize_embedding_(model, done[name], cfg.group_size, include=lambda n, name=name: n == name,
                                target=getattr(cfg, "target", "any"))
    return done


def require_calibration(ctx, cfg, method: str) -> torch.Tensor:
    calib = ctx.calibration
    have = 0 if calib is None else calib.shape[0]
    if have < cfg.n_calib:
        raise EdgesmithError(f"calibration set too small: {method} needs n_calib={cfg.n_calib} sequences "
                             f"from the train split, got {have}")
    return calib[:cfg.n_calib]


def stage_key(name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    leaf = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(leaf, leaf)
    return f"{prefix}.{leaf}"


def stages(model: nn.Module, names: list[str]) -> list[list[str]]:
    order = [n for n in linear_names(model) if n in set(names)]
    return [list(g) for _, g in itertools.groupby(order, key=stage_key)]


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], calib: torch.Tensor, on_input, batch_size: int = 8) -> None:
    """Run `calib` through `model`, calling `on_input(name, x)` with each named module's input
    flattened to `(tokens, in_features)`."""
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: on_input(n, inp[0].detach().reshape(-1, inp[0].shape[-1]).float()))
        for n in names]
    try:
        for i in range(0, calib.shape[0], batch_size):
            model(calib[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()


def swap_quantized_(model: nn.Module, name: str, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                    group_size: int, act_bits: int | None = None) -> None:
    bias = model.get_submodule(name).bias  # Qwen2's q/k/v: the float bias goes along
    replace_module_(model, name, QuantizedLinear.from_codes(qweight, scales, bits, group_size, act_bits, bias=bias))


def fold_target(model: nn.Module, stage: list[str]) -> str | None:
    """The module whose output channels feed `stage`'s input channels one to one, or None.

    qkv <- input_layernorm, gate/up <- post_attention_layernorm, down <- up_proj, lm_head <- norm,
    o <- v_proj only without grouped-query sharing (a v head feeding several q heads would need
    equal scales across them)."""
    first = stage[0]
    prefix, _, leaf = first.rpartition(".")
    block = prefix.rpartition(".")[0]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{block}.input_layernorm"
    if leaf in ("gate_proj", "up_proj"):
        return f"{block}.post_attention_layernorm"
    if leaf == "down_proj":
        return f"{prefix}.up_proj"
    if first == "lm_head" and hasattr(model, "norm"):
        return "norm"
    if leaf == "o_proj":
        attn = model.get_submodule(prefix)
        if attn.n_heads == attn.n_kv_heads:
            return f"{prefix}.v_proj"
    return None


@torch.no_grad()
def fold_scales_(model: nn.Module, stage: list[str], prev: str, s: torch.Tensor) -> None:
    """x' = x / s in `prev`'s output, w' = w * s in each Linear of `stage`: the float model is unchanged."""
    p = model.get_submodule(prev)
    if not isinstance(p, nn.Linear) and not hasattr(p, "weight"):
        raise EdgesmithError(f"cannot fold scales into {prev}")
    if isinstance(p, nn.Linear):
        p.weight.div_(s.to(p.weight.dtype).unsqueeze(1))
        if p.bias is not None:  # a biased v_proj feeding o_proj: its output is x W^T + b, all of it divided
            p.bias.div_(s.to(p.bias.dtype))
    else:
        p.weight.div_(s.to(p.weight.dtype))
    for n in stage:
        lin = model.get_submodule(n)
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def progress(items, desc: str):
    return tqdm(items, desc=desc, unit="stage", leave=False)
