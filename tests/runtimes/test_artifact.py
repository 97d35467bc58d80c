"""Reading artifact manifests: one clear line for every way a directory can be wrong."""

import json

import pytest

from models.errors import EdgesmithError
from runtimes.artifact import MANIFEST_FORMAT, read_manifest, sha256_file


def artifact(tmp_path, **overrides):
    (tmp_path / "model.bin").write_bytes(b"weights" * 10)
    manifest = {"manifest": MANIFEST_FORMAT, "format": "gguf", "entry": "model.bin", "options": {"max_seq_len": 64},
                "precision": "fp32",
                "files": {"model.bin": {"sha256": sha256_file(tmp_path / "model.bin"), "bytes": 70}}, **overrides}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_a_good_artifact_reads(tmp_path):
    assert read_manifest(artifact(tmp_path), "gguf")["entry"] == "model.bin"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json: missing (not an exported artifact directory)"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[]"), "manifest.json: expected a JSON object, got list"),
    (lambda d: (d / "manifest.json").write_text("{}"), "manifest.json: not an edgesmith artifact manifest"),
    (lambda d: (d / "model.bin").unlink(), "model.bin: missing (listed in manifest.json)"),
    (lambda d: (d / "model.bin").write_bytes(b"weights"), "model.bin: 7 bytes, manifest.json records 70"),
    (lambda d: (d / "model.bin").write_bytes(b"WEIGHTS" * 10), "model.bin: sha256 does not match manifest.json"),
])
def test_damage_is_named_in_one_line(tmp_path, damage, message):
    # setup
    d = artifact(tmp_path)
    damage(d)
    # execute / assert
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(d, "gguf")


def test_a_backend_refuses_another_format(tmp_path):
    with pytest.raises(EdgesmithError, match="format is 'gguf', this backend reads 'onnx'"):
        read_manifest(artifact(tmp_path), "onnx")
