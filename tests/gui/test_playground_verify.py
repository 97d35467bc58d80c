"""The Playground shows `edgesmith verify`'s verdict for the models picked, and loads nothing that fails it."""

import json
import shutil

import runtimes
from gui.playground import VERDICT_COLUMNS, Playground, verdict_table
from gui.workspace import Workspace
from toolchain.export.manifest import write_manifest


def hostile(src, out):
    """A copy of the GGUF artifact whose header asks for 2^62 tensors, resealed: only the header check refuses it."""
    shutil.copytree(src, out)
    data = bytearray((out / "model.gguf").read_bytes())
    data[8:16] = (1 << 62).to_bytes(8, "little")
    (out / "model.gguf").write_bytes(bytes(data))
    write_manifest(out, json.loads((out / "manifest.json").read_text()))
    return out


def test_the_verdict_table_names_each_file(artifact, tmp_path):
    # setup
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(artifact("gguf"), ws.root / "good")
    hostile(artifact("gguf"), ws.root / "bad")
    # execute
    table = verdict_table(ws, "good", "bad")
    # assert
    assert list(table.columns) == VERDICT_COLUMNS
    rows = {(m[0], f): v for m, f, v in zip(table["model"], table["file"], table["verdict"])}
    assert rows[("A", "model.gguf")] == "ok" and rows[("B", "model.gguf")] == "FAILED"
    assert rows[("B", "tokenizer.json")] == "ok"
    bad = table[(table["verdict"] == "FAILED")]["detail"].iloc[0]
    assert "model.gguf" in bad and str(ws.root) not in bad  # shown relative to the model's directory
    outside = verdict_table(ws, "../elsewhere")
    assert outside["verdict"].tolist() == ["FAILED"] and "outside the workspace" in outside["detail"].iloc[0]


def test_generate_refuses_a_model_that_fails_verify_and_loads_nothing(artifact, tmp_path, monkeypatch):
    # setup: count every load
    ws = Workspace(tmp_path / "ws")
    hostile(artifact("gguf"), ws.root / "bad")
    loads = []
    real_load = runtimes.load
    monkeypatch.setattr(runtimes, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    play = Playground(ws)
    # execute
    *_, status = list(play.generate("def f():", "bad", "none", 8, 0))[-1]
    # assert
    assert status.startswith("**Refused:**") and "model.gguf" in status and "\n" not in status
    assert loads == [] and play.pool.loaded() == 0
