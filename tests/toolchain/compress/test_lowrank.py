"""The lowrank pass: SVD factorization that reproduces the model at full rank, saves parameters below
the break-even rank, and survives checkpoints, quantization and export."""

import copy
import json

import onnx
import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.lowrank import LowRankLinear
from edgesmith.cli import main
from toolchain.compress import Context, apply, parse_pass
from toolchain.compress.passes.lowrank import factorize


def factorized(trained, spec):
    ctx = Context(tokenizer=trained.tokenizer, calibration=trained.calib)
    model = apply(copy.deepcopy(trained.model), parse_pass(spec), ctx)
    return model, ctx.report


def test_full_rank_reproduces_the_outputs(trained):
    # execute
    model, report = factorized(trained, "lowrank:rank=full,only_smaller=false")
    # assert: every block Linear is factorized, and the logits are unchanged
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 7 * 4 and report["factorized"] == 28
    assert report["target_params"][1] > report["target_params"][0]  # full rank costs more: checks only
    with torch.no_grad():
        x = trained.calib[:4, :64]
        assert (model(x) - trained.model(x)).abs().max().item() <= 1e-4


def test_factorize_is_the_best_rank_r_approximation():
    # setup: a matrix of known rank 5 plus nothing else
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 5, generator=g) @ torch.randn(5, 80, generator=g)
    # execute
    b, a = factorize(w, 5)
    # assert
    assert b.shape == (48, 5) and a.shape == (5, 80)
    assert (b @ a - w).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rank, factorized_layers", [(63, 8), (64, 0)])
def test_only_below_the_break_even_rank_saves_parameters(trained, rank, factorized_layers):
    # execute: q_proj and o_proj are 128 x 128, break-even rank 128 * 128 / 256 = 64
    model, report = factorized(trained, f"lowrank:rank={rank},targets=(q_proj|o_proj)$")
    # assert
    saved = sum(128 * 128 - rank * 256 for e in report["layers"].values() if e["factorized"])
    assert report["factorized"] == factorized_layers
    assert model.num_params() == trained.model.num_params() - saved
    if factorized_layers:
        assert model.num_params() < trained.model.num_params()
        assert model.layers[0].self_attn.q_proj.a.weight.shape == (rank, 128)
    assert all(e["break_even"] == 64.0 for e in report["layers"].values())


def test_energy_threshold_picks_the_smallest_sufficient_rank(trained):
    # execute
    model, report = factorized(trained, "lowrank:energy=0.5,multiple=1,only_smaller=false")
    # assert: against the singular values themselves
    for name in ("layers.0.self_attn.q_proj", "layers.2.mlp.down_proj"):
        s2 = torch.linalg.svdvals(trained.model.get_submodule(name).weight.double()).pow(2)
        share = s2.cumsum(0) / s2.sum()
        r = report["layers"][name]["rank"]
        assert share[r - 1] >= 0.5 > (share[r - 2] if r > 1 else 0), name
        assert model.get_submodule(name).rank == r


@pytest.mark.parametrize("budget", [0.4, 0.7])
def test_global_budget_is_respected(trained, budget):
    # execute
    model, report = factorized(trained, f"lowrank:budget={budget}")
    # assert: within budget, and every rank a multiple of 32 (the second factor stays quantizable)
    before, after = report["target_params"]
    assert after <= budget * before
    assert all(e["rank"] % 32 == 0 for e in report["layers"].values())
    assert model.num_params() == trained.model.num_params() - (before - after)


def test_factorized_checkpoint_round_trips_quantizes_and_exports(trained, tmp_path):
    from toolchain.export import ExportConfig, export

    # setup: factorize at rank 32, then quantize both factors of every pair to 4 bits
    model, _ = factorized(trained, "lowrank:rank=32")
    float_path = save_checkpoint(model, trained.tokenizer, tmp_path / "lr", {"parent": None, "passes": []})
    dense = save_checkpoint(trained.model, trained.tokenizer, tmp_path / "dense", {"parent": None, "passes": []})
    apply(model, parse_pass("quantize:method=rtn,bits=4"), Context())
    q_path = save_checkpoint(model, trained.tokenizer, tmp_path / "lr4", {"parent": None, "passes": []})
    # execute
    back = load_checkpoint(q_path)
    # assert: same modules, same logits, the ranks in edgesmith.json
    assert back.meta["lowrank"]["layers"]["model.layers.0.mlp.up_proj"] == 32
    assert back.meta["quantization"]["weights"]["model.layers.0.mlp.up_proj.b"]["bits"] == 4
    x = trained.calib[:2, :32]
    with torch.no_grad():
        assert torch.equal(back.model(x), model(x))
    # ONNX keeps both factors (two MatMuls) and is smaller than the dense model's; parity holds
    m = export(float_path, tmp_path / "onnx", ExportConfig(format="onnx", max_seq_len=64, fuse=False))
    ref = export(dense, tmp_path / "onnx_dense", ExportConfig(format="onnx", max_seq_len=64, fuse=False))
    assert m["parity"]["passed"] and m["parity"]["greedy_matched"] == 32
    inits = {t.name for t in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    assert {"layers.0.self_attn.q_proj.a.weight_t", "layers.0.self_attn.q_proj.b.weight_t"} <= inits
    size = {d: (tmp_path / d / "model.onnx").stat().st_size for d in ("onnx", "onnx_dense")}
    assert size["onnx"] < 0.7 * size["onnx_dense"]
    assert ref["parity"]["passed"]
    mq = export(q_path, tmp_path / "onnx4", ExportConfig(format="onnx", max_seq_len=64))
    assert mq["parity"]["passed"]
    # GGUF multiplies the factors back (llama.cpp has no factorized Linear) and says so
    notices = []
    g = export(float_path, tmp_path / "gguf", ExportConfig(format="gguf", max_seq_len=64), log=notices.append)
    assert g["parity"]["passed"] and g["parity"]["greedy_matched"] == 32
    assert g["options"]["lowrank_multiplied_back"] == 28 and "not smaller" in notices[0]


def test_compress_command_reports_the_saving(trained, tmp_path, capsys):
    # setup
    src = save_checkpoint(trained.model, trained.tokenizer, tmp_path / "float", {"parent": None, "passes": []})
    # execute
    rc = main(["compress", str(src), "--pass", "lowrank:energy=0.6", "--out", str(tmp_path / "lr"),
               "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "2048"])
    # assert
    assert rc == 0 and "lowrank" in capsys.readouterr().out
    step = json.loads((tmp_path / "lr" / "compress_report.json").read_text())["passes"][0]
    assert step["kind"] == "lowrank" and step["config"]["energy"] == 0.6
    assert step["after"]["params"] < step["before"]["params"] and step["after"]["size_mb"] < step["before"]["size_mb"]
    assert load_checkpoint(tmp_path / "lr").model.num_params() == step["after"]["params"]


@pytest.mark.parametrize("spec, message", [
    ("lowrank:energy=1.5", "lowrank: energy=1.5 is out of range; allowed: 0 < energy <= 1"),
    ("lowrank:budget=1.0", "lowrank: budget=1.0 is out of range; allowed: 0 < budget < 1"),
    ("lowrank:rank=0", "lowrank: rank=0 is out of range; allowed: an integer >= 1, or full"),
    ("lowrank:energy=0.9,rank=32", "give exactly one of energy=, budget=, rank= (got energy, rank)"),
    ("lowrank:", "give exactly one of energy=, budget=, rank= (got none)"),
])
def test_bad_config_is_one_clear_error(spec, message):
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pass(spec)


@pytest.mark.parametrize("spec, message", [
    ("lowrank:rank=100", "rank=100 is out of range for layers.0.self_attn.k_proj (64 x 128); allowed: 1..64"),
    ("lowrank:budget=0.05", "budget=0.05 is below what the smallest rank (32) in every target needs"),
    ("lowrank:rank=8,targets=nothing", "matches no float Linear"),
])
def test_rank_out_of_range_is_one_clear_error(trained, spec, message):
    with pytest.raises(EdgesmithError, match=message.replace("(", r"\(").replace(")", r"\)")):
        factorized(trained, spec)
