"""`verify(path)`: check an artifact or a checkpoint without running it, with a verdict per file.

What a user runs on a directory from elsewhere (a colleague, a download, a device) before trusting it,
and what the bench agent runs on the device after a push. An artifact: its manifest, the confinement of
every name it holds (models.confine), each listed file's size and sha256 (reading at most the recorded
bytes), the format header of the entry (GGUF, ONNX with its external data, .pte: runtimes.headers) and the
GGUF hyperparameters against the manifest's model config, the tokenizer against the model's vocabulary.
A checkpoint: edgesmith.json, config.json, the safetensors header's tensor names, dtypes and shapes
against the model the config (and the recorded quantization) describes — built on the meta device, so
no weight is allocated — and the tokenizer. Nothing here loads weights or starts a runtime; a check
that fails is one line, and the others still run, so the verdict names every bad file at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import (FORMAT, FORMAT_VERSION, WEIGHTS, compare_tensors, expected_tensors,
                               from_hf_config)
from models.confine import confined, read_json, sha256_file
from models.errors import EdgesmithError
from models.headers import check_safetensors
from models.llama import ModelConfig
from models.tokenizer import Tokenizer
from runtimes.artifact import MANIFEST, read_manifest, verify_file
from runtimes.backends.llamacpp import check_gguf
from runtimes.headers import onnx_header, pte_header

@dataclass
class Check:
    """The verdict on one file: ok, and what was checked (or the one-line reason it failed)."""
    file: str
    ok: bool
    detail: str


@dataclass
class Verdict:
    path: Path
    kind: str  # "artifact (gguf)", "checkpoint", or "unknown"
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def verify(path: str | Path) -> Verdict:
    """Every check of an artifact directory (manifest.json) or a checkpoint (edgesmith.json or config.json)."""
    path = Path(path)
    if not path.is_dir():
        return Verdict(path, "unknown", [Check(path.name or str(path), False, f"{path}: no such directory")])
    if (path / MANIFEST).exists() or (path / MANIFEST).is_symlink():
        return verify_artifact(path)
    if any((path / n).exists() or (path / n).is_symlink() for n in ("edgesmith.json", "config.json")):
        return verify_checkpoint(path)
    return Verdict(path, "unknown", [Check(path.name, False, f"{path}: neither an artifact directory ({MANIFEST}) "
                                                             "nor a checkpoint (edgesmith.json or config.json)")])


def require_verified(path: str | Path) -> int:
    """Every check of `verify`, or the first failure's line (and how many more failed) as an EdgesmithError;
    returns the number of checks passed. What the bench runs before it pushes or loads an artifact."""
    v = verify(path)
    failed = v.failures()
    if failed:
        more = f" (and {len(failed) - 1} more failed checks)" if len(failed) > 1 else ""
        raise EdgesmithError(f"{failed[0].detail}{more}")
    return len(v.checks)


def _check(checks: list[Check], name: str, fn: Callable[[], str]) -> object:
    """Run one check, record its verdict; the check's return value is its detail."""
    try:
        detail = fn()
    except EdgesmithError as e:
        checks.append(Check(name, False, str(e)))
        return False
    checks.append(Check(name, True, detail))
    return True


# ----------------------------------------------------------------------------- artifacts


def verify_artifact(directory: Path) -> Verdict:
    checks: list[Check] = []
    box: dict = {}

    def manifest() -> str:
        box["m"] = read_manifest(directory, verify=False)  # confinement of every name; no byte of a file read
        m = box["m"]
        return (f"{m.get('format')} artifact, {len(m['files'])} files, entry {m.get('entry')}, "
                f"exported by edgesmith {(m.get('versions') or {}).get('edgesmith', '?')}")

    if not _check(checks, MANIFEST, manifest):
        return Verdict(directory, "artifact", checks)
    m = box["m"]
    fmt = m.get("format")
    for name, rec in sorted(m["files"].items()):
        _check(checks, name, lambda name=name, rec=rec: _artifact_file(directory, m, name, rec))
    return Verdict(directory, f"artifact ({fmt})", checks)


def _artifact_file(directory: Path, m: dict, name: str, rec: dict) -> str:
    path = directory / name
    verify_file(path, rec)
    said = [f"{_mb(rec['bytes'])}, sha256 ok"]
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    if name.endswith(".gguf"):
        check_gguf(path, model)  # the bounded header walk, then tokens and hyperparameters against the manifest
        said.append("GGUF header ok, hyperparameters match the manifest")
    elif name.endswith(".onnx"):
        h = onnx_header(path, directory, set(m["files"]))
        external = (f" ({h.get('external_tensors')} in {', '.join(h['external_files'])}, each within its file)"
                    if h.get("external_files") else "")
        said.append(f"ONNX IR {h.get('ir_version')} opset {h.get('opset')}: {h.get('nodes')} nodes, "
                    f"{h.get('initializers')} initializers{external}")
    elif name.endswith(".pte"):
        h = pte_header(path)
        said.append(f"ExecuTorch {h.get('identifier')}: program {_mb(h.get('program_bytes', 0))}, "
                    f"segments {_mb(h.get('segment_bytes', 0))}, within the file")
    elif name == "tokenizer.json":
        tok = Tokenizer.load(directory)
        vocab = model.get("vocab_size")
        if isinstance(vocab, int) and tok.vocab_size > vocab:
            raise EdgesmithError(f"{path}: {tok.vocab_size} tokens but the model's vocab_size is {vocab} "
                                 "(the tokenizer of another model)")
        said.append(f"{tok.vocab_size} tokens" + (f" (model vocab {vocab})" if vocab else ""))
    elif name.endswith(".json"):
        read_json(path)
        said.append("JSON")
    return ", ".join(said)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


# ----------------------------------------------------------------------------- checkpoints


def verify_checkpoint(directory: Path) -> Verdict:
    checks: list[Check] = []
    box: dict = {"meta": {}}

    def meta() -> str:
        d = read_json(confined(directory, "edgesmith.json", what="file"))
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise EdgesmithError(f"{directory / 'edgesmith.json'}: not an edgesmith checkpoint of format version "
                                 f"{FORMAT_VERSION} (format={d.get('format')!r}, "
                                 f"format_version={d.get('format_version')!r})")
        box["meta"] = d
        passes = [p.get("kind", "?") for p in (d.get("lineage") or {}).get("passes", []) if isinstance(p, dict)]
        return "edgesmith checkpoint, lineage: " + (" → ".join(passes) or "made from scratch")

    def config() -> str:
        box["config"] = from_hf_config(read_json(confined(directory, "config.json", what="file")),
                                       str(directory / "config.json"))
        c = box["config"]
        return (f"dim {c.dim}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads, ffn {c.ffn_dim}, "
                f"vocab {c.vocab_size}")

    if (directory / "edgesmith.json").exists() or (directory / "edgesmith.json").is_symlink():
        _check(checks, "edgesmith.json", meta)
    have_config = _check(checks, "config.json", config)
    _check(checks, WEIGHTS, lambda: _weights(directory, box["meta"], box.get("config") if have_config else None))

    def tokenizer() -> str:
        tok = Tokenizer.load(directory)
        vocab = box["config"].vocab_size if have_config else None
        if vocab is not None and tok.vocab_size > vocab:
            raise EdgesmithError(f"{directory / 'tokenizer.json'}: {tok.vocab_size} tokens but config.json "
                                 f"vocab_size is {vocab}")
        return f"{tok.vocab_size} tokens"

    _check(checks, "tokenizer.json", tokenizer)
    return Verdict(directory, "checkpoint", checks)


def _weights(directory: Path, meta: dict, config: ModelConfig | None) -> str:
    path = confined(directory, WEIGHTS, what="file")
    size = path.stat().st_size
    files = meta.get("files", {})
    rec = files.get(WEIGHTS) if isinstance(files, dict) else None
    said = [_mb(size)]
    if isinstance(rec, dict) and rec:
        if size != rec.get("bytes"):
            raise EdgesmithError(f"{path}: {size} bytes, edgesmith.json records {rec.get('bytes')} "
                                 "(truncated or replaced)")
        if sha256_file(path, limit=size) != rec.get("sha256"):
            raise EdgesmithError(f"{path}: sha256 does not match edgesmith.json (corrupt or replaced)")
        said.append("sha256 ok")
    tensors = check_safetensors(path)
    said.append(f"{len(tensors)} tensors")
    if config is not None:
        expected = expected_tensors(config, meta, str(directory / "edgesmith.json"))
        compare_tensors(path, tensors, expected)
        said.append("names, dtypes and shapes match config.json" + (" and the quantization" if
                                                                   meta.get("quantization") else ""))
    return ", ".join(said)
