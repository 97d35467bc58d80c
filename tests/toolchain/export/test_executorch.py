"""ExecuTorch export: XNNPACK-lowered .pte with the static KV cache as mutable buffers."""

import numpy as np
import pytest

from toolchain.export import ExportConfig, export


@pytest.mark.slow  # lowering to XNNPACK takes 15-50 s per export on two shared cores
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_pte_runs_in_executorch_runtime_with_parity(float_checkpoint, tmp_path, precision):
    from runtimes.executorch import ExecuTorchBackend

    # execute
    out = tmp_path / "et"
    manifest = export(float_checkpoint, out, ExportConfig(format="executorch", precision=precision, max_seq_len=64))
    # assert: parity through executorch.runtime
    p = manifest["parity"]
    assert p["passed"] and p["greedy_matched"] == 32 and p["argmax_agreement"] == 1.0
    assert p["max_abs_logit_diff"] < (1e-4 if precision == "fp32" else 1e-2) * p["max_abs_reference_logit"]
    assert {"model.pte", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["versions"]["executorch"] != "not installed"
    # assert: the cache persists in the program's buffers: prefill 5 + decode 3 == prefill 8
    rt = ExecuTorchBackend(out)
    ids = [1, 40, 41, 42, 43, 44, 45, 46]
    steps = [rt.prefill(ids[:5])[-1]] + [rt.decode(t) for t in ids[5:]]
    np.testing.assert_allclose(np.stack(steps), rt.prefill(ids)[4:], atol=1e-4 if precision == "fp32" else 2e-2)
