"""GGUF export: RoPE row permutation, GGUFReader round trip, llama.cpp parity."""

import numpy as np
import pytest
import torch

from models.llama import apply_rope, rope_tables
from toolchain.export import ExportConfig, export
from toolchain.export.formats.gguf import gguf_tensors, permute_rope_rows


def llama_cpp_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's normal (LLAMA_ROPE_TYPE_NORM) RoPE: rotate adjacent pairs (x0, x1), (x2, x3), ..."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    c, s = torch.cos(pos * inv), torch.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_permuted_rows_under_llama_cpp_rope_equal_hf_rope(n_heads):
    # setup: a projection W and an input x; HF rotates halves of W x, llama.cpp adjacent pairs of W' x
    torch.manual_seed(0)
    hd, dim, pos = 16, 32, 7
    w, x = torch.randn(n_heads * hd, dim), torch.randn(dim)
    cos, sin = rope_tables(hd, pos + 1, 10000.0)
    # execute
    hf = apply_rope((w @ x).view(1, n_heads, 1, hd), cos[pos:pos + 1], sin[pos:pos + 1]).flatten()
    ours = llama_cpp_rope((permute_rope_rows(w, n_heads) @ x).view(n_heads, hd), pos, 10000.0).flatten()
    # assert: the same rotated vector, up to the same per-head row order llama.cpp uses for its cache
    perm = permute_rope_rows(torch.arange(n_heads * hd).float()[:, None], n_heads).flatten().long()
    torch.testing.assert_close(ours, hf[perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gguf_exports_reads_back_and_matches_torch_in_llama_cpp(float_checkpoint, tmp_path, precision):
    import gguf

    from models.checkpoint import load_checkpoint
    from runtimes.artifact import read_manifest

    # execute
    out = tmp_path / f"gguf-{precision}"
    manifest = export(float_checkpoint, out, ExportConfig(format="gguf", precision=precision))
    # assert: parity in llama.cpp, greedy identical
    p = manifest["parity"]
    assert p["passed"] and p["greedy_matched"] == p["greedy_steps"] == 32 and p["argmax_agreement"] == 1.0
    assert p["max_abs_logit_diff"] < (1e-4 if precision == "fp32" else 2e-2) * p["max_abs_reference_logit"]
    assert read_manifest(out, "gguf")["files"].keys() == {"model.gguf", "tokenizer.json", "tokenizer_config.json"}
    # assert: GGUFReader sees exactly what was written
    ckpt = load_checkpoint(float_checkpoint)
    expected = gguf_tensors(ckpt.model, precision)
    reader = gguf.GGUFReader(out / "model.gguf")
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert got.keys() == expected.keys()
    for name, (array, raw_dtype) in expected.items():
        assert raw_dtype is None
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.bos_token_id") == ckpt.tokenizer.bos_id
    assert field("tokenizer.ggml.eos_token_id") == ckpt.tokenizer.eos_id
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == ckpt.config.vocab_size
    vocab = ckpt.tokenizer.tok.get_vocab(with_added_tokens=True)
    assert all(tokens[i] == t for t, i in vocab.items())
    assert len(field("tokenizer.ggml.merges")) > 0
    assert field("llama.attention.head_count_kv") == ckpt.config.n_kv_heads
