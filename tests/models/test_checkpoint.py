import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import models.checkpoint as checkpoint
from models.checkpoint import child_lineage, load_checkpoint, resolve_lineage, save_checkpoint
from models.errors import EdgesmithError
from models.llama import Transformer
from models.quant import quantize_embedding_, quantize_linear_

STEP = {"kind": "train", "steps": 0}


@pytest.fixture
def saved(tiny_model, tokenizer, tmp_path):
    return save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", child_lineage(None, STEP))


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_exact(tiny_config, tokenizer, tmp_path, tie):
    # setup
    torch.manual_seed(3)
    model = Transformer(dataclasses.replace(tiny_config, tie_embeddings=tie))
    # execute
    path = save_checkpoint(model, tokenizer, tmp_path / "ckpt", child_lineage(None, STEP))
    ckpt = load_checkpoint(path)
    # assert
    assert ckpt.config == model.config
    assert ckpt.tokenizer.fingerprint == tokenizer.fingerprint
    ours, theirs = model.state_dict(), ckpt.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (ckpt.model.lm_head.weight is ckpt.model.embed_tokens.weight) == tie
    assert torch.equal(ckpt.model.rope_cos, model.rope_cos) and torch.equal(ckpt.model.rope_sin, model.rope_sin)
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "edgesmith.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_a_quantized_checkpoint_loads_without_building_its_float_linears(tiny_model, tokenizer, tmp_path,
                                                                          monkeypatch):
    # setup: every Linear and the embedding at 4 bits
    quantize_linear_(tiny_model, 4, 32)
    quantize_embedding_(tiny_model, 4, 32)
    path = save_checkpoint(tiny_model, tokenizer, tmp_path / "q", child_lineage(None, STEP))
    initialised = []
    normal = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        if not tensor.is_meta:
            initialised.append(tuple(tensor.shape))
        return normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    # execute
    ckpt = load_checkpoint(path)
    # assert: no float weight was allocated and randomly initialised only to be replaced; the model is the one saved
    assert initialised == []
    ids = torch.tensor([[1, 5, 9, 14]])
    assert torch.equal(ckpt.model(ids), tiny_model(ids))


def test_lineage_and_versions(saved, tiny_model, tokenizer, tmp_path):
    parent = load_checkpoint(saved)
    child = save_checkpoint(tiny_model, tokenizer, tmp_path / "child", child_lineage(parent, {"kind": "quantize"}))
    meta = json.loads((child / "edgesmith.json").read_text())
    # the parent is named relative to the child, so a run copied as a whole keeps its lineage
    rel = os.path.relpath(saved.resolve(), child.resolve())
    assert meta["lineage"] == {"parent": Path(rel).as_posix(), "passes": [STEP, {"kind": "quantize"}]}
    assert resolve_lineage(child, meta["lineage"]["parent"]) == saved.resolve()
    assert {"edgesmith", "torch", "tokenizers", "safetensors"} <= meta["versions"].keys()
    assert len(meta["files"]["model.safetensors"]["sha256"]) == 64


def test_save_replaces_atomically_and_cleans_up_on_failure(saved, tiny_model, tokenizer, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tiny_model, tokenizer, saved, child_lineage(None, STEP))
    assert load_checkpoint(saved).model is not None, "the old checkpoint is untouched"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"], "no temporary directory left behind"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _forget_file_record(ckpt):
    meta = json.loads((ckpt / "edgesmith.json").read_text())
    meta["files"] = {}
    (ckpt / "edgesmith.json").write_text(json.dumps(meta))


def _edit_config(**changes):
    def edit(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(changes)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: (c / "config.json").unlink(), r"ckpt/config.json: missing"),
    (lambda c: (c / "model.safetensors").unlink(), r"ckpt/model.safetensors: missing"),
    (lambda c: (c / "tokenizer.json").unlink(), r"ckpt/tokenizer.json: missing"),
    (lambda c: (c / "edgesmith.json").unlink(), r"ckpt/edgesmith.json: missing"),
    (lambda c: _truncate(c / "model.safetensors"), r"model.safetensors: \d+ bytes, edgesmith.json records \d+ \(truncated"),
    (lambda c: _flip_byte(c / "model.safetensors"), r"model.safetensors: sha256 does not match"),
    (lambda c: (_forget_file_record(c), _truncate(c / "model.safetensors")),
     r"model.safetensors: .*truncated or corrupt"),
    (lambda c: (c / "config.json").write_text("{\"a\": "), r"config.json: not valid JSON"),
    (_edit_config(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not supported; allowed: 'silu'"),
    (_edit_config(hidden_size=100, head_dim=25), r"config.json: ModelConfig.dim: 100 is not a multiple of 32"),
    (_edit_config(model_type="gpt2"), r"config.json: model_type='gpt2' is not supported; allowed: 'llama', 'mistral', 'qwen2', 'qwen3'"),
    (_edit_config(num_hidden_layers=3), r"model.safetensors: missing tensor 'model.layers.2"),
    (_edit_config(intermediate_size=96), r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"),
])
def test_bad_checkpoint_fails_with_one_line(saved, corrupt, message):
    corrupt(saved)
    with pytest.raises(EdgesmithError, match=message) as info:
        load_checkpoint(saved)
    assert "\n" not in str(info.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(EdgesmithError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert load_checkpoint(saved).model is not None
