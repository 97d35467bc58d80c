"""TensorRT: the TensorRT-ready ONNX (parsed-op set, profiles, parity in ONNX Runtime), and the
engine builder type-checked against the published TensorRT API (`tensorrt-stubs`) with mypy.

No machine here has TensorRT, so the build itself cannot run; everything up to it does. The
stubs come from `pip install --no-deps --target ~/.cache/edgesmith/tensorrt-stubs
tensorrt-stubs==10.13.0.35.1` (a target directory, not site-packages: the wheel ships
`tensorrt/__init__.pyi` without a package, which would make a bare `import tensorrt` succeed).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from toolchain.export import ExportConfig, export
from toolchain.export.tensorrt_engine import EngineShapes, unavailable_reason

STUBS = Path(os.environ.get("EDGESMITH_TENSORRT_STUBS", Path.home() / ".cache/edgesmith/tensorrt-stubs"))
ENGINE = Path(__file__).parents[3] / "toolchain/export/tensorrt_engine.py"

# Ops TensorRT 10's ONNX parser supports that the plain graph uses (onnx-tensorrt docs/operators.md).
TRT_PARSED_OPS = {"Add", "Cast", "Concat", "Gather", "LessOrEqual", "MatMul", "Mul", "Neg", "Range", "Reciprocal",
                  "ReduceMean", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Sqrt", "Transpose",
                  "Unsqueeze", "Where", "Identity"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_ready_onnx_exports_and_stops_before_the_engine(float_checkpoint, tmp_path, precision):
    # execute
    lines = []
    out = tmp_path / "trt"
    manifest = export(float_checkpoint, out, ExportConfig(format="tensorrt", precision=precision, max_seq_len=64),
                      log=lines.append)
    # assert: standard ops TensorRT parses, opset 17, and parity of that graph in ONNX Runtime
    model = onnx.load(str(out / "model.onnx"))
    assert {n.op_type for n in model.graph.node} <= TRT_PARSED_OPS and {n.domain for n in model.graph.node} == {""}
    assert [o.version for o in model.opset_import] == [17]
    p = manifest["parity"]
    assert p["passed"] and p["greedy_matched"] == 32 and p["checked_file"] == "model.onnx"
    # assert: here the engine is skipped with one line that says why
    if unavailable_reason() is not None:
        assert manifest["entry"] == "model.onnx" and manifest["options"]["engine"] is None
        assert lines == [f"tensorrt: {unavailable_reason()}; wrote the TensorRT-ready model.onnx"]
        assert "model.plan" not in manifest["files"]
    else:
        assert manifest["entry"] == "model.plan" and (out / "model.plan").stat().st_size > 0


def test_engine_profiles_cover_prefill_and_decode():
    # setup / execute
    profiles = EngineShapes(max_seq_len=64, n_layers=2, n_kv_heads=2, head_dim=16).profiles()
    # assert
    assert profiles["prefill"]["input_ids"] == ((1, 1), (1, 64), (1, 64))
    assert profiles["prefill"]["past_key_values.1.value"] == ((1, 2, 0, 16),) * 3
    assert profiles["decode"]["input_ids"] == ((1, 1),) * 3
    assert profiles["decode"]["past_key_values.0.key"] == ((1, 2, 1, 16), (1, 2, 32, 16), (1, 2, 63, 16))
    assert len(profiles["decode"]) == 1 + 2 * 2


def patched_stubs(dest: Path) -> Path:
    """A copy of the published stubs that mypy can parse.

    tensorrt-stubs 10.13 is generated from the pybind11 signatures and has syntax errors in
    methods this project never calls: plugin methods with a parameter named `in`, and
    `add_scale_nd` with a required parameter after defaulted ones. Those lines are rewritten
    mechanically (`in` -> `in_`, defaults dropped); every other line is used as published.
    """
    shutil.copytree(STUBS, dest)
    pyi = dest / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", pyi.read_text())
    text = re.sub(r"(def add_scale_nd\(.*?)\) ->", lambda m: m.group(1).replace(" = None", "") + ") ->", text)
    pyi.write_text(text)
    (dest / "tensorrt_libs.pyi").write_text("")
    # The stubs' own lint findings (untyped plugin helpers) are not ours to fix; our code is --strict.
    (dest / "mypy.ini").write_text("[mypy]\n" + "".join(f"[mypy-{m}]\nignore_errors = True\n" for m in
                                                         ("tensorrt", "tensorrt.*", "tensorrt_bindings",
                                                          "tensorrt_bindings.*", "tensorrt_libs")))
    return dest


def mypy(stubs: Path, *files: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(stubs / "mypy.ini"), "--strict",
                           "--follow-imports=silent", "--cache-dir", str(stubs.parent / "mypy-cache"),
                           *map(str, files)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    if not (STUBS / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.skip(f"tensorrt-stubs not found at {STUBS} (see this module's docstring)")
    return patched_stubs(tmp_path_factory.mktemp("stubs") / "trt")


@pytest.mark.slow  # mypy reads the 10k-line stubs and typeshed cold: about 20-60 s
def test_engine_builder_type_checks_against_tensorrt_stubs(stubs):
    # execute
    result = mypy(stubs, ENGINE)
    # assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout


def test_type_check_catches_tensorrt_api_misuse(stubs, tmp_path):
    # setup: calls that TensorRT 10 removed or never had
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import tensorrt as trt\n\n\n"
        "def build(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:\n"
        "    builder.build_engine(network, config)\n"
        "    config.max_workspace_size = 1 << 30\n"
        "    builder.create_optimization_profile().set_shape('input_ids', 1, 2)\n")
    # execute
    result = mypy(stubs, bad)
    # assert
    assert result.returncode == 1
    assert 'has no attribute "build_engine"' in result.stdout
    assert 'has no attribute "max_workspace_size"' in result.stdout
    assert "set_shape" in result.stdout


def test_two_four_pruned_lineage_asks_the_engine_for_sparse_weights(float_checkpoint, tmp_path):
    # setup: the float checkpoint pruned 2:4, with that pass in its lineage
    from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
    from toolchain.compress import apply, config_to_dict, kind_of, parse_pass

    parent = load_checkpoint(float_checkpoint)
    cfg = parse_pass("prune:method=2:4")
    pruned = apply(parent.model, cfg)
    step = {"kind": kind_of(cfg), "config": config_to_dict(cfg)}
    path = save_checkpoint(pruned, parent.tokenizer, tmp_path / "pruned", child_lineage(parent, step))
    # execute
    sparse = export(path, tmp_path / "trt-sparse", ExportConfig(format="tensorrt", max_seq_len=64))
    dense = export(float_checkpoint, tmp_path / "trt-dense", ExportConfig(format="tensorrt", max_seq_len=64))
    # assert: the engine build is told to use 2:4 tactics only for the pruned model
    assert sparse["options"]["sparse_weights"] is True and sparse["parity"]["passed"]
    assert dense["options"]["sparse_weights"] is False
