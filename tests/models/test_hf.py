"""Interop with Hugging Face transformers, both directions, on tiny random models."""

import json

import pytest
import torch

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.hf import import_hf
from tests.conftest import TEXT

transformers = pytest.importorskip("transformers")

SAMPLES = ["def add(a, b):\n    return a + b", "Ünïcödé ✓ 漢字 🚀", "  spaces\tand\ttabs\n\n", TEXT[:300]]


def _hf_llama(tie=False, **overrides):
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_loads_our_checkpoint(tiny_config, tokenizer, tmp_path, tie):
    # setup
    import dataclasses

    from models.llama import Transformer

    torch.manual_seed(1)
    ours = Transformer(dataclasses.replace(tiny_config, tie_embeddings=tie)).eval()
    path = save_checkpoint(ours, tokenizer, tmp_path / "ckpt", child_lineage(None, {"kind": "test"}))
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    # execute
    hf = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    # assert
    assert diff <= 1e-4


def test_auto_tokenizer_gives_our_ids(tiny_model, tokenizer, tmp_path):
    path = save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt", child_lineage(None, {"kind": "test"}))
    auto = transformers.AutoTokenizer.from_pretrained(path)
    for text in SAMPLES:
        assert auto(text)["input_ids"] == tokenizer.encode(text)
        assert auto.decode(tokenizer.encode(text)) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)


@pytest.mark.parametrize("tie, shard", [(False, False), (True, True)])
def test_import_transformers_llama(tokenizer, tmp_path, tie, shard):
    # setup
    hf = _hf_llama(tie=tie)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="100KB" if shard else "5GB")
    tokenizer.save(src)
    assert (src / "model.safetensors.index.json").exists() == shard
    # execute
    out = import_hf(src, tmp_path / "ckpt")
    ckpt = load_checkpoint(out)
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - ckpt.model(tokens)).abs().max().item()
    # assert
    assert diff <= 1e-4
    assert json.loads((out / "edgesmith.json").read_text())["lineage"]["passes"][0]["kind"] == "import-hf"


def test_import_refuses_pickles_and_unrepresentable_configs(tokenizer, tmp_path):
    src = tmp_path / "hf"
    _hf_llama().save_pretrained(src, safe_serialization=False)
    tokenizer.save(src)
    with pytest.raises(EdgesmithError, match=r"pytorch_model.bin: pickle weights are never loaded"):
        import_hf(src, tmp_path / "out")
    biased = tmp_path / "biased"
    _hf_llama(attention_bias=True).save_pretrained(biased)
    tokenizer.save(biased)
    with pytest.raises(EdgesmithError, match=r"config.json: attention_bias=True is not supported; allowed: False"):
        import_hf(biased, tmp_path / "out")
    assert not (tmp_path / "out").exists()
