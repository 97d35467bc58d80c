"""The planner's figures, exact where the issue fixes them, and its bounds against published ones."""

import json

import pytest

from devices.planner import (bytes_per_weight, format_plan, kv_cache_bytes, linear_read_bytes, param_count,
                             plan)
from devices.profiles import load_profile
from devices.shapes import PUBLIC, resolve_model
from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from models.llama import ModelConfig


def test_llama2_7b_kv_cache_and_weights():
    # setup
    cfg = PUBLIC["llama-2-7b"]
    # execute
    p = plan("x86-desktop", "llama-2-7b", context=4096, bits=16)
    # assert: 2 x 32 layers x 32 kv heads x 128 x 2 bytes x 4096 tokens, batch 1
    assert (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim) == (32, 32, 128)
    assert kv_cache_bytes(cfg, 4096, 2) == 2_147_483_648
    assert p.kv_bytes == 2_147_483_648
    assert param_count(cfg) == 6_738_415_616  # the published Llama-2-7B count
    assert p.weight_bytes == 2 * 6_738_415_616  # ~13.5 GB, "about 14 GB" at fp16
    assert 13.4e9 < p.weight_bytes < 14.0e9
    assert p.total_bytes == p.weight_bytes + p.kv_bytes + p.overhead_bytes
    assert p.fits  # 32 GB desktop at 80 %


def test_gqa_and_public_parameter_counts():
    assert kv_cache_bytes(PUBLIC["llama-3.1-8b"], 4096, 2) == 2 * 32 * 8 * 128 * 2 * 4096
    assert round(param_count(PUBLIC["llama-3.1-8b"]) / 1e9, 2) == 8.03
    assert round(param_count(PUBLIC["llama-3.2-1b"]) / 1e9, 2) == 1.24  # tied head counted once
    assert round(param_count(PUBLIC["llama-3.2-3b"]) / 1e9, 2) == 3.21
    assert round(param_count(PUBLIC["tinyllama-1.1b"]) / 1e9, 2) == 1.10
    # the families' model cards: 0.49B (Qwen2.5-0.5B), 0.6B (Qwen3-0.6B), 135M (SmolLM2-135M), tied heads
    assert round(param_count(PUBLIC["qwen2.5-0.5b"]) / 1e9, 2) == 0.49
    assert round(param_count(PUBLIC["qwen3-0.6b"]) / 1e9, 1) == 0.6
    assert round(param_count(PUBLIC["smollm2-135m"]) / 1e6) == 135
    assert kv_cache_bytes(PUBLIC["qwen3-0.6b"], 4096, 2) == 2 * 28 * 8 * 128 * 2 * 4096  # head_dim 128, not 64


def test_a_sliding_layer_keeps_only_its_window_in_the_plan():
    # setup: Gemma-3-270M, 15 of 18 layers on a 512-token window; Mistral-7B, every layer on 4096
    gemma, mistral = PUBLIC["gemma-3-270m"], PUBLIC["mistral-7b"]
    # execute
    p = plan("pixel-8", "gemma-3-270m", context=32768, bits=4)
    # assert: full layers hold the context, sliding ones their window (llama.cpp's and our ExecuTorch ring's cache)
    assert kv_cache_bytes(gemma, 32768, 2) == 2 * 1 * 256 * 2 * (3 * 32768 + 15 * 512)
    assert kv_cache_bytes(gemma, 300, 2) == 2 * 1 * 256 * 2 * 18 * 300  # shorter than the window: every layer alike
    assert kv_cache_bytes(mistral, 32768, 2) == kv_cache_bytes(mistral, 4096, 2) == 2 * 32 * 8 * 128 * 2 * 4096
    assert p.kv_bytes == kv_cache_bytes(gemma, 32768, 2) and p.window_layers == 15
    assert p.max_context == 32768  # the whole context fits a phone's budget once the window layers stop growing
    assert "(15 sliding layers keep their window in executorch)" in format_plan(p)
    # llama.cpp's llama architecture (a Raspberry Pi prefers GGUF) attends to Mistral's whole context: all of it
    pi = plan("raspberry-pi-5", "mistral-7b", context=32768, bits=4)
    assert pi.kv_bytes == kv_cache_bytes(mistral, 32768, 2, windows=False) == 2 * 32 * 8 * 128 * 2 * 32768
    assert not pi.fits and "(32 sliding layers hold the whole context in gguf)" in format_plan(pi)


def test_decode_bound_is_bandwidth_over_bytes_read():
    # setup
    prof = load_profile("raspberry-pi-5")
    cfg = ModelConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=512)
    linears = 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512) + 1024 * 256
    # execute
    p = plan(prof, cfg, context=100, bits=8)
    # assert: int8 weights cost 1 + 2/32 bytes; the fp16 KV cache is read whole
    assert bytes_per_weight(8) == 1 + 2 / 32
    assert p.bytes_per_token == pytest.approx(linears * (1 + 2 / 32) + 2 * 2 * 2 * 64 * 2 * 100)
    assert p.decode_tok_s_bound == pytest.approx(17.07e9 / p.bytes_per_token)
    assert p.recommended_format == "gguf" and p.precision == "int8"


def test_max_context_is_the_largest_that_fits():
    # setup: a model whose cache, not its max_seq_len, limits the context on a Pi
    cfg = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      max_seq_len=1 << 20)
    # execute
    p = plan("raspberry-pi-5", cfg, context=1024, bits=4)
    at, over = plan("raspberry-pi-5", cfg, context=p.max_context, bits=4), plan("raspberry-pi-5", cfg,
                                                                              context=p.max_context + 1, bits=4)
    # assert
    assert 1024 < p.max_context < cfg.max_seq_len
    assert at.fits and not over.fits


def test_quantized_checkpoint_keeps_its_scheme(checkpoints):
    spec = resolve_model(checkpoints["q4"])
    p = plan("pixel-8", checkpoints["q4"], context=64)
    assert p.precision == "int4"
    assert p.bytes_per_token == pytest.approx(linear_read_bytes(spec, None) + kv_cache_bytes(spec.config, 64))
    assert linear_read_bytes(spec, None) == pytest.approx(linear_read_bytes(spec, 4))


def test_too_big_does_not_fit_and_recommends_smallest():
    p = plan("raspberry-pi-5", "llama-3.1-8b", context=131072)
    assert not p.fits and p.recommended_precision == "int4"


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 6}, r"--bits 6; allowed: 32, 16, 8, 5, 4"),
    ({"context": 0}, r"--context 0 must be a positive integer"),
])
def test_bad_arguments_one_line(kwargs, match):
    with pytest.raises(EdgesmithError, match=match) as e:
        plan("pixel-8", "nano", **kwargs)
    assert "\n" not in str(e.value)


def test_unknown_model_lists_known_shapes():
    with pytest.raises(EdgesmithError, match="known shapes: nano, micro, small, llama-2-7b"):
        plan("pixel-8", "gpt-5")


# (device, model, bits for Linears, lm_head bits, context, published tok/s) — scripts/bench_devices.py
PUBLISHED = [
    ("raspberry-pi-5", "tinyllama-1.1b", 8, None, 128, 9.0),  # llama.cpp Q8_0
    ("jetson-orin-nano", "llama-3.2-3b", 4, None, 128, 43.1),  # MLC INT4, Super mode
    ("jetson-orin-nano", "llama-3.1-8b", 4, None, 128, 19.1),
    ("oneplus-12", "llama-3.2-1b", 4, 8, 64, 50.2),  # ExecuTorch SpinQuant (8-bit head)
]


@pytest.mark.parametrize("device, model, bits, head_bits, context, published", PUBLISHED)
def test_bound_never_below_a_published_figure(device, model, bits, head_bits, context, published):
    prof, spec = load_profile(device), resolve_model(model)
    read = linear_read_bytes(spec, bits, head_bits) + kv_cache_bytes(spec.config, context)
    assert prof.bandwidth_bytes_s / read > published


def test_five_bit_codes_count_as_the_artifact_holds_them(checkpoints, tmp_path):
    # setup: a manifest whose format holds 5-bit codes as 8-bit (ONNX, ExecuTorch) and one that stores them (GGUF)
    cfg = load_checkpoint(checkpoints["float"]).config.to_dict()
    weights = {"model.layers.0.mlp.down_proj": {"bits": 5, "group_size": 32, "act_bits": None}}
    for name, held in (("gguf", {}), ("onnx", {"model.layers.0.mlp.down_proj": 8})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({
            "format": name, "model": cfg, "precision": "fp32",
            "quantization": {"weights": weights, **({"held_bits": held} if held else {})}}))
    # execute
    gguf, onnx = resolve_model(tmp_path / "gguf"), resolve_model(tmp_path / "onnx")
    # assert: Q5_0's 5.5 bits per weight where the format stores them, 8.5 where it holds them as 8-bit codes
    assert bytes_per_weight(5) == pytest.approx(5 / 8 + 2 / 32)
    assert gguf.quantized["model.layers.0.mlp.down_proj"]["bits"] == 5
    assert onnx.quantized["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert linear_read_bytes(onnx, None) - linear_read_bytes(gguf, None) == pytest.approx(
        3 / 8 * cfg["ffn_dim"] * cfg["dim"])
