"""`edgesmith verify`: a verdict per file for artifacts and checkpoints, without running them."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from models.checkpoint import sha256_file
from runtimes.verify import verify
from tests.conftest import TEXT
from edgesmith.cli import main
from models.tokenizer import train_tokenizer
from toolchain.export.manifest import write_manifest


def copy(src, tmp_path, name="copy"):
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def flip(path, at=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def reseal(directory):
    write_manifest(directory, json.loads((directory / "manifest.json").read_text()))


def reseal_checkpoint(directory):
    meta = json.loads((directory / "edgesmith.json").read_text())
    w = directory / "model.safetensors"
    meta["files"]["model.safetensors"] = {"sha256": sha256_file(w), "bytes": w.stat().st_size}
    (directory / "edgesmith.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["gguf", "onnx", "executorch", "gguf-q4", "onnx-q4"])
def test_good_artifacts_pass_every_check(artifact, name):
    # execute
    v = verify(artifact(name))
    # assert: every listed file checked, and the entry's format header among the checks
    assert v.ok, [c for c in v.checks if not c.ok]
    files = json.loads((artifact(name) / "manifest.json").read_text())["files"]
    assert [c.file for c in v.checks] == ["manifest.json", *sorted(files)]
    entry = next(c for c in v.checks if c.file.startswith("model."))
    assert "sha256 ok" in entry.detail and any(w in entry.detail for w in ("GGUF header ok", "ONNX IR", "ExecuTorch"))


@pytest.mark.parametrize("name", ["float", "q4"])
def test_good_checkpoints_pass_every_check(checkpoints, name):
    v = verify(checkpoints[name])
    assert v.ok, [c for c in v.checks if not c.ok]
    weights = next(c for c in v.checks if c.file == "model.safetensors")
    assert "names, dtypes and shapes match config.json" in weights.detail
    assert ("quantization" in weights.detail) == (name == "q4")


def test_every_bad_file_is_named_and_the_others_still_checked(artifact, tmp_path):
    # setup: two files damaged at once
    d = copy(artifact("gguf"), tmp_path)
    flip(d / "model.gguf")
    flip(d / "tokenizer.json", at=3)
    # execute
    v = verify(d)
    # assert
    bad = {c.file: c.detail for c in v.checks if not c.ok}
    assert set(bad) == {"model.gguf", "tokenizer.json"}
    assert all("sha256 does not match manifest.json" in msg for msg in bad.values())
    assert next(c for c in v.checks if c.file == "tokenizer_config.json").ok


def test_a_resealed_gguf_with_an_edited_header_fails_on_its_header(artifact, tmp_path):
    # setup: n_tensors asks for 2^62 tensors, and the manifest is resealed so the sha256 matches
    d = copy(artifact("gguf"), tmp_path)
    data = bytearray((d / "model.gguf").read_bytes())
    data[8:16] = (1 << 62).to_bytes(8, "little")
    (d / "model.gguf").write_bytes(bytes(data))
    reseal(d)
    # execute
    v = verify(d)
    # assert
    (bad,) = v.failures()
    assert bad.file == "model.gguf" and "\n" not in bad.detail and "tensor" in bad.detail


def test_a_checkpoint_whose_config_disagrees_with_its_tensors_fails(checkpoints, tmp_path):
    # setup: config.json says one layer more than the weights hold
    d = copy(checkpoints["float"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    # execute
    v = verify(d)
    # assert
    (bad,) = v.failures()
    assert bad.file == "model.safetensors" and f"missing tensor 'model.layers.{n}." in bad.detail


def test_a_checkpoint_with_a_mis_shaped_tensor_fails_without_loading_it(checkpoints, tmp_path):
    # setup
    d = copy(checkpoints["float"], tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-32].contiguous()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    reseal_checkpoint(d)
    # execute
    v = verify(d)
    # assert
    (bad,) = v.failures()
    assert f"tensor {name!r} has shape" in bad.detail


def test_the_tokenizer_of_another_model_fails(checkpoints, tmp_path):
    d = copy(checkpoints["float"], tmp_path)
    train_tokenizer([TEXT + "other model, other merges"], vocab_size=400, show_progress=False).save(d)
    (bad,) = verify(d).failures()
    assert bad.file == "tokenizer.json" and "tokens but config.json vocab_size is 320" in bad.detail


def test_a_hostile_manifest_fails_on_the_manifest_before_any_file_is_read(artifact, tmp_path):
    # setup: an entry that is a FIFO outside the directory (reading it would block the test)
    d = copy(artifact("onnx"), tmp_path)
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", d / "extra.bin")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["extra.bin"] = {"sha256": "0" * 64, "bytes": 1}
    (d / "manifest.json").write_text(json.dumps(m))
    # execute
    v = verify(d)
    # assert
    assert [(c.file, c.ok) for c in v.checks] == [("manifest.json", False)]
    assert "'extra.bin'" in v.checks[0].detail and "leaves its directory" in v.checks[0].detail


def test_verify_runs_no_runtime(artifact):
    # a check that loaded the model would import the format runtime; verify imports none of them
    code = ("import sys; from runtimes.verify import verify; "
            f"assert all(verify(p).ok for p in {[str(artifact(n)) for n in ('gguf', 'onnx', 'executorch')]!r}); "
            "print(sorted(m for m in ('llama_cpp', 'onnxruntime', 'executorch.extension.pybindings.portable_lib') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the command


def test_cli_prints_a_verdict_per_file_and_exits_2_on_any_failure(artifact, checkpoints, tmp_path, capsys):
    # setup: one good artifact, one damaged checkpoint
    d = copy(checkpoints["float"], tmp_path)
    flip(d / "model.safetensors")
    # execute
    code = main(["verify", str(artifact("gguf")), str(d)])
    out, err = capsys.readouterr()
    # assert
    assert code == 2
    assert "verdict: ok (4 checks)" in out and "verdict: FAILED (1 of 4: model.safetensors)" in out
    assert any(line.split()[:2] == ["FAILED", "model.safetensors"] for line in out.splitlines())
    assert err.strip().splitlines() == [f"edgesmith: error: verify: 1 of 2 paths failed: {d}"]


def test_cli_exit_0_and_json(artifact, capsys):
    assert main(["verify", "--json", str(artifact("onnx"))]) == 0
    (v,) = json.loads(capsys.readouterr().out)
    assert v["ok"] and v["kind"] == "artifact (onnx)" and len(v["checks"]) == 4


def test_cli_missing_path(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().out
