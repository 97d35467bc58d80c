"""`edgesmith import-gguf`: a GGUF becomes a checkpoint with its quantized codes kept exactly (issue 21, item 4)."""

import dataclasses
import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch

from edgesmith.cli import main
from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.hf import import_hf
from models.llama import Transformer
from models.quant import QuantizedEmbedding, QuantizedLinear, quantize_embedding_, quantize_linear_
from tests.conftest import TEXT
from tests.models.test_families import hf_model
from toolchain.export import ExportConfig, export
from toolchain.export.parity import torch_threads
from toolchain.gguf_import import import_gguf

TOKENS = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))


def logits(path):
    with torch.no_grad():
        return load_checkpoint(path).model(TOKENS)


def test_a_float_gguf_comes_back_as_the_checkpoint_it_was_exported_from(artifact, checkpoints, tmp_path):
    # execute
    out = import_gguf(artifact("gguf") / "model.gguf", tmp_path / "ckpt")
    # assert: the same logits, the same token ids, the lineage names the file
    assert torch.equal(logits(out), logits(checkpoints["float"]))
    ours, theirs = load_checkpoint(out).tokenizer, load_checkpoint(checkpoints["float"]).tokenizer
    assert ours.encode(TEXT[:500]) == theirs.encode(TEXT[:500]) and ours.decode(ours.encode(TEXT[:200])) == TEXT[:200]
    assert json.loads((out / "edgesmith.json").read_text())["lineage"]["passes"][0]["kind"] == "import-gguf"


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_quantized_codes_come_back_exactly_and_export_to_onnx_with_the_same_numbers(checkpoints, tmp_path, bits):
    # setup: 4-, 5- or 8-bit Linears and embedding (tied head reads it) -> Q4_0 / Q5_0 / Q8_0 GGUF
    ckpt = load_checkpoint(checkpoints["float"])
    quantize_linear_(ckpt.model, bits, 32)
    quantize_embedding_(ckpt.model, bits, 32)
    src = save_checkpoint(ckpt.model, ckpt.tokenizer, tmp_path / "q", child_lineage(ckpt, {"kind": "test"}))
    with torch_threads(1):
        export(src, tmp_path / "gguf", ExportConfig(format="gguf"), log=lambda line: None)
    # execute
    out = import_gguf(tmp_path / "gguf" / "model.gguf", tmp_path / "imported")
    # assert: every code and scale equal, so the same model; ONNX from it passes parity
    a, b = load_checkpoint(out).model, load_checkpoint(src).model
    for name, m in b.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and not name == "lm_head":
            got = a.get_submodule(name)
            assert torch.equal(got.qweight, m.qweight) and torch.equal(got.scales, m.scales), name
    assert torch.equal(logits(out), logits(src))
    with torch_threads(1):
        manifest = export(out, tmp_path / "onnx", ExportConfig(format="onnx"), log=lambda line: None)
    assert manifest["parity"]["passed"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_a_family_gguf_comes_back_as_that_family(tokenizer, tmp_path, family):
    # setup: a transformers model of the family, imported, 4-bit (Qwen2's biases stay float), to GGUF
    src = tmp_path / "hf"
    hf_model(family).save_pretrained(src)
    tokenizer.save(src)
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ckpt"))
    quantize_linear_(ckpt.model, 4, 32)
    q = save_checkpoint(ckpt.model, tokenizer, tmp_path / "q4", child_lineage(ckpt, {"kind": "test"}))
    with torch_threads(1):
        export(q, tmp_path / "gguf", ExportConfig(format="gguf"), log=lambda line: None)
    # execute: through the CLI
    code = main(["import-gguf", str(tmp_path / "gguf" / "model.gguf"), "--out", str(tmp_path / "back")])
    # assert
    assert code == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.config.family == family and torch.equal(logits(tmp_path / "back"), logits(q))


def rewritten(src, dst, edit):
    """The GGUF at `src` written again with `edit(fields: dict) ` applied to its key/values."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch=arch)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
    values = {k: (f.contents(), f.types) for k, f in fields.items()}
    edit(values)
    for k, (v, types) in values.items():
        vtype = types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        else:
            w.add_key_value(k, v, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.__setitem__("tokenizer.ggml.pre", ("deepseek-coder", v["tokenizer.ggml.pre"][1])),
     r"tokenizer.ggml.pre 'deepseek-coder' is not supported; allowed: gpt-2, llama-bpe, qwen2, smollm"),
    (lambda v: v.__setitem__("tokenizer.ggml.model", ("bert", v["tokenizer.ggml.model"][1])),
     r"tokenizer.ggml.model 'bert' is not supported; allowed: 'gpt2' \(byte-level BPE\), 'llama'"),
    (lambda v: v.pop("llama.block_count"), r"llama.block_count is missing"),
])
def test_what_the_importer_cannot_represent_is_refused_in_one_line(artifact, tmp_path, edit, message):
    # setup
    path = rewritten(artifact("gguf") / "model.gguf", tmp_path / "edited.gguf", edit)
    # execute
    with pytest.raises(EdgesmithError, match=message) as e:
        import_gguf(path, tmp_path / "out")
    # assert
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_k_quant_tensor_is_refused_naming_it(tokenizer, tiny_config, tmp_path):
    # setup: llama.cpp's own quantizer turns our F32 GGUF into Q4_K_M; rows 256 wide, so it uses K-quants (it falls
    # back to Q5_0 / Q8_0, which we hold, for narrower rows)
    import llama_cpp

    torch.manual_seed(0)
    wide = Transformer(dataclasses.replace(tiny_config, dim=256, ffn_dim=256, n_layers=1, max_seq_len=64))
    ckpt = save_checkpoint(wide, tokenizer, tmp_path / "wide", {"parent": None, "passes": []})
    with torch_threads(1):
        export(ckpt, tmp_path / "gguf", ExportConfig(format="gguf"), log=lambda line: None)
    src = shutil.copy(tmp_path / "gguf" / "model.gguf", tmp_path / "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_path / "k.gguf").encode(), params) == 0
    # execute
    with pytest.raises(EdgesmithError) as e:
        import_gguf(tmp_path / "k.gguf", tmp_path / "out")
    # assert: the first tensor of a type we cannot hold (a K-quant), named
    m = re.search(r"tensor '[^']+' is (\w+); allowed: F32, F16, Q8_0, Q5_0, Q4_0$", str(e.value))
    assert m and m.group(1) not in ("F32", "F16", "Q8_0", "Q5_0", "Q4_0"), str(e.value)
    assert not (tmp_path / "out").exists()
