"""A Hugging Face decoder our model family cannot represent (Qwen2) exports to ONNX via optimum."""

import pytest
import torch

from models.errors import EdgesmithError
from runtimes.artifact import read_manifest
from toolchain.export import ExportConfig, export


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "qwen2-tiny"
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    tokenizer.save(path)
    return path


def test_qwen2_exports_through_optimum_with_parity_against_transformers(qwen_dir, tmp_path):
    # execute
    out = tmp_path / "onnx"
    manifest = export(qwen_dir, out, ExportConfig(format="onnx", max_seq_len=96))
    # assert
    assert manifest["exporter"] == "optimum (text-generation-with-past)" and manifest["model"]["model_type"] == "qwen2"
    p = manifest["parity"]
    assert p["passed"] and p["reference"] == "transformers fp32" and p["greedy_matched"] == 32
    assert p["max_abs_logit_diff"] < 1e-4 * p["max_abs_reference_logit"]
    assert {"model.onnx", "tokenizer.json"} <= set(read_manifest(out, "onnx")["files"])


@pytest.mark.parametrize("cfg, message", [
    (ExportConfig(format="gguf"), "exports only with --format onnx"),
    (ExportConfig(format="onnx", precision="fp16"), "allowed: --precision fp32, without --no-fuse"),
])
def test_other_formats_are_refused_in_one_line(qwen_dir, tmp_path, cfg, message):
    with pytest.raises(EdgesmithError, match=message):
        export(qwen_dir, tmp_path / "a", cfg)
    assert list(tmp_path.iterdir()) == []
