"""Every format for the model families (issue 21): a tiny Qwen2 / Qwen3 / Mistral / SmolLM built by transformers,
imported, trained a few steps (peaked logits: greedy parity is a test, not a coin toss), exported with parity
against the torch model in the format's own runtime; a 4-bit GPTQ child of each exports with parity too."""

import numpy as np
import pytest
import torch

import runtimes
from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.hf import import_hf
from tests.conftest import TEXT
from tests.models.test_families import hf_model
from tests.toolchain.export.conftest import fit
from toolchain.compress import parse_pass
from toolchain.compress.driver import compress_checkpoint
from toolchain.export import ExportConfig, export
from toolchain.export.parity import PARITY_TEXT, torch_threads

pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("families")
    tokens = np.array(tokenizer.encode(TEXT + PARITY_TEXT * 20), dtype=np.uint16)
    made = {}

    def get(family: str, quantized: bool = False):
        key = (family, quantized)
        if key in made:
            return made[key]
        if not quantized:
            src = root / f"hf-{family}"
            hf_model(family).save_pretrained(src)
            tokenizer.save(src)
            ckpt = load_checkpoint(import_hf(src, root / f"imported-{family}"))
            with torch_threads(1):
                fit(ckpt.model, tokens)
            made[key] = save_checkpoint(ckpt.model, tokenizer, root / f"{family}",
                                        child_lineage(ckpt, {"kind": "test-fit"}))
        else:
            out = root / f"{family}-q4"
            compress_checkpoint(get(family), out, [parse_pass("quantize:method=gptq,bits=4")],
                                calib_seq_len=64, eval_seq_len=64, eval_tokens=2048)
            made[key] = out
        return made[key]

    return get


CASES = [(f, fmt) for f in ("qwen2", "qwen3", "mistral", "smollm", "phi3") for fmt in ("gguf", "onnx", "onnx-plain")] + \
        [("qwen2", "executorch"), ("qwen3", "executorch"), ("phi3", "executorch")] + \
        [("llama3", "gguf"), ("llama3", "onnx"), ("llama3", "executorch"), ("linear", "gguf"), ("linear", "onnx")] + \
        [(f, fmt) for f in ("mistral-window", "qwen2-window") for fmt in ("onnx", "onnx-plain", "executorch")] + \
        [(f, fmt) for f in ("gemma2", "gemma3") for fmt in ("onnx", "onnx-plain", "gguf")] + \
        [("gemma2", "executorch"), ("gemma3", "executorch"), ("gemma3-scalar", "onnx"), ("gemma3-scalar", "executorch")]


@pytest.mark.parametrize("family, fmt", CASES)
def test_a_family_exports_with_parity_and_runs_greedy_as_torch(family_checkpoints, tmp_path, family, fmt):
    # setup
    ckpt = family_checkpoints(family)
    cfg = ExportConfig(format=fmt.split("-")[0], fuse=fmt != "onnx-plain")
    # execute
    with torch_threads(1):
        manifest = export(ckpt, tmp_path / fmt, cfg, log=lambda line: None)
    # assert: parity in the format's runtime, and greedy text through runtimes.load equals the torch runtime's
    assert manifest["parity"]["passed"], manifest["parity"]
    prompt = [1, *runtimes.load(ckpt).tokenizer.encode(PARITY_TEXT[:40])]
    want = list(runtimes.load(ckpt).generate(prompt, runtimes.GenerationConfig(max_new_tokens=16)))
    got = list(runtimes.load(tmp_path / fmt).generate(prompt, runtimes.GenerationConfig(max_new_tokens=16)))
    assert got == want


# ExecuTorch for Qwen2 only (its biases after XNNPACK's planes); Qwen3's norm is no Linear: the fp32 case covers it
@pytest.mark.parametrize("family, fmt", [("qwen2", "gguf"), ("qwen2", "onnx"), ("qwen2", "executorch"),
                                         ("qwen3", "gguf"), ("qwen3", "onnx"), ("phi3", "gguf"), ("gemma2", "onnx"),
                                         ("gemma3", "gguf"), ("gemma3", "executorch")])
def test_a_4bit_gptq_child_of_a_family_exports_with_parity(family_checkpoints, tmp_path, family, fmt):
    # setup
    ckpt = family_checkpoints(family, quantized=True)
    # execute
    with torch_threads(1):
        manifest = export(ckpt, tmp_path / fmt, ExportConfig(format=fmt), log=lambda line: None)
    # assert
    assert manifest["parity"]["passed"], manifest["parity"]
    assert manifest["quantization"]


def test_gguf_names_each_family_as_llama_cpp_does(family_checkpoints, tmp_path):
    import gguf

    # setup / execute
    archs, names = {}, {}
    for family in ("qwen2", "qwen3", "mistral", "phi3"):
        export(family_checkpoints(family), tmp_path / family, ExportConfig(format="gguf"), log=lambda line: None)
        reader = gguf.GGUFReader(str(tmp_path / family / "model.gguf"))
        archs[family] = reader.fields["general.architecture"].contents()
        names[family] = {t.name for t in reader.tensors}
    # assert: llama.cpp's architectures and tensor names (convert_hf_to_gguf.py writes Mistral as llama)
    assert archs == {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "phi3": "phi3"}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names["phi3"]
    assert not any(n.endswith(("attn_q.weight", "ffn_gate.weight")) for n in names["phi3"])
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names["qwen2"]
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names["qwen3"]
    assert not any("bias" in n or "_norm.weight" in n and "attn_q" in n for n in names["mistral"])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_head_pruning_a_family_keeps_its_biases_and_norms_and_exports(family_checkpoints, tmp_path, family):
    # setup
    ckpt = family_checkpoints(family)
    # execute
    compress_checkpoint(ckpt, tmp_path / "pruned", [parse_pass("prune:method=heads,ratio=0.5")],
                        calib_seq_len=64, eval_seq_len=64, eval_tokens=2048)
    pruned = load_checkpoint(tmp_path / "pruned")
    with torch_threads(1):
        manifest = export(tmp_path / "pruned", tmp_path / "onnx", ExportConfig(format="onnx"), log=lambda line: None)
        if family == "qwen3":
            gguf = export(tmp_path / "pruned", tmp_path / "gguf", ExportConfig(format="gguf"), log=lambda line: None)
        else:  # llama.cpp's qwen2 takes q/k/v as dim-wide: refused, not written wrong
            with pytest.raises(EdgesmithError, match=r"^gguf: 2 heads x head_dim 16 != dim 64 \(a head-pruned Qwen2\)"):
                export(tmp_path / "pruned", tmp_path / "gguf", ExportConfig(format="gguf"), log=lambda line: None)
    # assert: the family and its switches survive, each bias has a row per kept head, parity holds
    attn = pruned.model.layers[0].self_attn
    assert pruned.config.family == family and pruned.config.n_heads == 2
    if family == "qwen2":
        assert attn.q_proj.bias.shape == (2 * pruned.config.head_dim,)
    else:
        assert attn.q_norm.weight.shape == (pruned.config.head_dim,)
        assert gguf["parity"]["passed"], gguf["parity"]
    assert manifest["parity"]["passed"], manifest["parity"]


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "qat"])
def test_quantizing_qwen2_keeps_its_biases_float_and_its_quality(family_checkpoints, tmp_path, method):
    # setup
    spec = "qat:bits=4,steps=4" if method == "qat" else f"quantize:method={method},bits=4"
    # execute
    report = compress_checkpoint(family_checkpoints("qwen2"), tmp_path / "q", [parse_pass(spec)],
                                 calib_seq_len=64, eval_seq_len=64, eval_tokens=2048)
    q = load_checkpoint(tmp_path / "q").model
    float_model = load_checkpoint(family_checkpoints("qwen2")).model
    # assert: the codes replace the weight, the bias is the float model's (QAT trains it with the rest), the
    # output stays close to the float model's
    attn, ref = q.layers[0].self_attn, float_model.layers[0].self_attn
    assert attn.q_proj.qweight.dtype == torch.int8
    if method == "qat":
        assert torch.allclose(attn.q_proj.bias, ref.q_proj.bias, atol=0.01)
    else:
        assert torch.equal(attn.q_proj.bias, ref.q_proj.bias)
    assert report["quality"]["kl"] < 0.05, report["quality"]


@pytest.mark.parametrize("family", ["mistral-window", "qwen2-window", "phi3-window"])
def test_gguf_of_a_sliding_window_is_exact_within_it_and_refused_past_it(family_checkpoints, tmp_path, family):
    # setup: llama.cpp's llama and qwen2 architectures have no sliding window
    ckpt = family_checkpoints(family)
    window = load_checkpoint(ckpt, with_model=False).config.sliding_window
    # execute / assert: past the window, one line and no output
    with pytest.raises(EdgesmithError, match=rf"^gguf: sliding_window={window} binds past {window} tokens .* "
                                             rf"--max-seq-len {window} "):
        export(ckpt, tmp_path / "past", ExportConfig(format="gguf"), log=lambda line: None)
    assert not (tmp_path / "past").exists()
    # within it, the same numbers
    cfg = ExportConfig(format="gguf", max_seq_len=window, parity_positions=window // 2, greedy_steps=window // 2)
    with torch_threads(1):
        manifest = export(ckpt, tmp_path / "within", cfg, log=lambda line: None)
    assert manifest["parity"]["passed"] and manifest["options"]["max_seq_len"] == window


@pytest.mark.parametrize("dropped", [0, 1])
def test_layer_pruning_keeps_each_kept_layers_window(family_checkpoints, tmp_path, monkeypatch, dropped):
    import toolchain.compress.prune_structured as prune
    transformers = pytest.importorskip("transformers")
    # setup: Qwen2 with its window on layer 1 of 2; the layer scored lowest is the one dropped
    ckpt = family_checkpoints("qwen2-window")
    monkeypatch.setattr(prune, "layer_importance", lambda model, calib: torch.tensor([1.0, 1.0]).index_fill(
        0, torch.tensor([dropped]), 0.0))
    # execute
    compress_checkpoint(ckpt, tmp_path / "pruned", [parse_pass("prune:method=layers,ratio=0.5")],
                        calib_seq_len=64, eval_seq_len=64, eval_tokens=2048)
    pruned = load_checkpoint(tmp_path / "pruned")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(1))
    # assert: the kept layer keeps its window (or its full attention), and transformers computes the same model
    assert pruned.config.n_layers == 1
    assert pruned.config.window_of(0) == (12 if dropped == 0 else None)
    with torch.no_grad():
        assert torch.allclose(pruned.model(tokens), hf(tokens).logits, atol=1e-4)



def test_gguf_refuses_a_query_scale_llama_cpp_does_not_compute(family_checkpoints, tmp_path):
    # execute / assert: llama.cpp's gemma3 scales queries by 1/sqrt(head_dim); one line, nothing written
    with pytest.raises(EdgesmithError, match=r"^gguf: query_pre_attn_scalar=24: llama.cpp's gemma3 scales queries by "
                                             r"1/sqrt\(32\); export it to onnx or executorch$"):
        export(family_checkpoints("gemma3-scalar"), tmp_path / "g", ExportConfig(format="gguf"), log=lambda line: None)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("family", ["mistral-window", "gemma2"])  # custom_sdpa's ring; Gemma-2's soft-capped one
def test_executorch_keeps_sliding_layers_on_a_ring_of_window_plus_one_call(family_checkpoints, tmp_path, family,
                                                                           monkeypatch):
    import toolchain.export.formats.executorch as executorch_format

    # setup: 8 tokens per call, so a window of 16 keeps 24 positions of the 128 the export holds
    monkeypatch.setattr(executorch_format, "MAX_TOKENS_PER_CALL", 8)
    ckpt = family_checkpoints(family)
    cfg = load_checkpoint(ckpt, with_model=False).config
    prompt = [1, *runtimes.load(ckpt).tokenizer.encode(PARITY_TEXT)][:40]  # past the ring: it wraps
    want = list(runtimes.load(ckpt).generate(prompt, runtimes.GenerationConfig(max_new_tokens=24)))
    # execute
    with torch_threads(1):
        manifest = export(ckpt, tmp_path / "et", ExportConfig(format="executorch"), log=lambda line: None)
    session = runtimes.load(tmp_path / "et")
    got = list(session.generate(prompt, runtimes.GenerationConfig(max_new_tokens=24)))
    # assert: the ring and parity over 64 positions; greedy text as the torch runtime's past the ring
    assert manifest["options"]["ring_cache"] == {
        "layers": [i for i in range(cfg.n_layers) if cfg.window_of(i) is not None],
        "positions": cfg.sliding_window + 8}
    assert manifest["parity"]["passed"], manifest["parity"]
    assert got == want
    # a rewind of a call's length (speculative decoding's) reads the same again; a longer one is refused in one line
    session.prefill(prompt)
    first = session.extend(want[:6])
    session.rewind(len(prompt))
    assert np.array_equal(session.extend(want[:6]), first)
    with pytest.raises(EdgesmithError, match=r"^rewind: to 30 from 46 positions; this program's sliding layers keep "
                                             r"24 positions, a rewind of at most 8"):
        session.rewind(30)
