"""LoRA / QLoRA: only adapters train, merging is exact, the QLoRA base stays 4-bit, `edgesmith finetune` end to end."""

import json

import pytest
import torch
from torch import nn

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.quant import QuantizedLinear
from edgesmith.cli import main
from toolchain.train.lora import LoRA, LoRALinear, apply_lora_, count_params, load_adapter_, merge_lora_
from toolchain.train.trainer import TrainConfig, train

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_adapters(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05


def test_only_adapters_train_and_are_counted(tiny_model, tiny_config):
    # setup
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    names = apply_lora_(tiny_model, LoRA(rank=4, targets=r"self_attn\.(q|v)_proj$"))
    tokens = torch.randint(0, tiny_config.vocab_size, (4000,)).numpy()
    # execute
    train(tiny_model, tokens, None, TrainConfig(steps=5, batch_size=4, seq_len=32, lr=1e-2, warmup=1), progress=False)
    # assert: rank x (in + out) per adapted Linear, and nothing else changed
    d, kv = tiny_config.dim, tiny_config.n_kv_heads * tiny_config.head_dim
    expected = tiny_config.n_layers * (4 * (d + d) + 4 * (d + kv))
    trainable, _ = count_params(tiny_model)
    assert len(names) == 2 * tiny_config.n_layers and trainable == expected
    assert [n for n, p in tiny_model.named_parameters() if p.requires_grad] == \
        [f"{n}.lora_{x}" for n in names for x in "AB"]
    after = tiny_model.state_dict()
    for k, v in before.items():
        base_key = k.replace("q_proj.weight", "q_proj.base.weight").replace("v_proj.weight", "v_proj.base.weight")
        assert torch.equal(after[base_key], v), k
    assert any(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in tiny_model.modules()
               if isinstance(m, LoRALinear))


@pytest.mark.parametrize("qlora", [False, True])
def test_merged_logits_equal_adapted_logits(tiny_model, qlora):
    # setup
    apply_lora_(tiny_model, LoRA(rank=8, alpha=4.0, qlora=qlora))
    _randomize_adapters(tiny_model)
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        adapted = tiny_model(x)
        # execute
        merged = merge_lora_(tiny_model)(x)
    # assert
    assert not any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in tiny_model.modules())
    assert all(type(m) is nn.Linear for n, m in tiny_model.named_modules() if n.endswith(PROJ))
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_qlora_base_stays_4_bit_in_memory(tiny_model, tiny_config):
    # setup / execute
    apply_lora_(tiny_model, LoRA(rank=4, qlora=True))
    tokens = torch.randint(0, tiny_config.vocab_size, (4000,)).numpy()
    train(tiny_model, tokens, None, TrainConfig(steps=3, batch_size=2, seq_len=32, warmup=1), progress=False)
    # assert: every block Linear is int8 codes in [-8, 7] + fp16 group-32 scales; no float copy of them
    bases = [m.base for m in tiny_model.modules() if isinstance(m, LoRALinear)]
    assert len(bases) == 7 * tiny_config.n_layers
    for b in bases:
        assert isinstance(b, QuantizedLinear) and b.bits == 4 and b.group_size == 32
        assert b.qweight.dtype == torch.int8 and -8 <= int(b.qweight.min()) and int(b.qweight.max()) <= 7
        assert b.scales.dtype == torch.float16 and b.scales.shape[1] == b.in_features // 32
        assert not list(b.parameters())
    float_params = {n for n, p in tiny_model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    assert float_params == {"embed_tokens.weight", "norm.weight", "lm_head.weight"} | {
        f"layers.{i}.{ln}.weight" for i in range(tiny_config.n_layers)
        for ln in ("input_layernorm", "post_attention_layernorm")}


def test_finetune_cli_adapter_and_merge(tiny_model, tokenizer, text_folder, tmp_path, capsys):
    # setup
    base = save_checkpoint(tiny_model, tokenizer, tmp_path / "base", child_lineage(None, {"kind": "test"}))
    common = ["finetune", str(base), "--data", str(text_folder), "--lora-rank", "4", "--steps", "6",
              "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup", "1"]
    # execute
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--qlora", "--merge", "--out", str(tmp_path / "m")]) == 0
    # assert: the adapter reloads onto the base and reproduces the run's model; the merged one is plain
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    d, kv, ffn = 64, 32, 128  # tiny_config: dim, n_kv_heads x head_dim, ffn_dim
    per_layer = 4 * ((d + d) + (d + kv) + (d + kv) + (d + d) + 3 * (d + ffn))  # rank 4: q, k, v, o, gate, up, down
    assert summary["trainable_params"] == 2 * per_layer
    reloaded = load_checkpoint(base).model
    load_adapter_(reloaded, tmp_path / "a" / "adapter")
    assert count_params(reloaded)[0] == summary["trainable_params"]
    merged = load_checkpoint(tmp_path / "m" / "merged")
    assert [p["kind"] for p in merged.meta["lineage"]["passes"]] == ["test", "finetune"]
    assert merged.meta["lineage"]["passes"][-1]["method"] == "qlora"
    assert (tmp_path / "m" / "loss.png").is_file() and "trainable parameters" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank: 0 must be an integer >= 1"),
    (["--lora-rank", "4", "--targets", "nothing_here"], "--targets: 'nothing_here' matches no Linear"),
    (["--lora-rank", "4", "--targets", "("], "--targets: '(' is not a valid regular expression"),
    (["--lora-rank", "4", "--strategy", "fsdp"], "--strategy: 'fsdp' is not supported by finetune; allowed: ddp"),
])
def test_finetune_bad_input(tiny_model, tokenizer, text_folder, tmp_path, capsys, args, message):
    base = save_checkpoint(tiny_model, tokenizer, tmp_path / "base", child_lineage(None, {"kind": "test"}))
    argv = ["finetune", str(base), "--data", str(text_folder), "--steps", "2", "--seq-len", "32",
            "--out", str(tmp_path / "o")] + args
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()
