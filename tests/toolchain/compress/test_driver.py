"""Quantized checkpoints on disk and the `compress` / `eval --reference` commands, end to end."""

import json

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import load_checkpoint, save_checkpoint
from models.quant import Int8KVAttention, QuantizedEmbedding, QuantizedLinear
from edgesmith.cli import main
from toolchain.compress import Context, apply, parse_pass


@pytest.fixture(scope="module")
def float_ckpt(trained, tmp_path_factory):
    return save_checkpoint(trained.model, trained.tokenizer, tmp_path_factory.mktemp("ck") / "float",
                           {"parent": None, "passes": []})


def test_quantized_checkpoint_round_trips_exactly(trained, tmp_path):
    # setup: mixed schemes, act-quantized layers and an int8 KV cache in one model
    import copy
    model = copy.deepcopy(trained.model)
    cfg = parse_pass("quantize:method=smoothquant,bits=4,group_size=64", [("lm_head", 8), (r"layers\.3\..*", "skip")])
    apply(model, cfg, Context(calibration=trained.calib))
    apply(model, parse_pass("quantize:method=kv_int8"), Context(calibration=trained.calib))
    # execute
    out = save_checkpoint(model, trained.tokenizer, tmp_path / "q", {"parent": None, "passes": []})
    back = load_checkpoint(out).model
    # assert: every tensor bit-identical, same modules, same logits
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert back.state_dict()[k].dtype == v.dtype and torch.equal(back.state_dict()[k], v), k
    assert isinstance(back.lm_head, QuantizedLinear) and back.lm_head.bits == 8
    assert isinstance(back.layers[0].mlp.up_proj, QuantizedLinear) and back.layers[0].mlp.up_proj.act_bits == 8
    assert isinstance(back.layers[3].mlp.up_proj, torch.nn.Linear)
    assert isinstance(back.layers[0].self_attn, Int8KVAttention)
    assert isinstance(back.embed_tokens, QuantizedEmbedding) and back.embed_tokens.group_size == 64
    tokens = trained.calib[:2, :32]
    assert torch.equal(back(tokens), model(tokens))
    meta = json.loads((out / "edgesmith.json").read_text())["quantization"]
    assert meta["weights"]["model.layers.0.mlp.up_proj"] == {"bits": 4, "group_size": 64, "act_bits": 8}
    assert meta["weights"]["model.embed_tokens"] == {"bits": 4, "group_size": 64, "act_bits": None}
    assert meta["kv_cache"]["dtype"] == "int8"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()
        assert f.get_tensor("model.embed_tokens.qweight").shape == (512, 128)
        assert f.get_tensor("model.embed_tokens.scales").shape == (512, 2)
        assert "model.embed_tokens.weight" not in f.keys()


def test_compress_command_writes_checkpoint_with_report(float_ckpt, trained, tmp_path, capsys):
    # execute
    out = tmp_path / "gptq4"
    rc = main(["compress", str(float_ckpt), "--pass", "quantize:method=gptq,bits=4,group_size=32",
               "--rule", "lm_head=8", "--rule", r"layers\.9\..*=skip", "--out", str(out),
               "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "2048"])
    printed = capsys.readouterr().out
    # assert
    assert rc == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert report["calibration"]["split"] == "train" and report["quality"]["split"] == "validation"
    assert report["passes"][0]["config"]["method"] == "gptq"
    assert r"rule 'layers\.9\..*' matches no layer" in report["passes"][0]["report"]["warnings"]
    assert "warning: rule 'layers\\.9\\..*' matches no layer" in printed
    assert 0 < report["quality"]["kl"] < 0.5 and report["quality"]["top1"] > 0.5
    assert set(report["layer_sqnr_db"]) >= {"embed_tokens", "layers.0.self_attn", "layers.3.mlp", "lm_head"}
    assert report["passes"][0]["report"]["layers"]["embed_tokens"] == 4
    ckpt = load_checkpoint(out)
    assert ckpt.model.lm_head.bits == 8 and ckpt.model.layers[0].mlp.down_proj.bits == 4
    assert ckpt.meta["lineage"]["passes"][-1]["config"]["method"] == "gptq"


def test_eval_with_reference_prints_kl_agreement_and_layer_table(float_ckpt, trained, tmp_path, capsys):
    # setup
    out = tmp_path / "rtn8"
    assert main(["compress", str(float_ckpt), "--pass", "quantize:method=rtn,bits=8", "--out", str(out),
                 "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "1024"]) == 0
    capsys.readouterr()
    # execute
    rc = main(["eval", str(out), "--reference", str(float_ckpt), "--data", str(trained.corpus),
               "--seq-len", "64", "--max-tokens", "2048"])
    printed = capsys.readouterr().out
    # assert
    assert rc == 0
    assert "mean KL vs reference" in printed and "top-1 agreement" in printed
    assert "layers.3.mlp" in printed and "lm_head" in printed


@pytest.mark.parametrize("argv, message", [
    (["--pass", "quantize:method=gptq,bits=3"], "bits=3 is not allowed; allowed: 4, 8"),
    (["--pass", "quantize:method=rtn,group_size=48"], "group_size=48 is not allowed; allowed: 32, 64, 128"),
    (["--pass", "quantize:method=hqq"], "unknown quantize method 'hqq'; allowed: awq, gptq, kv_int8, rtn, smoothquant"),
    (["--pass", "quantize:method=gptq,n_calib=100000"], "calibration set too small"),
    (["--pass", "quantize:method=rtn,bitz=4"], "unknown field 'bitz'"),
    (["--pass", "sparsify:ratio=0.5"], "unknown pass kind 'sparsify'; allowed: quantize, distill, lowrank, prune, qat"),
    (["--pass", "quantize:method=rtn", "--rule", "lm_head=3"], "value 3 is not allowed"),
])
def test_bad_input_is_one_clear_line(float_ckpt, trained, tmp_path, capsys, argv, message):
    rc = main(["compress", str(float_ckpt), *argv, "--out", str(tmp_path / "x"), "--data", str(trained.corpus),
               "--seq-len", "64", "--max-tokens", "512"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
