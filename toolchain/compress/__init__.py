"""Compression passes: registry, context, calibration data, and `apply(model, cfg, ctx)`.

Each quantize method (`methods/`) and each other pass kind (`passes/`) is one file with a frozen config
and one function registered in `models.registry` (METHODS, PASSES) under its file name; a module is
imported when its name is first asked for. A pass changes the model in place and returns it; it records what it did in
`ctx.report`. Calibration always comes from the TRAIN split (`calibration_tokens`), never validation.
This package does not read or write checkpoints (the CLI and pipeline do).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from models.errors import EdgesmithError
from models.registry import METHODS, PASSES

QUANTIZE = "quantize"  # the pass kind whose configs are the quantize METHODS


def pass_kinds() -> list[str]:
    """quantize, then every kind in `passes/` (prune, lowrank, distill, qat)."""
    return [QUANTIZE, *PASSES.names()]


@dataclass
class Context:
    """What a pass may use: tokenizer, calibration tokens `(N, T)` from the train split, the
    unquantized reference model, and a report dict the pass writes into."""
    tokenizer: object = None
    calibration: torch.Tensor | None = None
    reference: nn.Module | None = None
    report: dict = field(default_factory=dict)
    train_tokens: np.ndarray | None = None  # the train split: what distill and qat train on
    val_tokens: np.ndarray | None = None  # the validation split: their before / after perplexity
    env: object = None  # toolchain.train.launch.DistEnv of this rank (None: a single process)


def kind_of(cfg) -> str:
    """'quantize', or the kind a prune / lowrank / distill / qat config is registered under."""
    return next((e.name for e in PASSES.entries() if e.config is type(cfg)), QUANTIZE)


def apply(model: nn.Module, cfg, ctx: Context | None = None) -> nn.Module:
    """Run the pass registered for `cfg`'s type on `model`; returns the model (a new one when the pass
    changes its shape, e.g. structured pruning)."""
    ctx = ctx or Context()
    kind = kind_of(cfg)
    entry = METHODS.for_config(cfg) if kind == QUANTIZE else PASSES.get(kind)
    return entry.obj(model, cfg, ctx)


def config_class(method: str, what: str | None = None) -> type:
    return METHODS.get(method, what).config


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pass(spec: str, rules=()) -> object:
    """`quantize:method=gptq,bits=4,group_size=32` or `prune:method=heads,ratio=0.25` -> the config
    (rules added if it has them)."""
    kind, _, body = spec.partition(":")
    if kind not in pass_kinds():
        raise EdgesmithError(f"--pass {spec!r}: unknown pass kind {kind!r}; allowed: {', '.join(pass_kinds())}")
    kv = {}
    for part in filter(None, body.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise EdgesmithError(f"--pass {spec!r}: {part!r} is not key=value")
        kv[key.strip()] = _parse_value(value.strip())
    if kind != QUANTIZE:
        return _build(spec, PASSES.get(kind).config, kv, rules)
    if "method" not in kv:
        raise EdgesmithError(f"--pass {spec!r}: missing method=; allowed: {', '.join(METHODS.names())}")
    return _build(spec, config_class(str(kv.pop("method")), f"--pass {spec!r}"), kv, rules)


def _build(spec: str, cls: type, kv: dict, rules) -> object:
    names = {f.name for f in fields(cls)}
    for key in kv:
        if key not in names:
            raise EdgesmithError(f"--pass {spec!r}: unknown field {key!r} for {cls.__name__}; "
                                 f"allowed: {', '.join(sorted(names - {'rules'}))}")
    if rules and "rules" in names:
        kv["rules"] = tuple(rules)
    return cls(**kv)


def config_to_dict(cfg) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    if "rules" in d:
        d["rules"] = [list(r) for r in d["rules"]]
    return d if kind_of(cfg) != QUANTIZE else {"method": METHODS.for_config(cfg).name, **d}


def calibration_tokens(train: np.ndarray, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """N windows of `seq_len` tokens from the train split, non-overlapping, chosen by a fixed seed."""
    n_windows = (len(train) - 1) // seq_len
    if n < 1 or n_windows < n:
        raise EdgesmithError(f"calibration set too small: {n} sequences of {seq_len} tokens need "
                             f"{n * seq_len + 1} train tokens, the train split has {len(train)}")
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=g)[:n].sort().values.tolist()
    rows = [np.asarray(train[i * seq_len:(i + 1) * seq_len], dtype=np.int64) for i in picks]
    return torch.from_numpy(np.stack(rows))
