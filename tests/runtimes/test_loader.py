"""`runtimes.load`: the backend of each artifact format and of checkpoints, options, bad paths."""

import json

import pytest
import torch

import runtimes
from models.errors import EdgesmithError
from runtimes import GenerationConfig
from toolchain.export.parity import torch_threads


@pytest.mark.parametrize("name, backend", [("gguf", "llamacpp"), ("onnx", "onnxruntime"),
                                           ("onnx-plain", "onnxruntime"), ("executorch", "executorch")])
def test_an_artifact_gets_the_backend_of_its_format(name, backend, artifact):
    session = runtimes.load(artifact(name))
    assert session.backend == backend and session.manifest["format"] == name.split("-")[0]
    assert session.max_seq_len == 128 and session.vocab_size == 320


def test_a_checkpoint_and_a_transformers_directory_run_on_torch(checkpoints, tmp_path, prompt):
    from transformers import LlamaForCausalLM

    # setup: the same weights saved by transformers (no edgesmith.json)
    hf_dir = tmp_path / "hf"
    LlamaForCausalLM.from_pretrained(checkpoints["float"]).save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_text((checkpoints["float"] / name).read_text())
    # execute
    ours, hf = runtimes.load(checkpoints["float"]), runtimes.load(hf_dir)
    with torch_threads(1):
        a = list(ours.generate(prompt, GenerationConfig(max_new_tokens=20)))
        b = list(hf.generate(prompt, GenerationConfig(max_new_tokens=20)))
    # assert
    assert ours.backend == hf.backend == "torch" and a == b
    assert hf.tokenizer.fingerprint == ours.tokenizer.fingerprint


def test_a_quantized_checkpoint_runs_its_fake_quant_weights(checkpoints, prompt):
    from models.checkpoint import load_checkpoint

    # setup: the reference keeps its QuantizedLinears; the session dequantizes them once at load
    reference = load_checkpoint(checkpoints["q4"]).model
    session = runtimes.load(checkpoints["q4"])
    # execute
    with torch.no_grad(), torch_threads(1):
        expected = reference(torch.tensor([prompt]))[0].numpy()
        got = session.prefill(prompt)
    # assert
    assert not any(type(m).__name__ == "QuantizedLinear" for m in session.model.modules())
    assert abs(got - expected).max() < 1e-5 * abs(expected).max()


def test_a_tensorrt_artifact_says_why_it_cannot_run_here_and_runs_its_onnx(artifact, checkpoints, prompt):
    from runtimes.backends.tensorrt import unavailable_reason

    # setup
    path = artifact("tensorrt")
    if unavailable_reason() is None:
        pytest.skip("tensorrt runs on this machine: the engine path is exercised instead")
    # execute / assert: one line, naming the way out
    with pytest.raises(EdgesmithError, match=r"no TensorRT engine in this artifact \(engine not built: the "
                                             r"tensorrt Python package is not installed.*backend='onnxruntime'"):
        runtimes.load(path)
    onnx_session = runtimes.load(path, backend="onnxruntime")
    with torch_threads(1):
        tokens = list(onnx_session.generate(prompt, GenerationConfig(max_new_tokens=20)))
        expected = list(runtimes.load(checkpoints["float"]).generate(prompt, GenerationConfig(max_new_tokens=20)))
    assert onnx_session.graph == "plain" and tokens == expected


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda a, c, t: t / "missing", {}, "missing: not a checkpoint directory (no such directory)"),
    (lambda a, c, t: t, {}, "neither an artifact directory (manifest.json) nor a checkpoint"),
    (lambda a, c, t: a("gguf"), {"backend": "onnxruntime"}, "backend 'onnxruntime' cannot run a gguf artifact; "
                                                            "allowed: llamacpp"),
    (lambda a, c, t: a("gguf"), {"n_thread": 2}, "llamacpp backend: unknown option 'n_thread'; allowed: n_threads, "
                                                "flash_attn, n_ctx, kv_cache, verbose"),
    (lambda a, c, t: c["float"], {"backend": "llamacpp"}, "a checkpoint runs on the torch backend"),
    (lambda a, c, t: c["float"], {"dtype": "int3"}, "torch session dtype 'int3'; allowed: fp32, bf16, fp16"),
    (lambda a, c, t: a("onnx"), {"accuracy_level": 5}, "accuracy_level 5; allowed: 0, 1, 2, 3, 4"),
])
def test_bad_paths_and_options_are_one_clear_line(make, kwargs, message, artifact, checkpoints, tmp_path):
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runtimes.load(make(artifact, checkpoints, tmp_path), **kwargs)


def test_an_unknown_format_is_refused(artifact, tmp_path):
    # setup: a manifest that names a format no backend reads
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(artifact("gguf"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "tflite"}))
    # execute / assert
    with pytest.raises(EdgesmithError, match="format 'tflite'; allowed: executorch, gguf, onnx, tensorrt"):
        runtimes.load(copy)
