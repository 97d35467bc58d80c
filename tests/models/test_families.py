"""Model families as switches of the one model (issue 21): Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Mistral,
SmolLM (a Llama with tied embeddings), Llama-3.1/3.2's and linear RoPE scaling, each built by transformers itself,
tiny and random, no downloads."""

import json

import numpy as np
import pytest
import torch

import runtimes
from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from models.hf import import_hf

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1000000.0)
# family -> (transformers config class, model class, extra config fields)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "smollm": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    # Llama-3.1 / 3.2's frequency scaling (an original context of 32 of 128, so every band is in play) and linear
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "linear": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # Phi-3: q/k/v and gate/up stored fused (qkv_proj, gate_up_proj), split at import, fused again at save
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    # sliding windows shorter than the 40-token test sequence: Mistral's on every layer, Qwen2's on layer 1 only
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 12,
                                                         "max_window_layers": 1}),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "sliding_window": 16}),
    # Gemma: x * (1 + w) norms, four per layer, GELU-tanh, sqrt(dim) embedding scale, a query scalar other than
    # head_dim; Gemma-2's soft-capping (caps low enough to bind), Gemma-3's q/k norms and local rope base; layer 0
    # sliding (window 16), layer 1 full
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 10.0, "pad_token_id": 0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "rope_local_base_freq": 100.0,
        "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0}),
    # a query scalar other than head_dim (Gemma-2 27B's dim / heads): our formats but llama.cpp's gemma3
    "gemma3-scalar": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 16, "pad_token_id": 0}),
}


def hf_model(family: str, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # biases and norm weights away from their init (zeros, ones), so they count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def imported(tokenizer, tmp_path):
    def make(family: str):
        hf = hf_model(family)
        src = tmp_path / f"hf-{family}"
        hf.save_pretrained(src)
        tokenizer.save(src)
        return hf, import_hf(src, tmp_path / f"ckpt-{family}")
    return make


TOKENS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_imported_family_computes_what_transformers_computes(imported, family):
    # setup
    hf, path = imported(family)
    # execute
    model = load_checkpoint(path).model
    with torch.no_grad():
        want, got = hf(TOKENS).logits, model(TOKENS)
    # assert: relative 1e-4 in fp32
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_checkpoint_stays_loadable_by_transformers_as_that_family(imported, family):
    # setup
    hf, path = imported(family)
    # execute: our checkpoint, written by save_checkpoint, through AutoModelForCausalLM
    again = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    # assert
    assert type(again).__name__ == FAMILIES[family][1]
    assert json.loads((path / "config.json").read_text())["model_type"] == hf.config.model_type
    with torch.no_grad():
        assert torch.allclose(again(TOKENS).logits, hf(TOKENS).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "mistral-window", "qwen2-window", "phi3-window", "gemma2",
                                    "gemma3"])
@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_a_family_decodes_through_the_torch_runtime_as_its_full_forward(imported, family, kernels):
    # setup: greedy continuation by transformers' full forward (a windowed family decodes past its window)
    hf, path = imported(family)
    prompt, steps = TOKENS[0, :12].tolist(), 8 if "window" not in family else 20
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    # execute: prefill + cached decodes through the session
    session = runtimes.load(path, kernels=kernels)
    logits = session.prefill(prompt)
    got = [int(np.argmax(logits[-1]))]
    for _ in range(steps - 1):
        got.append(int(np.argmax(session.decode(got[-1]))))
    # assert
    assert got == ids[len(prompt):]


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window"])
def test_a_sliding_window_is_kept_and_changes_what_a_layer_sees(imported, family):
    # setup
    hf, path = imported(family)
    cfg = load_checkpoint(path, with_model=False).config
    # execute: the same weights with the window lifted
    model = load_checkpoint(path).model
    import dataclasses
    from models.llama import Transformer
    unwindowed = Transformer(dataclasses.replace(cfg, sliding_window=None, sliding_layers=None))
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        windowed, full = model(TOKENS), unwindowed(TOKENS)
    # assert: the window is the config's, equal up to it, different past it
    want = {"mistral-window": (16, None), "qwen2-window": (12, (1,))}[family]
    assert (cfg.sliding_window, cfg.sliding_layers) == want
    w = want[0]
    assert torch.allclose(windowed[:, :w], full[:, :w], atol=1e-5)
    assert not torch.allclose(windowed[:, w:], full[:, w:], atol=1e-3)


@pytest.mark.parametrize("family, overrides, field", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["chunked_attention", "full_attention"]},
     "layer_types=['chunked_attention', 'full_attention']"),
    ("mistral", {"sliding_window": -4}, "sliding_window=-4"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("phi3", {"rope_scaling": {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8},
              "original_max_position_embeddings": 64}, "rope_scaling: rope_type='longrope'"),
    ("smollm", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling: rope_type='dynamic'"),
])
def test_what_a_family_config_asks_that_the_model_cannot_represent_is_refused_in_one_line(
        tokenizer, tmp_path, family, overrides, field):
    # setup
    src = tmp_path / "hf"
    hf_model(family, **overrides).save_pretrained(src)
    tokenizer.save(src)
    # execute
    with pytest.raises(EdgesmithError) as e:
        import_hf(src, tmp_path / "ckpt")
    # assert
    assert str(e.value).startswith(f"{src / 'config.json'}: {field}") and "\n" not in str(e.value)
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(tokenizer, tmp_path):
    # setup
    src = tmp_path / "hf"
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
    tokenizer.save(src)
    # execute / assert
    with pytest.raises(EdgesmithError, match=r"model_type='gpt2' is not supported; allowed: 'llama', 'mistral', "
                                             r"'qwen2', 'qwen3'"):
        import_hf(src, tmp_path / "ckpt")


def test_a_quantized_biased_linear_adds_its_float_bias_in_every_kernel(imported, tmp_path, tokenizer):
    from models.checkpoint import child_lineage, save_checkpoint
    from models.quant import QuantizedLinear, quantize_linear_

    # setup: Qwen2 with every Linear 4-bit (q/k/v keep their float biases)
    _, path = imported("qwen2")
    ckpt = load_checkpoint(path)
    quantize_linear_(ckpt.model, 4, 32)
    q = ckpt.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.bias is not None
    out = save_checkpoint(ckpt.model, tokenizer, tmp_path / "q4", child_lineage(ckpt, {"kind": "test"}))
    x = torch.randn(3, q.in_features)
    # execute
    reference, fused = runtimes.load(out, kernels="reference"), runtimes.load(out, kernels="fused")
    prompt = TOKENS[0, :12].tolist()
    # assert: the module is W_q x + b; both kernels compute the same model
    assert torch.allclose(q(x), x @ q.dequantize().T + q.bias, atol=1e-6)
    assert np.allclose(reference.prefill(prompt), fused.prefill(prompt), atol=1e-4)
    assert np.allclose(reference.decode(5), fused.decode(5), atol=1e-4)
