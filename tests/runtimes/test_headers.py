"""The header checks (runtimes.headers, models.headers) wired into the backends, on the session's real tiny
artifacts: a hostile GGUF, ONNX (external data), .pte or safetensors file, resealed (its sha256 and bytes
rewritten in manifest.json or edgesmith.json) so that the header check and not the sha256 check must refuse
it, is refused by `runtimes.load` in one line naming it; the checkers pass every good artifact and agree
with each format's own reader; and the good artifacts give, bit for bit, the logits they gave without the
checks. Hand-made hostile files for each checker are in tests/reliability/test_bounded_readers.py.
"""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import runtimes
from models.checkpoint import sha256_file
from models.errors import EdgesmithError
from models.headers import check_safetensors
from runtimes.headers import gguf_header, onnx_header, pte_header
from tests.reliability.test_bounded_readers import within
from toolchain.export.parity import torch_threads


def reseal(directory: Path, name: str) -> None:
    """Record `name`'s new sha256 and bytes (in manifest.json, or a checkpoint's edgesmith.json), so that the
    header check, not the sha256 check, is what must refuse it."""
    record = directory / ("manifest.json" if (directory / "manifest.json").is_file() else "edgesmith.json")
    meta = json.loads(record.read_text())
    meta["files"][name] = {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
    record.write_text(json.dumps(meta))


def load_refused(directory: Path, bad_file: Path, match: str) -> None:
    with within(120), torch_threads(1), pytest.raises(EdgesmithError) as e:
        runtimes.load(directory)
    message = str(e.value)
    assert "\n" not in message and str(bad_file) in message and match in message, message


def poke(path: Path, offset: int, value: int) -> None:
    """Overwrite the uint64 at `offset`."""
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))


def gguf_offsets(path: Path) -> dict:
    """Where the last tensor's offset and the vocabulary's count lie in a GGUF file (found with gguf-py)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    info = reader.tensors[-1].field
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return {"tensor offset": info.offset + sum(p.nbytes for p in info.parts[:-1]),
            "token count": tokens.offset + 8 + len(tokens.name.encode()) + 4 + 4}


@pytest.mark.parametrize("field, value, match", [("tensor offset", 2**40, "past the end of the data section"),
                                                 ("token count", 2**40, "array of 1099511627776 items")])
def test_load_refuses_a_resealed_hostile_gguf(field, value, match, artifact, tmp_path):
    # setup
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad"
    shutil.copytree(artifact("gguf"), bad)
    poke(bad / "model.gguf", gguf_offsets(bad / "model.gguf")[field], value)
    reseal(bad, "model.gguf")
    # execute / assert
    load_refused(bad, bad / "model.gguf", match)


@pytest.fixture(scope="module")
def onnx_external_dir(artifact, tmp_path_factory) -> Path:
    """The ONNX artifact with its weights in `model.onnx.data` (as the exporter writes past 1 GB)."""
    import onnx

    from toolchain.export.manifest import write_manifest

    out = tmp_path_factory.mktemp("bounded") / "onnx-external"
    shutil.copytree(artifact("onnx"), out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"]["external_data"] = True
    write_manifest(out, manifest)
    return out


def _stray(d: Path) -> str:
    shutil.copy(d / "model.onnx.data", d / "stray.data")  # in the folder, not in the manifest
    return "stray.data"


def _outside(d: Path) -> str:
    shutil.copy(d / "model.onnx.data", d.parent / "model.onnx.data")  # ONNX Runtime would read it
    return "../model.onnx.data"


@pytest.mark.parametrize("make, offset, match", [
    (_outside, 0, "goes up with '..'"),
    (_stray, 0, "not one of the artifact's files"),
    (lambda d: "model.onnx.data", 2**40, "lies outside 'model.onnx.data'"),
], ids=["../", "not-in-manifest", "offset-past-the-end"])
def test_load_refuses_a_resealed_onnx_with_hostile_external_data(make, offset, match, onnx_external_dir, tmp_path):
    import onnx

    # setup: the first external tensor's location (and offset) rewritten
    bad = tmp_path / "bad"
    shutil.copytree(onnx_external_dir, bad)
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in tensor.external_data}
    entries.update(location=make(bad), offset=str(offset))
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    (bad / "model.onnx").write_bytes(model.SerializeToString())
    reseal(bad, "model.onnx")
    # execute / assert
    load_refused(bad, bad / "model.onnx", match)


@pytest.mark.parametrize("offset, match", [(16, "program size"), (32, "segment data")],
                         ids=["program-size", "segment-size"])
def test_load_refuses_a_resealed_hostile_pte(offset, match, artifact, tmp_path):
    # setup: a size in the extended header ("eh00" at byte 8) one byte past the end of the file
    bad = tmp_path / "bad"
    shutil.copytree(artifact("executorch"), bad)
    path = bad / "model.pte"
    assert path.read_bytes()[8:12] == b"eh00"
    base = struct.unpack_from("<Q", path.read_bytes(), 24)[0] if offset == 32 else 0
    poke(path, offset, path.stat().st_size - base + 1)
    reseal(bad, "model.pte")
    # execute / assert
    load_refused(bad, path, match)


def test_load_refuses_a_resealed_hostile_safetensors_checkpoint(checkpoints, tmp_path):
    # setup: one tensor's shape made negative, the header rewritten with its new length, the data kept
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["float"], bad)
    path = bad / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [-d for d in header[name]["shape"]]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    reseal(bad, "model.safetensors")
    # execute / assert
    load_refused(bad, path, "non-negative")


GOOD = ["gguf", "gguf-q4", "onnx", "onnx-q4", "executorch"]


@pytest.mark.parametrize("name", GOOD)
def test_the_checkers_pass_good_artifacts_and_agree_with_the_formats_own_readers(name, artifact, checkpoints):
    # setup
    directory = artifact(name)
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = directory / manifest["entry"]
    # execute / assert
    if name.startswith("gguf"):
        from gguf import GGUFReader

        reader, summary = GGUFReader(str(entry)), gguf_header(entry)
        assert (summary["tensors"], summary["keys"], summary["data_offset"]) == (len(reader.tensors),
                                                                                 len(reader.fields) - 3,
                                                                                 reader.data_offset)
        assert summary["architecture"] == "llama" and summary["tokens"] == manifest["model"]["vocab_size"]
    elif name.startswith("onnx"):
        import onnx

        summary = onnx_header(entry, directory, files=list(manifest["files"]))
        model = onnx.load(str(entry))
        assert (summary["nodes"], summary["initializers"]) == (len(model.graph.node), len(model.graph.initializer))
    else:
        summary = pte_header(entry)
        assert summary["identifier"] == "ET12" and summary["extended_header"]
        assert summary["segment_base_offset"] + summary["segment_bytes"] == entry.stat().st_size
    from safetensors import safe_open

    weights = checkpoints["float"] / "model.safetensors"
    with safe_open(str(weights), framework="np") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: shape for k, (_, shape) in check_safetensors(weights).items()} == expected


@pytest.mark.parametrize("name, options", [("gguf", {}), ("gguf-q4", {}), ("onnx", {}), ("onnx-plain", {}),
                                           ("onnx-q4", {"accuracy_level": 4}), ("executorch", {})])
def test_good_artifacts_give_the_logits_they_gave_without_the_header_checks(name, options, artifact, prompt,
                                                                             monkeypatch):
    import onnx

    from runtimes.backends import executorch as et_backend
    from runtimes.backends import llamacpp as llama_backend
    from runtimes.backends import onnxruntime as ort_backend

    if name.startswith("gguf"):
        pytest.importorskip("llama_cpp")
    # execute: with the checks, then with the backends as they were before them
    with torch_threads(1):
        checked = runtimes.load(artifact(name), **options).prefill(prompt)[-1]
        monkeypatch.setattr(llama_backend, "gguf_header", lambda path: {})
        monkeypatch.setattr(ort_backend, "read_onnx", lambda path, directory, files=None: (
            {}, onnx.load(str(path), load_external_data=False)))
        monkeypatch.setattr(et_backend, "pte_header", lambda path: {})
        unchecked = runtimes.load(artifact(name), **options).prefill(prompt)[-1]
    # assert: bit for bit (the first token's logits)
    assert checked.shape == (320,) and np.array_equal(checked, unchecked)
