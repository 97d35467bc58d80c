"""ONNX lowering: a model after `kernels.fuse_(model)` exports with the dynamo exporter and the
translation table of kernels/onnx.py to ONNX Runtime contrib ops, and ONNX Runtime's logits match the
reference model's; the hand-built fused graph takes its contrib op names from the same table."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kernels
from kernels.onnx import CONTRIB_OPS, MS, translation_table
from models.llama import ModelConfig, Transformer
from models.quant import quantize_linear_
from toolchain.export import onnx_graph


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # setup: 4-bit MLP, 8-bit attention projections, float lm_head
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    model = Transformer(cfg).eval()
    quantize_linear_(model, 4, 32, include=lambda n: "mlp" in n)
    quantize_linear_(model, 8, 32, include=lambda n: "self_attn" in n)
    tokens = torch.randint(0, cfg.vocab_size, (1, 11))
    path = tmp_path_factory.mktemp("fused-onnx") / "model.onnx"
    # execute
    kernels.fuse_(model)
    program = torch.onnx.export(model, (tokens,), dynamo=True, custom_translation_table=translation_table(),
                                dynamic_shapes=({1: torch.export.Dim("T", max=64)},), verbose=False)
    program.save(str(path))
    return kernels.unfuse_(model), path


def test_fused_export_uses_the_contrib_ops(exported):
    _, path = exported
    ops = {(n.op_type, n.domain) for n in onnx.load(str(path)).graph.node}
    for key in ("rms_norm", "add_rms_norm", "rope", "flash_attention", "weight_only_matmul"):
        assert (CONTRIB_OPS[key].op_type, CONTRIB_OPS[key].domain) in ops, key
    assert not any(d == "pkg.edgesmith" or t.startswith("edgesmith") for t, d in ops)


@pytest.mark.parametrize("T", [1, 11, 30])
def test_onnxruntime_matches_the_reference_model(exported, T):
    # setup
    model, path = exported
    tokens = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # execute
    got = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0]
    with torch.inference_mode():
        expected = model(tokens).numpy()  # the reference path (unfused)
    # assert: fp32 end to end; ORT's MatMulNBits / GQA reorder sums (tests/kernels/test_ops.py tolerances)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_hand_built_graph_names_come_from_the_table():
    assert onnx_graph.MATMUL_NBITS == CONTRIB_OPS["weight_only_matmul"].op_type == "MatMulNBits"
    assert onnx_graph.GQA == CONTRIB_OPS["flash_attention"].op_type == "GroupQueryAttention"
    assert onnx_graph.ROTARY == "RotaryEmbedding" and onnx_graph.SKIP_NORM == "SkipSimplifiedLayerNormalization"
    assert onnx_graph.MS == MS
