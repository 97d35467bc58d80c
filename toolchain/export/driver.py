"""`export(checkpoint, out, cfg)`: one checkpoint to one artifact directory, checked and described.

Validates the request before touching the disk, writes the format's files into a temporary
directory beside `out`, adds the tokenizer and `manifest.json`, runs the parity check through the
format's real runtime, and only then renames the directory into place. Any failure (bad input,
a tensor the format cannot hold, parity below threshold) leaves nothing behind. The formats
themselves live in one file each and know nothing about manifests or parity.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from devices.profiles import load_profile
from models.checkpoint import Checkpoint, load_checkpoint, replace_dir, temp_dir_for
from models.errors import EdgesmithError
from models.registry import FORMATS
from models.quant import widen_codes_
from toolchain.export.hf_optimum import export_hf, is_hf_directory
from toolchain.export.manifest import build_manifest, write_manifest
from toolchain.export.parity import check_parity
from toolchain.export.spec import PRECISIONS, get_format, is_quant_exact


@dataclass(frozen=True)
class ExportConfig:
    format: str
    precision: str = "fp32"
    max_seq_len: int | None = None  # None: the model's
    fuse: bool = True  # ONNX: contrib-op graph; False: the plain standard-op graph
    exact: bool = False  # ExecuTorch: codes XNNPACK's int4 kernel cannot hold get one more plane (else clamped)
    portable_embedding: bool = False  # ExecuTorch: a quantized embedding in portable ops (else its quantized kernels)
    force: bool = False
    parity_positions: int = 32
    greedy_steps: int = 32
    target: str | None = None  # a device profile name: recorded as the manifest's target_device

    def __post_init__(self):
        if self.target is not None:
            try:
                object.__setattr__(self, "target", load_profile(self.target).name)
            except EdgesmithError as e:  # an unknown name lists the known ones
                raise EdgesmithError(f"--target: {e}") from None
        if self.format not in FORMATS.names():
            raise EdgesmithError(f"--format: unknown format {self.format!r}; allowed: {', '.join(FORMATS.names())}")
        if self.precision not in PRECISIONS:
            raise EdgesmithError(f"--precision: {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise EdgesmithError(f"--max-seq-len: {self.max_seq_len} must be >= 1")

    def seq_len_for(self, ckpt: Checkpoint) -> int:
        S = self.max_seq_len or ckpt.config.max_seq_len
        if S > ckpt.config.max_seq_len:
            raise EdgesmithError(f"--max-seq-len: {S} exceeds the model's max_seq_len {ckpt.config.max_seq_len}")
        need = self.parity_positions + self.greedy_steps
        if S < need:
            raise EdgesmithError(f"--max-seq-len: {S} is too short for the parity check ({need} positions)")
        return S


def parity_kind(ckpt: Checkpoint, precision: str, quant_exact: bool) -> str:
    """Which threshold applies: the precision's when the runtime computes what the fake-quant reference
    computes; else (its own activation quantization) the narrowest weight width's."""
    weights = (ckpt.meta.get("quantization") or {}).get("weights") or {}
    if not weights or (quant_exact and not any(s.get("act_bits") for s in weights.values())):
        return precision
    return "int4" if min(int(s["bits"]) for s in weights.values()) <= 4 else "int8"


def export(checkpoint: str | Path, out: str | Path, cfg: ExportConfig, log=print) -> dict:
    """Export `checkpoint` to `out`; returns the manifest. Nothing is left behind on failure."""
    if is_hf_directory(Path(checkpoint)):  # a transformers directory our model family may not represent
        out = Path(out)
        if out.exists() and not cfg.force:
            raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
        return export_hf(Path(checkpoint), out, cfg, log)
    spec = get_format(cfg.format)
    if cfg.precision not in spec.precisions:
        raise EdgesmithError(f"--precision: {cfg.precision} is not supported by --format {cfg.format}; "
                             f"allowed: {', '.join(spec.precisions)}")
    out = Path(out)
    if out.exists() and not cfg.force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    ckpt = load_checkpoint(checkpoint, dtype=torch.float32)
    widened = widen_codes_(ckpt.model, spec.code_bits)  # the reference too: the values are the same
    if widened:
        log(f"{cfg.format}: {len(widened)} tensor(s) of 5-bit codes held as 8-bit codes (the format has no 5-bit "
            "form): same values, 8-bit size; GGUF stores them as Q5_0")
    cfg_seq = cfg.seq_len_for(ckpt)
    tmp = temp_dir_for(out)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            written = spec.write(ckpt, cfg, tmp, cfg_seq)
        export_s = time.perf_counter() - t0
        if written.get("notice"):
            log(written["notice"])
        ckpt.tokenizer.save(tmp)
        manifest = build_manifest(ckpt, out, cfg.format, cfg.precision, written, spec.runtime_package, cfg.target)
        manifest["options"] = {"max_seq_len": cfg_seq, **manifest["options"]}
        manifest["export_s"] = round(export_s, 3)
        options = spec.runtime_options(ckpt, cfg)
        manifest["runtime_options"] = options
        write_manifest(tmp, manifest)
        reason = spec.can_check()
        if reason is None:  # parity in the configuration every user path will run by default
            backend = spec.backend(tmp, **options)
            kind = parity_kind(ckpt, cfg.precision, is_quant_exact(spec, options))
            lowered = spec.activations(ckpt) if kind == "fp32" else None
            kind = lowered[0] if lowered else kind
            manifest["parity"] = check_parity(ckpt.model, backend, ckpt.tokenizer, kind, cfg.parity_positions,
                                              cfg.greedy_steps)
            if lowered:
                manifest["parity"]["kind_reason"] = lowered[1]
            manifest["parity"]["runtime"] = spec.runtime_package
            manifest["parity"]["runtime_options"] = backend.run_options
            manifest["parity"]["checked_file"] = manifest["options"].get("onnx_file", manifest["entry"])
            del backend  # release the runtime's hold on the files before the rename
        else:
            manifest["parity"] = {"skipped": reason}
            log(f"{cfg.format}: {reason}")
        write_manifest(tmp, manifest)
        if manifest["parity"].get("passed") is False:
            raise EdgesmithError(f"{cfg.format} {cfg.precision}: parity below threshold: "
                                 + "; ".join(manifest["parity"]["failures"]))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
