"""Fast by default: the configuration an export verified is what every load runs, unless the user overrides it."""

import json
import shutil

import pytest

import runtimes
from edgesmith.cli import main
from models.errors import EdgesmithError


@pytest.mark.parametrize("name, recorded, runs", [
    ("onnx-q4", {"accuracy_level": 4}, {"accuracy_level": 4}),  # int8 activations: ONNX Runtime's fast int4 path
    ("onnx", {}, {"accuracy_level": 0}),  # a float graph has no MatMulNBits
    # llama.cpp's CPU flash attention decodes slower than its plain attention (BENCHMARKS.md, issue 19)
    ("gguf-q4", {"flash_attn": False, "kv_cache": "f16"}, {"flash_attn": False, "kv_cache": "f16"}),
    ("gguf", {}, {"flash_attn": False, "kv_cache": "f32"}),  # fp32 floats: fp16 rounding is over the 1e-4 threshold
])
def test_the_manifest_records_what_parity_was_checked_in_and_load_runs_it(artifact, name, recorded, runs):
    # setup
    path = artifact(name)
    manifest = json.loads((path / "manifest.json").read_text())
    # execute
    session = runtimes.load(path)
    # assert
    assert manifest["runtime_options"] == recorded
    assert manifest["parity"]["passed"] and runs.items() <= manifest["parity"]["runtime_options"].items()
    assert runs.items() <= session.run_options.items()


def test_a_caller_overrides_the_manifest_option_by_option(artifact):
    # execute
    exact = runtimes.load(artifact("onnx-q4"), accuracy_level=0, n_threads=2)
    # assert
    assert exact.run_options == {"accuracy_level": 0, "n_threads": 2}


def test_a_tensorrt_artifact_in_onnx_runtime_takes_only_options_onnx_runtime_has(artifact, tmp_path):
    # setup: a manifest option ONNX Runtime does not have (as TensorRT's own would be)
    copy = tmp_path / "trt"
    shutil.copytree(artifact("tensorrt"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "runtime_options": {"builder_optimization_level": 5}}))
    # execute / assert
    assert runtimes.load(copy, backend="onnxruntime").run_options["accuracy_level"] == 0


def test_a_bad_runtime_options_entry_is_one_line(artifact, tmp_path):
    # setup
    copy = tmp_path / "a"
    shutil.copytree(artifact("gguf"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "runtime_options": ["flash_attn"]}))
    # execute / assert
    with pytest.raises(EdgesmithError, match="manifest.json: runtime_options must be a table"):
        runtimes.load(copy)


def test_eval_prints_what_it_ran_with_and_the_flags_override(artifact, capsys):
    # execute
    rc_default = main(["eval", str(artifact("onnx-q4")), "--max-tokens", "512", "--seq-len", "64"])
    default = capsys.readouterr().out
    rc_exact = main(["eval", str(artifact("onnx-q4")), "--max-tokens", "512", "--seq-len", "64",
                     "--accuracy-level", "0", "--threads", "1"])
    exact = capsys.readouterr().out
    # assert
    assert (rc_default, rc_exact) == (0, 0)
    assert "through onnxruntime, accuracy_level=4" in default and "accuracy_level=0 threads=1" in exact


@pytest.mark.parametrize("name, argv, message", [
    ("onnx-q4", ["--kv-cache", "fp16"], "--kv-cache: {path} is an artifact of format onnx, run by onnxruntime, which "
                                        "has no such option (its runtime flags: --threads, --accuracy-level)"),
    ("gguf", ["--accuracy-level", "4"], "--accuracy-level: {path} is an artifact of format gguf, run by llamacpp"),
    ("checkpoint", ["--flash-attn", "on"], "--flash-attn: {path} is a checkpoint (torch), which has no such option"),
    ("gguf", ["--threads", "0"], "--threads: 0 must be >= 1"),
])
def test_a_flag_the_backend_does_not_have_is_one_line_exit_2(artifact, checkpoints, capsys, name, argv, message):
    # setup
    path = checkpoints["float"] if name == "checkpoint" else artifact(name)
    # execute
    rc = main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "2", *argv])
    # assert
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert message.format(path=path) in err, err
