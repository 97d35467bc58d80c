"""The canonical quantized representation: llama.cpp's rounding bit for bit, shapes, casts, errors,
the quantized token embedding (and a tied head reading it), and the int8 KV cache."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from torch import nn

from models.errors import EdgesmithError
from models.llama import ModelConfig, Transformer
from models.quant import (Int8KVAttention, QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead,
                          apply_quantization_meta_, check_scheme, dequantize, quantization_meta, quantize_embedding_,
                          quantize_linear_, quantize_rtn)


def _weights(out_f=48, in_f=256, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f) * 0.05
    w[0, :32] = 0.0                 # an all-zero group
    w[1, 7] = 0.4                   # a positive extreme
    w[2, 40] = -0.4                 # a negative extreme
    w[3, 64:96] = 0.1               # a constant group
    return w


@pytest.mark.parametrize("bits, qtype", [(4, GGMLQuantizationType.Q4_0), (8, GGMLQuantizationType.Q8_0)])
def test_rtn_codes_are_llama_cpp_blocks_bit_for_bit(bits, qtype):
    # setup
    w = _weights()
    # execute
    qweight, scales = quantize_rtn(w, bits, 32)
    ref = np.frombuffer(gguf_quantize(w.numpy(), qtype).tobytes(), dtype=np.uint8).reshape(-1, 2 + 32 * bits // 8)
    # assert: GGUF block = fp16 d, then codes (Q4_0: code + 8, low nibbles columns 0..15, high 16..31)
    d = scales.reshape(-1).numpy().view(np.uint8).reshape(-1, 2)
    codes = qweight.reshape(-1, 32).numpy()
    if bits == 4:
        q = (codes + 8).astype(np.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)
    else:
        packed = codes.view(np.uint8)
    assert np.array_equal(np.concatenate([d, packed], axis=1), ref)


@pytest.mark.parametrize("bits, lo, hi", [(4, -8, 7), (8, -127, 127)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_layout_range_and_error_bound(bits, lo, hi, group_size):
    # setup
    w = _weights()
    # execute
    qweight, scales = quantize_rtn(w, bits, group_size)
    deq = dequantize(qweight, scales)
    # assert
    assert qweight.dtype == torch.int8 and qweight.shape == w.shape
    assert scales.dtype == torch.float16 and scales.shape == (w.shape[0], w.shape[1] // group_size)
    assert lo <= int(qweight.min()) and int(qweight.max()) <= hi
    step = scales.float().abs().repeat_interleave(group_size, dim=1)
    # round to nearest: at most half a step off, plus the fp16 rounding of the scale (|code| <= 8 or 127).
    # 4 bits (Q4_0's rule): the extreme sits at -8, so a value of opposite sign near it clips to +7: one step.
    half = torch.where(qweight == hi, 1.0, 0.5) if bits == 4 else 0.5
    assert ((deq - w).abs() <= half * step + 8 * step * 2 ** -11 * (hi / 7) + 1e-7).all()
    assert (deq[0, :32] == 0).all()


@pytest.mark.parametrize("bits, lo, hi", [(4, -8, 7), (8, -127, 119)])
def test_xnnpack_target_scales_are_positive_bf16_exact_and_codes_fit_the_planes(bits, lo, hi):
    # setup
    w = _weights()
    # execute
    qweight, scales = quantize_rtn(w, bits, 32, target="xnnpack")
    deq = dequantize(qweight, scales)
    # assert: positive scales bf16 holds exactly (an all-zero group keeps scale 0), codes inside the planes' range
    s = scales.float()
    assert bool((s[0, 0] == 0) and (s.flatten()[1:] > 0).all())
    assert torch.equal(s.to(torch.bfloat16).float(), s)
    assert lo <= int(qweight.min()) and int(qweight.max()) <= hi
    # the extreme of a group lands on the most negative code when negative, on the most positive when positive
    assert int(qweight[2, 40]) == lo and int(qweight[1, 7]) == hi
    # round to nearest: at most half a step off (the scale is rounded up, never down); 4 bits as Q4_0's rule: a
    # value of opposite sign near a negative extreme clips to +7, one step
    step = s.repeat_interleave(32, dim=1)
    half = torch.where(qweight == hi, 1.0, 0.5) if bits == 4 else 0.5
    assert ((deq - w).abs() <= half * step + 1e-7).all()


def test_bad_target_names_allowed_values():
    from toolchain.compress.methods.rtn import RTN

    with pytest.raises(EdgesmithError, match="target='arm'.*allowed: any, xnnpack"):
        RTN(target="arm")


def test_forward_is_matmul_with_dequantized_weight_and_casts_keep_scales():
    # setup
    lin = nn.Linear(128, 64, bias=False)
    q = QuantizedLinear.from_float(lin, bits=4, group_size=32)
    x = torch.randn(3, 5, 128)
    # execute
    y = q(x)
    scales_before = q.scales.clone()
    q.to(torch.bfloat16)
    # assert
    torch.testing.assert_close(y, x @ q.dequantize().T)
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales_before)
    assert q.qweight.dtype == torch.int8
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_weight_larger_than_a_chunk_gives_the_whole_matmul(dtype, monkeypatch):
    # setup: 5 rows per chunk over 23 rows (a short last chunk), with a bias
    import models.quant as quant

    monkeypatch.setattr(quant, "CHUNK", 5 * 64)
    lin = nn.Linear(64, 23, bias=True)
    q = QuantizedLinear.from_float(lin, bits=8, group_size=32).to(dtype)
    x = torch.randn(2, 7, 64, dtype=dtype)
    # execute
    y = q(x)
    # assert
    whole = torch.nn.functional.linear(x, q.dequantize(dtype), q.bias.to(dtype))
    torch.testing.assert_close(y, whole)  # up to the summation order of a narrower matmul


@pytest.mark.parametrize("bits, group_size, message", [
    (3, 32, "bits=3 is not allowed; allowed: 4, 5, 8"),
    (4, 16, "group_size=16 is not allowed; allowed: 32, 64, 128"),
    (True, 32, "allowed: 4, 5, 8"),
])
def test_bad_scheme_names_allowed_values(bits, group_size, message):
    with pytest.raises(EdgesmithError, match=message):
        check_scheme(bits, group_size)


def test_group_size_not_dividing_names_the_layer():
    with pytest.raises(EdgesmithError, match=r"layer layers\.0\.mlp\.down_proj: group_size=128 does not divide .* 96"):
        check_scheme(4, 128, 96, "layers.0.mlp.down_proj")


def test_from_codes_rejects_out_of_range_codes():
    with pytest.raises(EdgesmithError, match=r"int8 codes in \[-8, 7\]"):
        QuantizedLinear.from_codes(torch.full((4, 32), 9, dtype=torch.int8), torch.ones(4, 1), 4, 32)


def test_quantize_linear_swaps_all_but_a_tied_head_and_meta_rebuilds_it(tiny_config):
    # setup
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_config.to_dict(), "tie_embeddings": True})
    model = Transformer(cfg).eval()
    # execute
    done = quantize_linear_(model, bits=8, group_size=32)
    meta = quantization_meta(model)
    fresh = apply_quantization_meta_(Transformer(cfg), meta)
    fresh.load_state_dict(model.state_dict())
    # assert
    assert "lm_head" not in done and len(done) == 7 * cfg.n_layers
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed_tokens.weight
    assert meta["weights"]["model.layers.0.self_attn.q_proj"] == {"bits": 8, "group_size": 32, "act_bits": None}
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    assert torch.equal(fresh.eval()(tokens), model(tokens))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_gathers_rows_without_dequantizing_the_table(bits, monkeypatch):
    # setup: an embedding table with llama.cpp's edge cases in its rows
    emb = nn.Embedding(48, 256)
    emb.weight.data.copy_(_weights())
    q = QuantizedEmbedding.from_float(emb, bits, 32)
    ids = torch.tensor([[0, 1, 2, 3, 47, 1]])
    table = q.dequantize()
    monkeypatch.setattr("models.quant.dequantize", lambda *a: pytest.fail("forward dequantized the whole table"))
    # execute
    out = q(ids)
    # assert: the RTN codes (llama.cpp's Q4_0 / Q8_0 rule, rows = tokens), rows looked up exactly
    codes, scales = quantize_rtn(emb.weight, bits, 32)
    assert torch.equal(q.qweight, codes) and torch.equal(q.scales, scales)
    assert out.shape == (1, 6, 256) and torch.equal(out, table[ids])


def test_quantized_embedding_follows_casts_but_keeps_codes_and_scales():
    # setup
    q = QuantizedEmbedding.from_float(nn.Embedding(16, 64), 4, 32)
    scales = q.scales.clone()
    ids = torch.tensor([[3, 9]])
    # execute
    q.to(torch.bfloat16)
    # assert
    assert q(ids).dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales) and q.qweight.dtype == torch.int8
    torch.testing.assert_close(q(ids), q.dequantize(torch.bfloat16)[ids], rtol=0, atol=0)


def test_tied_model_reads_the_quantized_table_and_round_trips(tiny_config, tokenizer, tmp_path):
    # setup
    from safetensors import safe_open

    from models.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    cfg = ModelConfig(**{**tiny_config.to_dict(), "tie_embeddings": True})
    model = Transformer(cfg).eval()
    # execute
    done = quantize_embedding_(model, bits=4, group_size=32) + quantize_linear_(model, bits=8, group_size=32)
    out = save_checkpoint(model, tokenizer, tmp_path / "tied", {"parent": None, "passes": []})
    back = load_checkpoint(out).model
    # assert: the head is the table (llama.cpp's tied output = token_embd), stored once, rebuilt tied
    assert done[0] == "embed_tokens" and "lm_head" not in done
    assert isinstance(model.lm_head, TiedQuantizedHead) and model.lm_head.qweight is model.embed_tokens.qweight
    assert isinstance(back.lm_head, TiedQuantizedHead) and back.lm_head.table is back.embed_tokens
    assert quantization_meta(back)["weights"]["lm_head"] == {"bits": 4, "group_size": 32, "act_bits": None,
                                                             "tied_to": "model.embed_tokens"}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.qweight").dtype == torch.int8
        assert not [k for k in f.keys() if k.startswith("lm_head")]
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    h = model.norm(torch.randn(1, 12, cfg.dim))
    torch.testing.assert_close(model.lm_head(h), h @ model.embed_tokens.dequantize().T, rtol=0, atol=0)
    assert torch.equal(back(tokens), model(tokens))


def test_int8_kv_cache_decode_matches_full_forward(tiny_model):
    # setup: fake-quantized K/V without a cache must equal what the int8 cache stores and returns
    for layer in tiny_model.layers:
        attn = layer.self_attn
        layer.self_attn = Int8KVAttention(attn, torch.full((attn.n_kv_heads,), 0.01), torch.full((attn.n_kv_heads,), 0.01))
    tokens = torch.randint(0, 320, (1, 10))
    # execute
    full = tiny_model(tokens)
    tiny_model.setup_cache(1, 32)
    cache = tiny_model.layers[0].self_attn.kv_cache
    prefill = tiny_model(tokens[:, :6], torch.arange(6))
    steps = [tiny_model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(6, 10)]
    # assert
    assert cache.k_cache.dtype == torch.int8 and cache.k_cache.shape == (1, 2, 32, 16)
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
