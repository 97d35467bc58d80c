"""Writing `manifest.json`, the description every export directory carries.

The manifest names the format and its entry file, lists every file with sha256 and bytes, and
records the model config, tokenizer file and special tokens, the quantization scheme, the
checkpoint's lineage, the export options, the parity figures and the versions of edgesmith and of
the runtime the artifact was checked with. Reading and verifying lives in `runtimes.artifact`
(a device needs it without the toolchain); this module only builds and writes.
"""

from __future__ import annotations

import datetime
import json
from importlib import metadata
from pathlib import Path

from models.checkpoint import Checkpoint, lineage_path, resolve_lineage, sha256_file, write_text_atomic
from models.version import versions
from runtimes.artifact import MANIFEST, MANIFEST_FORMAT
from toolchain.export.spec import files_in

MANIFEST_VERSION = 1


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_manifest(ckpt: Checkpoint, out: Path, fmt: str, precision: str, written: dict, runtime_package: str,
                   target_device: str | None = None) -> dict:
    """Everything but `files` and `parity`, which `write_manifest` and the parity check fill in. Lineage paths
    are relative to the artifact directory `out` (and a checkpoint's parent to the checkpoint)."""
    lineage = dict(ckpt.meta.get("lineage", {}))
    if lineage.get("parent"):
        lineage["parent"] = lineage_path(resolve_lineage(ckpt.path, lineage["parent"]), out)
    tok = ckpt.tokenizer
    return {
        "manifest": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "exporter": written.get("exporter", "edgesmith"),
        "entry": written["entry"],
        "precision": precision,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": written.get("options", {}),
        "model": ckpt.config.to_dict(),
        "tokenizer": {"file": "tokenizer.json", "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "quantization": written.get("quantization"),
        "lineage": {
            "checkpoint": lineage_path(ckpt.path, out),
            "checkpoint_sha256": ckpt.meta.get("files", {}).get("model.safetensors", {}).get("sha256"),
            **lineage,
        },
        "target_device": target_device,
        "files": {},
        "parity": None,
        "versions": {**versions(), runtime_package: package_version(runtime_package)},
    }


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Hash every file in `directory` into the manifest and write it (atomically); returns it."""
    manifest["files"] = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in files_in(directory) if name != MANIFEST
    }
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
