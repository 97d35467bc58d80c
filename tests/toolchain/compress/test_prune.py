"""The prune pass: unstructured masks (magnitude, 2:4) and structured removal (heads, channels, layers)
that writes a smaller config every consumer accepts."""

import copy
import json

import pytest
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from edgesmith.cli import main
from toolchain.compress import Context, apply, parse_pass

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def float_ckpt(trained, tmp_path_factory):
    return save_checkpoint(trained.model, trained.tokenizer, tmp_path_factory.mktemp("ck") / "float",
                           {"parent": None, "passes": []})


def pruned(trained, spec):
    ctx = Context(tokenizer=trained.tokenizer, calibration=trained.calib)
    model = apply(copy.deepcopy(trained.model), parse_pass(spec), ctx)
    return model, ctx.report


def block_weights(model):
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] in BLOCK_LINEARS}


def test_two_four_pattern_holds_on_every_group_of_four(trained):
    # execute
    model, report = pruned(trained, "prune:method=2:4")
    # assert: in every group of 4 consecutive input weights at most 2 are nonzero, and they are the 2 largest
    before = block_weights(trained.model)
    for name, w in block_weights(model).items():
        groups = w.reshape(w.shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2, name
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
        orig = before[name].abs().reshape(groups.shape)
        kept_min = torch.where(groups != 0, orig, torch.inf).min(-1).values
        dropped_max = torch.where(groups == 0, orig, -torch.inf).max(-1).values
        assert bool((kept_min >= dropped_max).all()), name
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # not a target
    assert report["sparsity"]["share"] == pytest.approx(0.5, abs=1e-3)
    assert "TensorRT" in report["note"] and "no faster" in report["note"]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_removes_the_smallest_weights_at_the_ratio(trained, scope):
    # execute
    model, report = pruned(trained, f"prune:method=magnitude,ratio=0.3,scope={scope}")
    # assert
    before, after = block_weights(trained.model), block_weights(model)
    if scope == "layer":  # exactly the ratio in every layer
        assert all(int((w == 0).sum()) == round(0.3 * w.numel()) for w in after.values())
        return
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == round(0.3 * total)
    shares = [float((w == 0).float().mean()) for w in after.values()]
    assert max(shares) - min(shares) > 0.05  # one global threshold: layers differ
    kept = min(float(before[n][after[n] != 0].abs().min()) for n in after)
    dropped = max(float(before[n][after[n] == 0].abs().max()) for n in after)
    assert kept >= dropped and "no runtime here" in report["note"]


@pytest.mark.parametrize("spec, changes, share, tolerance", [
    ("prune:method=heads,ratio=0.5", {"n_heads": 2, "n_kv_heads": 1, "head_dim": 32}, 0.5, 1 / 4),
    ("prune:method=heads,ratio=0.5,unit=heads", {"n_heads": 2, "n_kv_heads": 2, "head_dim": 32}, 1 / 3, 0.0),
    ("prune:method=channels,ratio=0.25", {"ffn_dim": 288}, 0.25, 16 / 384),
    ("prune:method=channels,ratio=0.3", {"ffn_dim": 256}, 0.3, 16 / 384),
    ("prune:method=layers,ratio=0.25", {"n_layers": 3}, 0.25, 1 / 8),
    ("prune:method=layers,ratio=0.6", {"n_layers": 2}, 0.6, 1 / 8),
])
def test_structured_pruning_removes_the_requested_share(trained, spec, changes, share, tolerance):
    # execute
    model, report = pruned(trained, spec)
    # assert: the stated tolerance is half a unit (a KV group, 16 channels, half a layer); query heads
    # removed per group leave k/v intact, so the attention share is exactly (q + o) / (q + k + v + o) / 2
    for k, v in changes.items():
        assert getattr(model.config, k) == v, k
    before, after = report["component_params"]
    assert abs((1 - after / before) - share) <= tolerance + 1e-9
    assert report["component_removed_share"] == round(1 - after / before, 4)
    assert report["params"][1] == model.num_params() < trained.model.num_params()
    with torch.no_grad():
        logits = model(trained.calib[:2, :16])
    assert logits.shape == (2, 16, trained.model.config.vocab_size) and torch.isfinite(logits).all()


def test_layer_pruning_drops_exactly_the_blocks_named(trained):
    # setup
    from toolchain.compress.passes.prune import Prune

    ctx = Context(calibration=trained.calib)
    # execute: blocks 1 and 2 of 4, as edgesmith tune names them
    small = apply(copy.deepcopy(trained.model), Prune(method="layers", drop=(2, 1)), ctx)
    # assert: blocks 0 and 3 kept, in order, with their weights
    assert small.config.n_layers == 2 and ctx.report["kept"] == [0, 3]
    assert torch.equal(small.layers[1].mlp.down_proj.weight, trained.model.layers[3].mlp.down_proj.weight)
    for bad, message in ((dict(method="channels", drop=(1,)), "drop= names blocks for method=layers"),
                         (dict(method="layers", ratio=0.5, drop=(1,)), "in place of ratio="),
                         (dict(method="layers", drop=(1, 1)), "must be distinct block indices")):
        with pytest.raises(EdgesmithError, match=message):
            Prune(**bad)
    with pytest.raises(EdgesmithError, match=r"drop=\[0, 1, 2, 3\] must name some, not all, of blocks 0..3"):
        apply(copy.deepcopy(trained.model), Prune(method="layers", drop=(0, 1, 2, 3)), Context(calibration=trained.calib))


def test_structured_pruning_keeps_the_most_important_units(trained):
    # setup: zero one KV group's query heads' output projection in every layer: it is then worthless
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight[:, 64:] = 0  # heads 2, 3 = KV group 1
    # execute
    ctx = Context(calibration=trained.calib)
    small = apply(model, parse_pass("prune:method=heads,ratio=0.5"), ctx)
    # assert: group 1 went, and the output is unchanged (the removed heads contributed nothing)
    assert ctx.report["kept"]["kv_heads"] == [[0]] * 4 and ctx.report["kept"]["query_heads"] == [[0, 1]] * 4
    with torch.no_grad():
        x = trained.calib[:2, :32]
        assert (small(x) - model(x)).abs().max().item() <= 1e-5


def test_pruned_checkpoint_loads_in_transformers_generates_and_exports(float_ckpt, trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from runtimes.generate import generate
    from runtimes.sampling import GenerationConfig
    from toolchain.export import ExportConfig, export

    # setup / execute: all three structured methods chained through the CLI
    out = tmp_path / "pruned"
    rc = main(["compress", str(float_ckpt), "--pass", "prune:method=heads,ratio=0.5,unit=heads",
               "--pass", "prune:method=channels,ratio=0.25", "--pass", "prune:method=layers,ratio=0.25",
               "--out", str(out), "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "2048"])
    printed = capsys.readouterr().out
    # assert: a smaller plain Llama config, a report with before / after per pass
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 32)
    assert (cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["hidden_size"]) == (288, 3, 128)
    report = json.loads((out / "compress_report.json").read_text())
    steps = report["passes"]
    assert [p["kind"] for p in steps] == ["prune"] * 3
    assert all(p["after"]["params"] < p["before"]["params"] and p["after"]["size_mb"] < p["before"]["size_mb"]
               for p in steps)
    assert steps[0]["before"]["perplexity"] == pytest.approx(report["quality"]["reference_perplexity"])
    assert steps[-1]["after"]["perplexity"] == pytest.approx(report["quality"]["perplexity"])
    assert "prune layers" in printed and "perplexity" in printed
    ckpt = load_checkpoint(out)
    assert ckpt.meta["lineage"]["passes"][-1] == {"kind": "prune", "config": steps[-1]["config"]}
    # `eval --reference` compares it with its parent by its outputs
    assert main(["eval", str(out), "--reference", str(float_ckpt), "--data", str(trained.corpus), "--seq-len", "64",
                 "--max-tokens", "1024"]) == 0
    assert "Same top p:" in capsys.readouterr().out
    # transformers loads it as it is, with the same logits
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = trained.calib[:2, :48]
    with torch.no_grad():
        assert (hf(x).logits - ckpt.model(x)).abs().max().item() <= 1e-4
    # it generates with the torch runtime
    ids = list(generate(ckpt.model, [trained.tokenizer.bos_id], GenerationConfig(max_new_tokens=8)))
    assert len(ids) >= 1
    # and exports to GGUF and ONNX with parity through llama.cpp and ONNX Runtime
    for fmt in ("gguf", "onnx"):
        m = export(out, tmp_path / fmt, ExportConfig(format=fmt, max_seq_len=64))
        assert m["parity"]["passed"] and m["parity"]["greedy_matched"] == 32, fmt
        assert m["model"]["n_heads"] == 2 and m["model"]["ffn_dim"] == 288 and m["model"]["n_layers"] == 3


@pytest.mark.parametrize("spec, message", [
    ("prune:method=magnitude,ratio=1.5", "prune: ratio=1.5 is out of range; allowed: 0 < ratio < 1"),
    ("prune:method=magnitude,ratio=0", "prune: ratio=0 is out of range; allowed: 0 < ratio < 1"),
    ("prune:method=channels", "prune: method=channels needs ratio="),
    ("prune:method=2:4,ratio=0.3", "ratio=0.3 does not apply to 2:4"),
    ("prune:method=blocks,ratio=0.3",
     "method='blocks' is not supported; allowed: magnitude, 2:4, heads, channels, layers"),
    ("prune:method=heads,ratio=0.3,unit=kv", "unit='kv' is not supported; allowed: groups, heads"),
    ("prune:method=magnitude,ratio=0.3,targets=(", "targets='(' is not a valid regular expression"),
])
def test_bad_config_is_one_clear_error(spec, message):
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(")):
        parse_pass(spec)


@pytest.mark.parametrize("spec, message", [
    ("prune:method=heads,ratio=0.75,unit=heads", "would remove all 2 query heads per KV group, leaving none"),
    ("prune:method=heads,ratio=0.8", "would remove all 2 KV groups per layer, leaving none"),
    ("prune:method=heads,ratio=0.2", "removes no KV groups"),
    ("prune:method=layers,ratio=0.1", "removes no layers (4 layers); allowed: ratio >= 0.125"),
    ("prune:method=channels,ratio=0.97", "would remove all 384 MLP channels, leaving none"),
    ("prune:method=magnitude,ratio=0.5,targets=nothing_here", "matches no float Linear"),
])
def test_pruning_below_one_unit_is_a_clear_error(float_ckpt, trained, tmp_path, capsys, spec, message):
    # execute
    rc = main(["compress", str(float_ckpt), "--pass", spec, "--out", str(tmp_path / "x"),
               "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "512"])
    # assert: one line, exit 2, nothing written
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_quantized_model_is_refused_by_name(trained):
    # setup
    model, _ = pruned(trained, "prune:method=channels,ratio=0.25")
    apply(model, parse_pass("quantize:method=rtn,bits=8"), Context())
    # execute / assert
    with pytest.raises(EdgesmithError, match=r"prune heads: [\w.]+ is a Quantized\w+; prune before quantize / lowrank"):
        apply(model, parse_pass("prune:method=heads,ratio=0.5"), Context(calibration=trained.calib))
