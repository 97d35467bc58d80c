"""The export driver and CLI: manifests, atomic output, one-line errors that leave nothing behind."""

import json
from pathlib import Path

import pytest

from models.checkpoint import resolve_lineage
from models.errors import EdgesmithError
from runtimes.artifact import read_manifest
from edgesmith.cli import main
from toolchain.export import ExportConfig, export


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_cli_export_writes_a_verified_manifest(float_checkpoint, tmp_path, capsys):
    # execute
    rc = main(["export", str(float_checkpoint), "--format", "gguf", "--out", str(tmp_path / "a"),
               "--max-seq-len", "64"])
    # assert
    assert rc == 0
    out = capsys.readouterr().out
    assert "greedy 32/32" in out and "exported" in out
    m = read_manifest(tmp_path / "a", "gguf")  # verifies every sha256
    ckpt_meta = json.loads((float_checkpoint / "edgesmith.json").read_text())
    assert m["format"] == "gguf" and m["entry"] == "model.gguf" and m["options"]["max_seq_len"] == 64
    assert m["model"]["n_kv_heads"] == 2 and m["tokenizer"]["file"] == "tokenizer.json"
    assert m["quantization"] is None
    assert m["lineage"]["passes"] == ckpt_meta["lineage"]["passes"]
    assert m["lineage"]["checkpoint_sha256"] == ckpt_meta["files"]["model.safetensors"]["sha256"]
    assert not Path(m["lineage"]["checkpoint"]).is_absolute()  # relative to the artifact: a copied run stays whole
    assert resolve_lineage(tmp_path / "a", m["lineage"]["checkpoint"]) == float_checkpoint.resolve()
    assert m["versions"]["edgesmith"] and m["versions"]["llama-cpp-python"] != "not installed"
    assert m["parity"]["passed"] is True


def test_tampered_artifact_is_refused(float_checkpoint, tmp_path):
    from runtimes.backends.llamacpp import LlamaCppBackend

    # setup
    out = tmp_path / "a"
    export(float_checkpoint, out, ExportConfig(format="gguf", max_seq_len=64))
    data = bytearray((out / "model.gguf").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.gguf").write_bytes(bytes(data))
    # execute / assert
    with pytest.raises(EdgesmithError, match="model.gguf: sha256 does not match manifest.json"):
        LlamaCppBackend(out)
    (out / "model.gguf").write_bytes(bytes(data[:-10]))
    with pytest.raises(EdgesmithError, match="truncated or replaced"):
        LlamaCppBackend(out)


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite"], "--format: unknown format 'tflite'; allowed: executorch, gguf, onnx, tensorrt"),
    (["--format", "gguf", "--precision", "int3"], "--precision: 'int3'; allowed: fp32, fp16"),
    (["--format", "gguf", "--max-seq-len", "4096"], "--max-seq-len: 4096 exceeds the model's max_seq_len 128"),
    (["--format", "gguf", "--max-seq-len", "16"], "--max-seq-len: 16 is too short for the parity check"),
])
def test_bad_input_is_one_line_and_leaves_nothing(float_checkpoint, tmp_path, capsys, argv, message):
    # execute
    rc = main(["export", str(float_checkpoint), "--out", str(tmp_path / "a"), *argv])
    # assert
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert leftovers(tmp_path, "a") == []


def test_existing_output_needs_force(float_checkpoint, tmp_path, capsys):
    # setup
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    # execute
    rc = main(["export", str(float_checkpoint), "--format", "gguf", "--out", str(tmp_path / "a")])
    # assert: refused, untouched, nothing beside it
    assert rc == 2 and "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine" and leftovers(tmp_path, "a") == ["a"]
    # execute: with --force it is replaced
    assert main(["export", str(float_checkpoint), "--format", "gguf", "--out", str(tmp_path / "a"),
                 "--max-seq-len", "64", "--force"]) == 0
    assert not (tmp_path / "a" / "keep.txt").exists() and leftovers(tmp_path, "a") == ["a"]


def test_failed_parity_leaves_nothing(float_checkpoint, tmp_path, monkeypatch):
    # setup: a GGUF writer that breaks the RoPE permutation, as a wrong exporter would
    import toolchain.export.formats.gguf as gguf_export

    monkeypatch.setattr(gguf_export, "permute_rope_rows", lambda w, n_heads: w)
    # execute / assert
    with pytest.raises(EdgesmithError, match="gguf fp32: parity below threshold: max .logit diff."):
        export(float_checkpoint, tmp_path / "a", ExportConfig(format="gguf", max_seq_len=64))
    assert leftovers(tmp_path, "a") == []


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_tied_embeddings_export(tokenizer, tmp_path, fmt):
    import dataclasses

    import numpy as np
    import torch

    from models.checkpoint import save_checkpoint
    from models.llama import ModelConfig, Transformer
    from tests.conftest import TEXT
    from tests.toolchain.export.conftest import fit

    # setup: a tied-head model (the head is the embedding; GGUF then has no output.weight)
    cfg = dataclasses.replace(ModelConfig(vocab_size=320, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                          ffn_dim=128, max_seq_len=128), tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    fit(model, np.array(tokenizer.encode(TEXT), dtype=np.uint16), steps=30)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "tied", {"parent": None, "passes": []})
    # execute
    m = export(ckpt, tmp_path / fmt, ExportConfig(format=fmt, max_seq_len=64))
    # assert
    assert m["parity"]["passed"] and m["parity"]["greedy_matched"] == 32 and m["model"]["tie_embeddings"]
