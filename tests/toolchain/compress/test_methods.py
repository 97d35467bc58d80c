"""Every method x bits on the briefly trained nano model: an SQNR floor per layer, GPTQ and AWQ beat
RTN at 4 bits, the token embedding (round to nearest whatever the method, chosen by the same rules),
and bad input is one clear line.

SQNR floors (dB, every attribution layer's output against the float model on calibration tokens).
A b-bit symmetric quantizer whose step is set by a group's largest |w| gives a weight SQNR of about
6.02 b - 5 dB for near-Gaussian weights (19 dB at 4 bits, 43 dB at 8); a layer's output inherits
about that, and errors of earlier layers add up with depth (4 blocks here). So the floors are that
figure less a margin for accumulation: 4-bit weights (rtn, gptq, awq, smoothquant W4A8) 18 dB;
8-bit weights (rtn, gptq, awq) 38 dB; SmoothQuant W8A8 also quantizes every activation per token
to int8 (a second ~43 dB noise source), 35 dB; kv_int8 quantizes K and V with one static scale per
head (int8, ~43 dB on the cached values, diluted by the softmax average), 38 dB.
"""

import copy

import pytest
import torch

from models.errors import EdgesmithError
from models.quant import QuantizedEmbedding, QuantizedLinear, TiedQuantizedHead
from toolchain.compress import Context, apply, calibration_tokens, parse_pass
from toolchain.compress.quality import compare, layer_sqnr

FLOOR_DB = {("rtn", 4): 18, ("gptq", 4): 18, ("awq", 4): 18, ("smoothquant", 4): 18,
            ("rtn", 8): 38, ("gptq", 8): 38, ("awq", 8): 38, ("smoothquant", 8): 35, ("kv_int8", None): 38}


def _quantized(trained, spec: str):
    model = copy.deepcopy(trained.model)
    ctx = Context(tokenizer=trained.tokenizer, calibration=trained.calib, reference=trained.model)
    return apply(model, parse_pass(spec), ctx), ctx


@pytest.mark.parametrize("method, bits", list(FLOOR_DB))
def test_every_method_and_bits_clears_its_sqnr_floor(trained, method, bits):
    # setup
    spec = f"quantize:method={method}" + (f",bits={bits},group_size=32" if bits else "")
    # execute
    model, ctx = _quantized(trained, spec)
    db = layer_sqnr(model, trained.model, trained.calib)
    # assert
    assert min(db.values()) > FLOOR_DB[(method, bits)], db
    if bits:
        q = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(q) == 7 * 4 + 1 and all(m.bits == bits for m in q)
        assert all(m.act_bits == (8 if method == "smoothquant" else None) for m in q)
        assert isinstance(model.embed_tokens, QuantizedEmbedding) and model.embed_tokens.bits == bits
        assert "embed_tokens" in db and ctx.report["layers"]["embed_tokens"] == bits
    else:
        assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def test_gptq_act_order_runs_and_keeps_contiguous_groups(trained):
    model, _ = _quantized(trained, "quantize:method=gptq,bits=4,act_order=true")
    assert min(layer_sqnr(model, trained.model, trained.calib).values()) > FLOOR_DB[("gptq", 4)]
    assert model.layers[0].mlp.down_proj.scales.shape == (128, 384 // 32)


def test_gptq_and_awq_beat_rtn_on_kl_at_4_bits(trained):
    # setup: fixed seeds (fixture training seed 0, calibration seed 0), same validation tokens
    torch.manual_seed(0)
    kl = {}
    # execute
    for method in ("rtn", "gptq", "awq"):
        model, _ = _quantized(trained, f"quantize:method={method},bits=4,group_size=32")
        kl[method] = compare(model, trained.model, trained.val, 128, max_tokens=4096)["kl"]
    # assert
    assert kl["gptq"] < kl["rtn"] and kl["awq"] < kl["rtn"], kl


def test_rule_keeps_layers_float_or_at_other_bits(trained):
    model = copy.deepcopy(trained.model)
    cfg = parse_pass("quantize:method=gptq,bits=4", [("lm_head", 8), (r"layers\.0\..*", "skip")])
    apply(model, cfg, Context(calibration=trained.calib))
    assert model.lm_head.bits == 8 and model.layers[1].mlp.up_proj.bits == 4
    assert type(model.layers[0].mlp.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("method, rules, expected", [
    # the default ".*" includes the embedding, as llama.cpp's Q4_0 does, and every method uses RTN codes
    *[(method, [], 4) for method in ("rtn", "gptq", "awq", "smoothquant")],
    ("gptq", [("embed_tokens", "skip")], None),         # opt out
    ("awq", [("embed_tokens", 8), (".*", 4)], 8),       # first match wins
    ("rtn", [(r"layers\..*", 8)], 4),                   # a rule for other layers leaves it at the default
])
def test_rules_select_the_embedding_and_every_method_uses_rtn_codes(trained, method, rules, expected):
    # setup
    model = copy.deepcopy(trained.model)
    cfg = parse_pass(f"quantize:method={method},bits=4,group_size=32,n_calib=4", rules)
    ctx = Context(calibration=trained.calib)
    # execute
    apply(model, cfg, ctx)
    # assert: round to nearest of the float table at the rule's bits (GPTQ / AWQ have no activations here)
    assert ctx.report["layers"]["embed_tokens"] == expected
    if expected is None:
        assert type(model.embed_tokens) is torch.nn.Embedding
        return
    rtn = QuantizedEmbedding.from_float(trained.model.embed_tokens, expected, 32)
    assert torch.equal(model.embed_tokens.qweight, rtn.qweight) and torch.equal(model.embed_tokens.scales, rtn.scales)


def test_tied_head_reads_the_quantized_table(trained):
    # setup: the nano shape with tied embeddings
    from models.llama import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**trained.model.config.to_dict(), "tie_embeddings": True})).eval()
    ctx = Context(calibration=trained.calib)
    # execute
    with pytest.warns(UserWarning, match="rule 'lm_head' matches no layer"):
        apply(model, parse_pass("quantize:method=gptq,bits=4,n_calib=4", [("lm_head", 8)]), ctx)
    # assert: one table for both; the head's own rule cannot apply to a tied head, and says so
    assert isinstance(model.lm_head, TiedQuantizedHead) and model.lm_head.qweight is model.embed_tokens.qweight
    assert "lm_head: tied to embed_tokens, reads its 4-bit table" in ctx.report["warnings"]
    assert "rule 'lm_head' matches no layer" in ctx.report["warnings"]


@pytest.mark.parametrize("spec, message", [
    ("quantize:method=awq,bits=2", "bits=2 is not allowed; allowed: 4, 5, 8"),
    ("quantize:method=gptq,group_size=256", "group_size=256 is not allowed; allowed: 32, 64, 128"),
    ("quantize:method=gptq,act_order=1", "act_order=1; allowed: true, false"),
    ("quantize:method=smoothquant,alpha=1.5", "alpha=1.5 must be in [0, 1]"),
    ("quantize:bits=4", "missing method=; allowed: awq, gptq, kv_int8, rtn, smoothquant"),
])
def test_bad_config_is_one_clear_line(spec, message):
    with pytest.raises(EdgesmithError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_pass(spec)


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "kv_int8"])
def test_calibration_set_too_small(trained, method):
    ctx = Context(calibration=trained.calib[:3])
    with pytest.raises(EdgesmithError, match=f"calibration set too small: {method} needs n_calib=16 sequences "
                                             "from the train split, got 3"):
        apply(copy.deepcopy(trained.model), parse_pass(f"quantize:method={method}"), ctx)


def test_calibration_from_a_train_split_too_short(trained):
    with pytest.raises(EdgesmithError, match="calibration set too small: 64 sequences of 128 tokens need 8193 "
                                             "train tokens, the train split has 1000"):
        calibration_tokens(trained.train[:1000], 64, 128)


def test_group_size_not_dividing_a_layer_names_it(trained):
    from models.llama import ModelConfig, Transformer
    model = Transformer(ModelConfig(vocab_size=64, dim=128, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96))
    with pytest.raises(EdgesmithError, match=r"layer layers\.0\.mlp\.down_proj: group_size=64 does not divide "
                                             "its in_features 96"):
        apply(model, parse_pass("quantize:method=rtn,bits=4,group_size=64"), Context())
