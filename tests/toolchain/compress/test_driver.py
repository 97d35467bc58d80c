"""Quantized checkpoints on disk and the `compress` / `eval --reference` commands, end to end."""

import json
import math
import re

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


def kld_lines(printed: str) -> dict[str, float]:
    """The llama-perplexity style lines `eval --reference` prints, as numbers."""
    found = re.findall(r"^(Mean KLD|Median KLD|99\.0% KLD|Same top p|RMS Δp)\s*:\s*([-\d.]+)", printed, re.M)
    return {k: float(v) for k, v in found}


def test_eval_with_reference_prints_the_kld_statistics_and_layer_table(float_ckpt, trained, tmp_path, capsys):
    # setup
    out = tmp_path / "rtn4"
    assert main(["compress", str(float_ckpt), "--pass", "quantize:method=rtn,bits=4", "--out", str(out),
                 "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "1024"]) == 0
    capsys.readouterr()
    # execute: the checkpoint in torch, then its GGUF through llama.cpp, on the same windows
    args = ["--reference", str(float_ckpt), "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "2048"]
    rc = main(["eval", str(out), *args])
    torch_printed = capsys.readouterr().out
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    capsys.readouterr()
    rc_gguf = main(["eval", str(tmp_path / "gguf"), *args])
    gguf_printed = capsys.readouterr().out
    # assert
    assert rc == 0 and rc_gguf == 0
    assert "layers.3.mlp" in torch_printed and "lm_head" in torch_printed and "through llamacpp" in gguf_printed
    t, g = kld_lines(torch_printed), kld_lines(gguf_printed)
    assert set(t) == set(g) == {"Mean KLD", "Median KLD", "99.0% KLD", "Same top p", "RMS Δp"}, torch_printed
    assert 0 < t["Median KLD"] <= t["99.0% KLD"] and 0 < t["Mean KLD"] <= t["99.0% KLD"] and 50 < t["Same top p"] < 100
    # the GGUF holds the same codes: what llama.cpp computes with them is within runtime error of torch's
    assert g["Mean KLD"] == pytest.approx(t["Mean KLD"], rel=0.3) and abs(g["Same top p"] - t["Same top p"]) < 3


def test_kld_statistics_match_their_definitions():
    # setup: two hand-made next-token distributions over 3 tokens, 2 positions
    from toolchain.compress.quality import KLDStats

    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.6, 0.3]]))
    y = torch.tensor([0, 1])
    # execute
    s = KLDStats()
    s.add(q, y, ref)
    r = s.result()
    # assert: KL(ref||q) of the first position is 0.5 ln 2 + 0.25 ln 0.5; the second is 0
    kl0 = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert r["kl"] == pytest.approx(kl0 / 2, abs=1e-6) and r["kld_max"] == pytest.approx(kl0, abs=1e-6)
    assert r["top1"] == 0.5  # argmax 1 vs 0 at the first position, 1 and 1 at the second
    assert r["dp_mean"] == pytest.approx(-0.125, abs=1e-6) and r["dp_rms"] == pytest.approx(math.sqrt(0.25 ** 2 / 2))


@pytest.mark.parametrize("argv, message", [
    (["--pass", "quantize:method=gptq,bits=3"], "bits=3 is not allowed; allowed: 4, 5, 8"),
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
