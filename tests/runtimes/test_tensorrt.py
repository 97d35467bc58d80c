"""The TensorRT backend: it cannot run here (no `tensorrt`, no GPU), so it is type-checked against
the published TensorRT API (`tensorrt-stubs`, see tests/toolchain/export/test_tensorrt.py) with mypy,
and the check is shown to catch API misuse. Where TensorRT runs, the engine test below runs instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import runtimes
from runtimes import GenerationConfig
from runtimes.backends.tensorrt import unavailable_reason
from tests.toolchain.export.test_tensorrt import STUBS, patched_stubs

BACKEND = Path(__file__).parents[2] / "runtimes/backends/tensorrt.py"
# Our own modules, torch and numpy are not what is checked here: skipped (Any), so mypy reads only
# this backend and the TensorRT stubs.
SKIPPED = "torch,torch.*,numpy,numpy.*,models.*,runtimes.session,runtimes.artifact"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install mypy)")
    if not (STUBS / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.skip(f"tensorrt-stubs not found at {STUBS} (see tests/toolchain/export/test_tensorrt.py)")
    dest = patched_stubs(tmp_path_factory.mktemp("stubs") / "trt")
    ini = dest / "mypy.ini"
    ini.write_text(ini.read_text() + f"[mypy-{SKIPPED}]\nfollow_imports = skip\n")
    return dest


def mypy(stubs: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(stubs / "mypy.ini"),
                           "--follow-imports=silent", "--disallow-untyped-defs", "--cache-dir",
                           str(stubs.parent / "mypy-cache"), str(path)],
                          capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(stubs)}, timeout=300)


def test_the_backend_type_checks_against_the_tensorrt_api(stubs, tmp_path):
    # setup: the same file with three calls TensorRT 10 does not have
    bad = tmp_path / "misused.py"
    bad.write_text(BACKEND.read_text()
                   .replace("ctx.execute_async_v3(stream)", "ctx.execute_async_v2(stream)")
                   .replace("self.engine.num_io_tensors", "self.engine.num_bindings")
                   .replace('ctx.set_input_shape("input_ids", (1, T))', 'ctx.set_input_shape("input_ids", 1, T)'))
    # execute
    good, misused = mypy(stubs, BACKEND), mypy(stubs, bad)
    # assert
    assert good.returncode == 0, good.stdout + good.stderr
    assert misused.returncode == 1
    for message in ('has no attribute "execute_async_v2"', 'has no attribute "num_bindings"', "set_input_shape"):
        assert message in misused.stdout


@pytest.mark.skipif(unavailable_reason() is not None, reason=f"tensorrt cannot run here: {unavailable_reason()}")
def test_engine_greedy_equals_torch(checkpoints, tmp_path, prompt):
    from toolchain.export import ExportConfig, export

    # setup: where tensorrt imports, the exporter builds model.plan
    export(checkpoints["float"], tmp_path / "trt", ExportConfig(format="tensorrt"))
    engine, reference = runtimes.load(tmp_path / "trt"), runtimes.load(checkpoints["float"])
    # execute
    cfg = GenerationConfig(max_new_tokens=32)
    tokens, expected = list(engine.generate(prompt, cfg)), list(reference.generate(prompt, cfg))
    # assert
    assert engine.backend == "tensorrt" and tokens == expected
