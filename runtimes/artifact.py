"""Reading an exported artifact directory: its `manifest.json`, checked file by file.

Every export directory carries `manifest.json` listing each file with its sha256 and byte count.
`read_manifest` refuses a directory whose files are missing, truncated or replaced, naming the
file. This module only reads; `toolchain.export.manifest` writes manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoint import sha256_file
from models.errors import EdgesmithError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "edgesmith-artifact"


def read_manifest(directory: str | Path, fmt: str | None = None, verify: bool = True) -> dict:
    """The manifest of an artifact directory; with `verify`, every listed file's size and sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgesmithError(f"{path}: missing (not an exported artifact directory)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("manifest") != MANIFEST_FORMAT:
        raise EdgesmithError(f"{path}: not an edgesmith artifact manifest")
    if fmt is not None and manifest.get("format") != fmt:
        raise EdgesmithError(f"{path}: format is {manifest.get('format')!r}, this backend reads {fmt!r}")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(rec, dict) for rec in files.values()):
        raise EdgesmithError(f"{path}: files must be a table of file name -> {{sha256, bytes}}")
    if verify:
        for name, rec in files.items():
            verify_file(directory / name, rec)
    return manifest


def verify_file(path: Path, rec: dict) -> None:
    if not path.is_file():
        raise EdgesmithError(f"{path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != rec.get("bytes"):
        raise EdgesmithError(f"{path}: {size} bytes, {MANIFEST} records {rec.get('bytes')} (truncated or replaced)")
    if sha256_file(path) != rec.get("sha256"):
        raise EdgesmithError(f"{path}: sha256 does not match {MANIFEST} (corrupt or replaced)")


def artifact_bytes(manifest: dict) -> int:
    """Bytes of every file the manifest lists (what a runtime loads, give or take the tokenizer)."""
    return sum(int(rec.get("bytes", 0)) for rec in manifest.get("files", {}).values())
