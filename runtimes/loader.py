"""`runtimes.load(path, **options) -> Session`: the backend for an artifact directory or a checkpoint.

An artifact directory (with `manifest.json`) gets the backend registered for its format;
a checkpoint directory (`edgesmith.json`, or a transformers-saved Llama with `config.json`) gets
the torch backend. Backends live one per module in `runtimes/backends/`, registered in `models.registry.BACKENDS`;
their format runtimes (llama_cpp, onnxruntime, executorch) are imported only inside the backend that
runs them, so loading a GGUF never imports ExecuTorch. The tokenizer is the directory's
`tokenizer.json` when it has one our Tokenizer reads. Options are the backend's keyword
arguments; an unknown one is refused in one line that lists the allowed ones. An artifact's manifest
records `runtime_options`, the configuration its export checked parity in (ONNX MatMulNBits
`accuracy_level=4`, llama.cpp `flash_attn`): they apply unless the caller passes the same option.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from models.errors import EdgesmithError
from models.registry import BACKENDS
from models.tokenizer import Tokenizer
from runtimes.artifact import MANIFEST, read_manifest
from runtimes.session import Session


def backend_class(name: str) -> type[Session]:
    return BACKENDS.get(name, "backend").obj


def backends_for(fmt: str) -> list[str]:
    """The backends that run a `fmt` artifact, its own first (a TensorRT artifact also holds the
    TensorRT-ready ONNX, which ONNX Runtime runs anywhere)."""
    entries = BACKENDS.entries()
    own = [e.name for e in entries if fmt in e.meta.get("formats", ())]
    return own + [e.name for e in entries if fmt in e.meta.get("also", ())]


def artifact_formats() -> list[str]:
    """Every artifact format some backend runs."""
    return sorted({f for e in BACKENDS.entries() for f in e.meta.get("formats", ())})


def artifact_tokenizer(directory: Path, manifest: dict):
    """Our Tokenizer from the artifact's tokenizer.json, or None when it has none we can read
    (an optimum export of a model whose tokenizer lacks our special tokens)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tokenizer = Tokenizer.load(directory)
    except EdgesmithError:
        if not isinstance(manifest.get("tokenizer"), dict) or manifest["tokenizer"].get("bos_id") is None:  # not one of ours (optimum): run without
            return None
        raise  # ours, but corrupt
    vocab = (manifest.get("model") if isinstance(manifest.get("model"), dict) else {}).get("vocab_size")
    if vocab is not None and tokenizer.vocab_size > int(vocab):
        raise EdgesmithError(f"{path}: {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab} "
                             "(the tokenizer of another model)")
    return tokenizer


def option_names(factory) -> list[str]:
    """The keyword arguments a backend takes from a user (its `runtimes.load` options)."""
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("self", "directory", "path", "model", "tokenizer", "fmt")]


def check_options(cls: type, factory, options: dict, name: str) -> None:
    allowed = option_names(factory)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise EdgesmithError(f"{name} backend: unknown option {unknown[0]!r}; allowed: {', '.join(allowed) or 'none'}")


def manifest_options(path: Path, manifest: dict, factory) -> dict:
    """The manifest's `runtime_options` (the configuration the export checked parity in) that this backend takes:
    a TensorRT artifact run by ONNX Runtime gets none of TensorRT's."""
    recorded = manifest.get("runtime_options") or {}
    if not isinstance(recorded, dict):
        raise EdgesmithError(f"{path / MANIFEST}: runtime_options must be a table of backend options")
    allowed = option_names(factory)
    return {k: v for k, v in recorded.items() if k in allowed}


def load(path: str | Path, backend: str | None = None, **options) -> Session:
    """A Session for an artifact directory or a checkpoint. `backend` overrides the choice where
    another backend can run the same files (a TensorRT artifact's ONNX in onnxruntime)."""
    path = Path(path)
    if not path.is_dir():
        # the checkpoint loader's wording, which scripts may already match
        raise EdgesmithError(f"{path}: not a checkpoint directory (no such directory)")
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, verify=False)  # the backend verifies every file's sha256
        fmt = manifest.get("format")
        allowed = backends_for(fmt) if isinstance(fmt, str) else []
        if not allowed:
            raise EdgesmithError(f"{path / MANIFEST}: format {fmt!r}; allowed: {', '.join(artifact_formats())}")
        name = backend or allowed[0]
        if name not in allowed:
            raise EdgesmithError(f"backend {name!r} cannot run a {fmt} artifact; allowed: {', '.join(allowed)}")
        cls = backend_class(name)
        check_options(cls, cls.__init__, options, name)
        options = {**manifest_options(path, manifest, cls.__init__), **options}  # the caller's override the manifest's
        if name == "onnxruntime" and fmt != "onnx":
            options["fmt"] = fmt
        return cls(path, tokenizer=artifact_tokenizer(path, manifest), **options)
    if (path / "edgesmith.json").is_file() or (path / "config.json").is_file():
        if backend not in (None, "torch"):
            raise EdgesmithError(f"{path}: a checkpoint runs on the torch backend (export it to run it on {backend})")
        cls = backend_class("torch")
        check_options(cls, cls.from_path, options, "torch")
        return cls.from_path(path, **options)
    raise EdgesmithError(f"{path}: neither an artifact directory ({MANIFEST}) nor a checkpoint (edgesmith.json or "
                         "config.json)")
