"""Reading an exported artifact directory: its `manifest.json`, checked file by file.

Every export directory carries `manifest.json` listing each file with its sha256 and byte count.
`read_manifest` refuses a directory whose files are missing, truncated or replaced, naming the
file; before any byte of a listed file is read, every name the manifest holds (`files`, the entry, the
ONNX file, the engine, the tokenizer) must be a plain relative path to a regular file inside the
directory and, for the named ones, a file the manifest lists (models.confine). Hashing reads at most the
bytes the manifest records. This module only reads; `toolchain.export.manifest` writes manifests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.confine import check_entry, confined, read_json, sha256_file
from models.errors import EdgesmithError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "edgesmith-artifact"
MANIFEST_LIMIT = 16 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_manifest(directory: str | Path, fmt: str | None = None, verify: bool = True) -> dict:
    """The manifest of an artifact directory; with `verify`, every listed file's size and sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise EdgesmithError(f"{path}: missing (not an exported artifact directory)")
    manifest = read_json(confined(directory, MANIFEST, what="manifest"), MANIFEST_LIMIT)
    if manifest.get("manifest") != MANIFEST_FORMAT:
        raise EdgesmithError(f"{path}: not an edgesmith artifact manifest")
    if fmt is not None and manifest.get("format") != fmt:
        raise EdgesmithError(f"{path}: format is {manifest.get('format')!r}, this backend reads {fmt!r}")
    check_fields(path, manifest)
    files = check_files(directory, manifest)
    if verify:
        for name, rec in files.items():
            verify_file(directory / name, rec)
    return manifest


GRAPHS = ("fused", "plain", "optimum")
MAX_SEQ = 1 << 21


def check_fields(path: Path, manifest: dict) -> None:
    """The fields the runtimes read, each of the type they read it as; one line naming the field otherwise."""
    def bad(field: str, what: str):
        return EdgesmithError(f"{path}: {field} must be {what}")

    if not isinstance(manifest.get("options"), dict):
        raise bad("options", "a table")
    if not isinstance(manifest.get("model", {}), dict):
        raise bad("model", "a table")
    if not isinstance(manifest.get("precision"), str):  # the backends read it to size the cache and pick its type
        raise bad("precision", "a string")
    if not isinstance(manifest.get("tokenizer"), (dict, type(None))):
        raise bad("tokenizer", "a table or null")
    options, model, fmt = manifest["options"], manifest.get("model", {}), manifest.get("format")
    seq = options.get("max_seq_len")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise bad("options.max_seq_len", f"an integer in 1..{MAX_SEQ}")
    vocab = model.get("vocab_size")
    if (vocab is not None or fmt in ("executorch", "tensorrt")) and (type(vocab) is not int or vocab < 1):
        raise bad("model.vocab_size", "an integer >= 1")
    if fmt in ("onnx", "tensorrt") and options.get("graph") not in GRAPHS:
        raise bad("options.graph", f"one of {', '.join(GRAPHS)}")
    if fmt == "onnx" and not isinstance(options.get("onnx_file"), str):
        raise bad("options.onnx_file", "a file name")
    for key in ("method", "engine", "engine_skipped"):
        if not isinstance(options.get(key), (str, type(None))):
            raise bad(f"options.{key}", "a string")


def check_files(directory: Path, manifest: dict) -> dict:
    """The manifest's `files`, each a confined regular file with a well-formed record, and every file the manifest
    names elsewhere one of them; refused in one line naming the entry before any byte of a file is read."""
    path = directory / MANIFEST
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(rec, dict) for rec in files.values()):
        raise EdgesmithError(f"{path}: files must be a table of file name -> {{sha256, bytes}}")
    for name, rec in files.items():
        size, digest = rec.get("bytes"), rec.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            raise EdgesmithError(f"{path}: files[{name!r}] must have bytes (an integer >= 0) and sha256 (64 hex digits)")
        if check_entry(name, path, "file") and not os.path.lexists(directory / name):
            raise EdgesmithError(f"{directory / name}: missing (listed in {MANIFEST})")
        confined(directory, name, holder=path, what="file")
    for where, name in named_files(manifest):
        if not isinstance(name, str) or name not in files:
            raise EdgesmithError(f"{path}: {where} names {name!r}, which is not one of its files")
    return files


def named_files(manifest: dict) -> list[tuple[str, object]]:
    """(field, value) for every field of a manifest that names a file of the artifact."""
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    tokenizer = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
    named = [("entry", manifest.get("entry")), ("options.onnx_file", options.get("onnx_file")),
             ("options.engine", options.get("engine")), ("tokenizer.file", tokenizer.get("file"))]
    return [(where, name) for where, name in named if name is not None or where == "entry"]


def verify_file(path: Path, rec: dict) -> None:
    """`path` has the size and sha256 its manifest record gives (hashing reads at most that many bytes)."""
    size = path.stat().st_size
    if size != rec.get("bytes"):
        raise EdgesmithError(f"{path}: {size} bytes, {MANIFEST} records {rec.get('bytes')} (truncated or replaced)")
    if sha256_file(path, limit=size) != rec.get("sha256"):
        raise EdgesmithError(f"{path}: sha256 does not match {MANIFEST} (corrupt or replaced)")


def artifact_bytes(manifest: dict) -> int:
    """Bytes of every file the manifest lists (what a runtime loads, give or take the tokenizer)."""
    return sum(int(rec.get("bytes", 0)) for rec in manifest.get("files", {}).values())
