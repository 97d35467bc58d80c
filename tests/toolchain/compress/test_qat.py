"""The qat pass: fake quantization with the canonical Q4_0 / Q8_0 rounding and a straight-through
gradient, whose final quantization adds no error."""

import copy

import pytest
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.quant import QuantizedLinear, quantize_rtn, replace_module_
from toolchain.compress import Context, apply, parse_pass
from toolchain.compress.passes.qat import FakeQuantLinear
from toolchain.train.trainer import TrainConfig, train

SHORT = "steps=8,batch_size=4,seq_len=64,eval_tokens=2048"


def context(trained):
    return Context(tokenizer=trained.tokenizer, calibration=trained.calib, reference=trained.model,
                   train_tokens=trained.train, val_tokens=trained.val)


def test_fake_quant_forward_is_the_canonical_rounding_and_the_gradient_passes_straight_through(trained):
    # setup
    lin = copy.deepcopy(trained.model.layers[0].mlp.up_proj)
    fq = FakeQuantLinear(lin, 4, 32)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    # execute
    y = fq(x)
    y.pow(2).sum().backward()
    # assert: forward equals QuantizedLinear's, backward is that of a Linear holding the rounded weight
    assert torch.equal(y, QuantizedLinear.from_float(lin, 4, 32)(x))
    w = QuantizedLinear.from_float(lin, 4, 32).dequantize().requires_grad_(True)
    torch.nn.functional.linear(x, w).pow(2).sum().backward()
    assert torch.allclose(fq.weight.grad, w.grad)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_after_fake_quant_training_gives_its_codes_with_zero_added_error(trained, bits):
    # setup: fake-quant every block Linear and train a few steps through the trainer
    model = copy.deepcopy(trained.model)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("layers.")]
    for n in names:
        replace_module_(model, n, FakeQuantLinear(model.get_submodule(n), bits, 32))
    torch.manual_seed(0)
    model, _ = train(model, trained.train, None, TrainConfig(steps=5, batch_size=4, seq_len=64, lr=1e-3, warmup=1),
                     progress=False)
    x = trained.calib[:2, :64]
    with torch.no_grad():
        fake_logits = model(x)
    fake_codes = {n: quantize_rtn(model.get_submodule(n).weight, bits, 32) for n in names}
    # execute: hand the latent float weights to the quantize pass (round to nearest; the embedding and
    # head, not fake-quantized here, stay float)
    for n in names:
        fq = model.get_submodule(n)
        latent = nn.Linear(fq.in_features, fq.out_features, bias=False)
        latent.weight = nn.Parameter(fq.weight.detach().clone())
        replace_module_(model, n, latent)
    keep_float = [("embed_tokens", "skip"), ("lm_head", "skip")]
    apply(model, parse_pass(f"quantize:method=rtn,bits={bits}", keep_float), Context())
    # assert: the same codes and scales, and bit-identical logits
    for n in names:
        q = model.get_submodule(n)
        assert torch.equal(q.qweight, fake_codes[n][0]) and torch.equal(q.scales, fake_codes[n][1]), n
    with torch.no_grad():
        assert torch.equal(model(x), fake_logits)


def test_qat_pass_writes_quantized_checkpoint_that_exports_exactly(trained, tmp_path):
    from toolchain.export import ExportConfig, export

    # execute
    ctx = context(trained)
    model = apply(copy.deepcopy(trained.model), parse_pass(f"qat:bits=4,{SHORT}", rules=[("lm_head", 8)]), ctx)
    # assert: every Linear is canonical 4-bit (lm_head 8-bit), the pass measured zero added error
    r = ctx.report
    assert r["codes_identical"] is True and r["added_error_max_abs_logit"] == 0.0
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    assert all(m.bits == 4 for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head")
    assert not any(type(m) in (nn.Linear, nn.Embedding) or isinstance(m, FakeQuantLinear) for m in model.modules())
    assert set(r["perplexity"]) == {"float", "rtn", "qat"} and r["train"]["steps"] == 8
    # a later quantize pass has nothing left to change
    x = trained.calib[:2, :32]
    with torch.no_grad():
        before = model(x)
        apply(model, parse_pass("quantize:method=rtn,bits=4"), Context())
        assert torch.equal(model(x), before)
    # the checkpoint round-trips and its codes go into GGUF Q4_0 / Q8_0 block for block
    path = save_checkpoint(model, trained.tokenizer, tmp_path / "qat", {"parent": None, "passes": []})
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).model(x), before)
    m = export(path, tmp_path / "gguf", ExportConfig(format="gguf", max_seq_len=64))
    assert m["parity"]["passed"] and set(m["options"]["tensor_types"]) >= {"Q4_0", "Q8_0"}


def test_qat_keeps_the_zeros_of_a_pruned_model(trained):
    # setup
    ctx = context(trained)
    model = apply(copy.deepcopy(trained.model), parse_pass("prune:method=2:4"), ctx)
    zeros = {n: m.weight.detach() == 0 for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith("layers.")}
    # execute
    model = apply(model, parse_pass(f"qat:bits=8,{SHORT}"), ctx)
    # assert: a pruned weight stays exactly zero, as a code
    for n, z in zeros.items():
        assert bool((model.get_submodule(n).qweight[z] == 0).all()), n


@pytest.mark.parametrize("spec, rules, message", [
    ("qat:bits=3", [], "bits=3 is not allowed; allowed: 4, 5, 8"),
    ("qat:group_size=48", [], "group_size=48 is not allowed; allowed: 32, 64, 128"),
    ("qat:steps=0", [], "qat: steps=0 must be an integer >= 1"),
    ("qat:keep_zeros=maybe", [], "qat: keep_zeros='maybe'; allowed: true, false"),
])
def test_bad_config_is_one_clear_error(spec, rules, message):
    with pytest.raises(EdgesmithError, match=message):
        parse_pass(spec, rules)


def test_rules_that_skip_everything_are_a_clear_error(trained):
    with pytest.raises(EdgesmithError, match="qat: nothing float to quantize"):
        apply(copy.deepcopy(trained.model), parse_pass(f"qat:{SHORT}", rules=[(".*", "skip")]), context(trained))


def test_tied_head_trains_through_the_quantized_table(tiny_config, tokenizer, trained):
    import dataclasses

    from models.llama import Transformer
    from models.quant import QuantizedEmbedding, TiedQuantizedHead

    # setup: a tied model on the shared tokenizer's vocabulary
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(tiny_config, vocab_size=512, tie_embeddings=True))
    ctx = Context(calibration=trained.calib[:2, :32], train_tokens=trained.train, val_tokens=trained.val)
    # execute
    model = apply(model, parse_pass("qat:bits=8,steps=3,batch_size=4,seq_len=32,eval_tokens=1024"), ctx)
    # assert: the table is quantized once, the head reads it, and quantizing added no error
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and isinstance(model.lm_head, TiedQuantizedHead)
    assert ctx.report["codes_identical"] and ctx.report["added_error_max_abs_logit"] == 0.0
