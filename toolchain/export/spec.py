"""What an export format registers, and the helpers every format shares.

Each format is one file in `toolchain/export/formats/` that registers a `FormatSpec` in
`models.registry.FORMATS` under its file name (`register_format(FormatSpec(...))`). `get_format(name)`
imports that file only when the format is asked for, so heavy backends (ExecuTorch, TensorRT,
llama.cpp) are never imported by formats that don't need them. This module holds no format logic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import Checkpoint
from models.errors import EdgesmithError
from models.quant import Int8KVAttention, held_bits
from models.registry import FORMATS

PRECISIONS = ("fp32", "fp16")
EMBEDDING = "model.embed_tokens"  # the token embedding's name in edgesmith.json "quantization"


@dataclass(frozen=True)
class FormatSpec:
    name: str
    precisions: tuple[str, ...]  # float precisions it can write (quantized checkpoints keep their codes)
    write: Callable  # write(ckpt, cfg, tmp_dir) -> dict(entry=..., options=..., quantization=...)
    backend: Callable  # backend(artifact_dir) -> object with prefill/decode/reset, for the parity check
    runtime_package: str  # the distribution whose version the manifest records
    can_check: Callable[[], str | None] = lambda: None  # None, or why this machine cannot run it
    # True when the runtime computes quantized weights exactly as the fake-quant reference does
    # (dequantize, float matmul): such artifacts are held to the float thresholds.
    quant_exact: bool | Callable[[dict], bool] = False  # may depend on the runtime options (see below)
    # The fastest configuration of the format's runtime verified for this checkpoint: `runtime_options(ckpt, cfg)` ->
    # `runtimes.load` keyword arguments. The export checks parity in it and records it in the manifest, and every
    # path that loads the artifact (generate, eval, bench, the GUI) runs it unless the user overrides an option.
    runtime_options: Callable[[Checkpoint, Any], dict] = lambda ckpt, cfg: {}  # cfg: the ExportConfig
    # Where the runtime computes part of a float model at a lower precision by design: `activations(ckpt)` -> (the
    # precision whose parity threshold then applies, why), or None (llama.cpp's CPU GELU reads an fp16 table).
    activations: Callable[[Checkpoint], tuple[str, str] | None] = lambda ckpt: None
    # The code widths the format stores at their own width; a checkpoint's others are held in the next wider one
    # (models.quant.widen_codes_: 5-bit codes as 8-bit, exact, at 8-bit size) before `write`.
    code_bits: tuple[int, ...] = (4, 8)
    toolkit: str = ""  # the module that must import for this format to be exported here (recipe `optional`)
    estimate_s: float = 10.0  # rough seconds for a nano export on 2 cores, only for the pipeline's ETA


def is_quant_exact(spec: FormatSpec, options: dict) -> bool:
    return spec.quant_exact(options) if callable(spec.quant_exact) else spec.quant_exact


def register_format(spec: FormatSpec) -> FormatSpec:
    return FORMATS.register(spec.name, spec)


def get_format(name: str, what: str = "--format") -> FormatSpec:
    return FORMATS.get(name, what).obj


def files_in(directory: Path) -> list[str]:
    """Every regular file under `directory`, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def quantization_scheme(ckpt, target: dict[int, str], embedding: dict[int, str] | None = None) -> dict | None:
    """The manifest's quantization entry: the checkpoint's scheme and what each bit width became
    (`embedding`: what the token embedding's became, when the format stores it differently)."""
    quant = ckpt.meta.get("quantization")
    if not quant:
        return None
    def held(table: dict[int, str], bits: int) -> str:
        return table[bits] if bits in table else f"{table[held_bits(bits, tuple(table))]}, holding {bits}-bit codes"

    stored = {name: held(embedding or target if name == EMBEDDING else target, s["bits"])
              for name, s in (quant.get("weights") or {}).items()}
    held = {name: held_bits(s["bits"], tuple(target)) for name, s in (quant.get("weights") or {}).items()
            if s["bits"] not in target}  # what the planner counts for this artifact
    return {**quant, "stored_as": stored, **({"held_bits": held} if held else {})}


def refuse_int8_kv_cache(model, fmt: str) -> None:
    """The graphs write a float KV cache: refuse a model whose attention keeps an int8 cache."""
    for name, m in model.named_modules():
        if isinstance(m, Int8KVAttention):
            raise EdgesmithError(f"{name}: an int8 KV cache (calibrated per-head scales) cannot be exported to "
                                 f"{fmt} yet; export the checkpoint from before that pass")
