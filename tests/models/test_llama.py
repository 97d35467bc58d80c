import dataclasses

import pytest
import torch

from models.errors import EdgesmithError
from models.llama import SIZES, ModelConfig, Transformer, config_for


@pytest.mark.parametrize("changes, message", [
    ({"dim": 100}, "ModelConfig.dim: 100 is not a multiple of 32"),
    ({"ffn_dim": 200}, "ModelConfig.ffn_dim: 200 is not a multiple of 32"),
    ({"n_heads": 3}, "ModelConfig.n_heads: 3 does not divide dim 128; allowed: 1, 2, 4, 8, 16, 32, 64, 128"),
    ({"n_kv_heads": 3}, "ModelConfig.n_kv_heads: 3 does not divide n_heads 4; allowed: 1, 2, 4"),
    ({"n_layers": 0}, "ModelConfig.n_layers: 0 must be a positive integer"),
    ({"vocab_size": 1.5}, "ModelConfig.vocab_size: 1.5 must be a positive integer"),
    ({"rope_theta": -1.0}, "ModelConfig.rope_theta"),
])
def test_config_validation_names_the_field(changes, message):
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(")):
        dataclasses.replace(SIZES["nano"], **changes)


def test_named_sizes():
    assert config_for("nano").dim == 128
    with pytest.raises(EdgesmithError, match="unknown model size 'huge'; allowed: nano, micro, small"):
        config_for("huge")
    params = {name: Transformer(cfg).num_params() for name, cfg in SIZES.items() if name != "small"}
    assert 1.0e6 < params["nano"] < 1.5e6
    assert 5.5e6 < params["micro"] < 7.5e6


def test_config_dict_round_trip():
    cfg = SIZES["micro"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(EdgesmithError, match="unknown ModelConfig field 'depth'"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})


@pytest.mark.parametrize("prefill_len", [1, 5, 16])
@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_plus_decode_equals_full_forward(tiny_model, prefill_len, batch):
    # setup
    T = 24
    tokens = torch.randint(0, tiny_model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(1))
    tiny_model.setup_cache(batch, 32)
    # execute
    with torch.no_grad():
        full = tiny_model(tokens)
        steps = [tiny_model(tokens[:, :prefill_len], torch.arange(prefill_len))]
        for pos in range(prefill_len, T):
            steps.append(tiny_model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    # assert
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5


def test_chunked_prefill_and_reset(tiny_model):
    tokens = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(2))
    tiny_model.setup_cache(1, 20)
    with torch.no_grad():
        full = tiny_model(tokens)
        a = tiny_model(tokens[:, :12], torch.arange(12))
        b = tiny_model(tokens[:, 12:], torch.arange(12, 20))
        assert (torch.cat([a, b], 1) - full).abs().max().item() <= 1e-5
        # Overwrite the cache with another sequence, reset, and decode must not see the stale keys.
        tiny_model(torch.randint(0, 320, (1, 20)), torch.arange(20))
        tiny_model.reset_cache()
        assert all(l.self_attn.kv_cache.k_cache.abs().sum() == 0 for l in tiny_model.layers)
        again = tiny_model(tokens[:, :12], torch.arange(12))
    assert torch.equal(again, a)


def test_cache_is_static(tiny_model):
    tiny_model.setup_cache(2, 16)
    cache = tiny_model.layers[0].self_attn.kv_cache
    ptr, shape = cache.k_cache.data_ptr(), tuple(cache.k_cache.shape)
    with torch.no_grad():
        tiny_model(torch.zeros(2, 4, dtype=torch.long), torch.arange(4))
        tiny_model(torch.zeros(2, 1, dtype=torch.long), torch.tensor([4]))
    assert shape == (2, 2, 16, 16) and cache.k_cache.data_ptr() == ptr
    assert "layers.0.self_attn.kv_cache.k_cache" not in tiny_model.state_dict()


def test_forward_errors(tiny_model):
    with pytest.raises(EdgesmithError, match="call setup_cache"):
        tiny_model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with pytest.raises(EdgesmithError, match="exceeds max_seq_len 128"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(EdgesmithError, match="exceeds the model's max_seq_len"):
        tiny_model.setup_cache(1, 256)


def test_tied_embeddings_share_one_tensor(tiny_config):
    model = Transformer(dataclasses.replace(tiny_config, tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = Transformer(tiny_config).num_params()
    assert untied - model.num_params() == tiny_config.vocab_size * tiny_config.dim


def _cached_logits(model, tokens, prefill_len):
    model.setup_cache(1, 32)
    with torch.inference_mode():
        steps = [model(tokens[:, :prefill_len], torch.arange(prefill_len))]
        steps += [model(tokens[:, p:p + 1], torch.tensor([p])) for p in range(prefill_len, tokens.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("prefill_len", [1, 7])
def test_eager_attention_reads_the_live_cache_with_the_traced_paths_numbers(tiny_model, monkeypatch, prefill_len):
    # setup: 32 positions, the cache filled to its last slot; GQA (4 query heads over 2 KV heads)
    tokens = torch.randint(0, 320, (1, 32), generator=torch.Generator().manual_seed(3))
    # execute: eager (live prefix, SDPA's GQA), then the path traced graphs take (whole cache, repeated K/V)
    eager = _cached_logits(tiny_model, tokens, prefill_len)
    monkeypatch.setattr("models.kv_cache.traced", lambda: True)
    monkeypatch.setattr("models.llama.traced", lambda: True)
    whole = _cached_logits(tiny_model, tokens, prefill_len)
    # assert: the same logits at every position, first and last slot included
    torch.testing.assert_close(eager, whole, rtol=1e-5, atol=1e-5)


def test_eager_cache_read_is_a_view_of_the_live_prefix(tiny_model):
    # setup
    tiny_model.setup_cache(1, 16)
    cache = tiny_model.layers[0].self_attn.kv_cache
    ptr = cache.k_cache.data_ptr()
    k = torch.randn(1, 2, 3, 16)
    # execute: a prefill of 3 at 0..2, then one token at 3
    with torch.inference_mode():
        k3, _ = cache.update(torch.arange(3), k, k)
        k4, v4 = cache.update(torch.tensor([3]), k[:, :, :1], k[:, :, :1])
    # assert: written in place, read back as views of the buffers (no copy, no concatenation)
    assert k3.shape == (1, 2, 3, 16) and k4.shape == v4.shape == (1, 2, 4, 16)
    assert k4.data_ptr() == cache.k_cache.data_ptr() == ptr and v4.data_ptr() == cache.v_cache.data_ptr()
    assert torch.equal(cache.k_cache[:, :, 3], k[:, :, 0]) and cache.k_cache[:, :, 4:].abs().sum() == 0
