"""ONNX Runtime specifics: session options set on purpose, the fused cache written in place through
multi-token calls and rollbacks, and the MatMulNBits accuracy-level override (int8 activations)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtimes
from models.checkpoint import load_checkpoint
from toolchain.export.parity import check_parity, torch_threads


def test_session_options_are_set_on_purpose(artifact):
    # setup / execute
    tiny = runtimes.load(artifact("onnx"))
    four = runtimes.load(artifact("onnx"), n_threads=2)
    # assert: one thread for a tiny model unless asked, every graph optimization
    for session, threads in ((tiny, 1), (four, 2)):
        so = session.session.get_session_options()
        assert so.intra_op_num_threads == threads and so.inter_op_num_threads == 1
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_the_fused_cache_never_moves_through_extend_and_rewind(artifact, prompt):
    # setup
    session = runtimes.load(artifact("onnx"))
    buffers = {n: v.data_ptr() for n, v in session.cache.items()}
    # execute: a speculative-style round: prefill, extend 4, roll back 2, decodes
    session.prefill(prompt[:10])
    session.extend(prompt[10:14])
    session.rewind(12)
    first = session.decode(prompt[12])
    kept = first.copy()
    session.decode(prompt[13])
    # assert: the same buffers, written in place; an earlier result is not overwritten by the next step
    assert {n: v.data_ptr() for n, v in session.cache.items()} == buffers
    np.testing.assert_array_equal(first, kept)
    k = session.cache["0.key"].numpy()[0]
    assert np.any(k[:, :14] != 0) and np.all(k[:, 14:] == 0)


def test_accuracy_level_4_runs_int8_activations_within_the_int4_threshold(artifact, checkpoints, tokenizer):
    # setup: the 4-bit graph is stored with accuracy_level=0; its manifest says to run it at 4 (verified at export)
    path = artifact("onnx-q4")
    stored = {a.i for n in onnx.load(str(path / "model.onnx")).graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    reference = load_checkpoint(checkpoints["q4"]).model
    exact, fast = runtimes.load(path, accuracy_level=0), runtimes.load(path)
    assert (exact.run_options["accuracy_level"], fast.run_options["accuracy_level"]) == (0, 4)
    # execute
    with torch_threads(1):
        p_exact = check_parity(reference, exact, tokenizer, "fp32")
        p_fast = check_parity(reference, fast, tokenizer, "int4")
    # assert: the override changed the numerics (and not the file), within the int4 threshold
    assert stored == {0} and p_exact["passed"] and p_fast["passed"]
    assert p_fast["max_abs_logit_diff"] > 10 * p_exact["max_abs_logit_diff"]
    assert p_fast["argmax_agreement"] >= 0.9


def test_accuracy_level_on_a_float_graph_changes_nothing(artifact, prompt):
    a, b = runtimes.load(artifact("onnx")), runtimes.load(artifact("onnx"), accuracy_level=4)
    np.testing.assert_array_equal(a.prefill(prompt), b.prefill(prompt))


@pytest.mark.parametrize("name", ["onnx", "onnx-plain"])
def test_decode_returns_fresh_arrays(name, artifact, prompt):
    session = runtimes.load(artifact(name))
    session.prefill(prompt[:3])
    a = session.decode(prompt[3])
    b = session.decode(prompt[4])
    assert not np.shares_memory(a, b)


def test_accuracy_level_override_finds_external_data(checkpoints, tmp_path, monkeypatch, prompt):
    import toolchain.export.formats.onnx as onnx_export
    from toolchain.export import ExportConfig, export

    # setup: the 4-bit graph with its weights in model.onnx.data (as a large model's are)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    with torch_threads(1):
        manifest = export(checkpoints["q4"], tmp_path / "onnx", ExportConfig(format="onnx"), log=lambda line: None)
    assert "model.onnx.data" in manifest["files"]
    # execute: the graph is rewritten in memory; ORT must still read the weights beside the file
    fast = runtimes.load(tmp_path / "onnx")  # accuracy_level=4, from the manifest
    exact = runtimes.load(tmp_path / "onnx", accuracy_level=0)
    # assert: it runs, with int8-activation numerics (close to, not equal to, the stored level's)
    a, b = fast.prefill(prompt), exact.prefill(prompt)
    assert 0 < np.abs(a - b).max() < 0.1 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
