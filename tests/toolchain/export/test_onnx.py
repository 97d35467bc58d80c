"""ONNX export: fused (contrib ops) and plain graphs, fp32 and fp16, parity in ONNX Runtime."""

import onnx
import pytest

from runtimes.artifact import read_manifest
from toolchain.export import ExportConfig, export


def op_types(path):
    model = onnx.load(str(path), load_external_data=False)
    return {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_graph_runs_in_onnxruntime_with_parity(float_checkpoint, tmp_path, fuse, precision):
    # execute
    out = tmp_path / "onnx"
    manifest = export(float_checkpoint, out, ExportConfig(format="onnx", precision=precision, fuse=fuse,
                                                          max_seq_len=96))
    # assert: parity
    p = manifest["parity"]
    assert p["passed"] and p["greedy_matched"] == 32 and p["argmax_agreement"] == 1.0
    assert p["max_abs_logit_diff"] < (1e-4 if precision == "fp32" else 1e-2) * p["max_abs_reference_logit"]
    assert read_manifest(out, "onnx")["options"]["graph"] == ("fused" if fuse else "plain")
    # assert: the graph is what it claims to be
    ops = op_types(out / "model.onnx")
    fused = {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "RotaryEmbedding"),
             ("com.microsoft", "SkipSimplifiedLayerNormalization"), ("ai.onnx", "SimplifiedLayerNormalization")}
    if fuse:
        assert fused <= ops
        assert ("ai.onnx", "Softmax") not in ops and ("ai.onnx", "Concat") not in ops  # the cache is never concatenated
    else:
        assert {d for d, _ in ops} == {"ai.onnx"} and ("ai.onnx", "Softmax") in ops
        onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_large_weights_go_to_external_data(float_checkpoint, tmp_path, monkeypatch):
    import toolchain.export.formats.onnx as onnx_export

    # setup: treat the tiny model as large
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    # execute
    manifest = export(float_checkpoint, tmp_path / "onnx", ExportConfig(format="onnx", max_seq_len=64))
    # assert
    assert manifest["options"]["external_data"] is True and "model.onnx.data" in manifest["files"]
    assert manifest["files"]["model.onnx"]["bytes"] < manifest["files"]["model.onnx.data"]["bytes"]
    assert manifest["parity"]["passed"]


def test_fused_decode_writes_the_cache_in_place(float_checkpoint, tmp_path):
    import numpy as np

    from runtimes.backends.onnxruntime import OnnxRuntimeBackend

    # setup
    export(float_checkpoint, tmp_path / "onnx", ExportConfig(format="onnx", max_seq_len=64))
    rt = OnnxRuntimeBackend(tmp_path / "onnx")
    buffers = {n: v.data_ptr() for n, v in rt.cache.items()}
    # execute: prefill 5 tokens then decode 3, against one prefill of all 8
    ids = [1, 40, 41, 42, 43, 44, 45, 46]
    steps = [rt.prefill(ids[:5])[-1]] + [rt.decode(t) for t in ids[5:]]
    whole = rt.prefill(ids)
    # assert: same logits either way, and the cache never moved
    np.testing.assert_allclose(np.stack(steps), whole[4:], atol=1e-5)
    assert {n: v.data_ptr() for n, v in rt.cache.items()} == buffers
    assert not np.all(rt.cache["0.key"].numpy()[0, :, :8] == 0) and np.all(rt.cache["0.key"].numpy()[0, :, 8:] == 0)
