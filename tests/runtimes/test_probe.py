"""runtimes/probe.py: a .pte program this machine has not seen run is run once in a forked child first."""

import json

import pytest

import runtimes
from models.errors import EdgesmithError
from runtimes import probe
from tests.reliability.test_fuzz_regressions import copy_with, edited_program, non_tensor_argument


def sha256(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    return manifest["files"][manifest["entry"]]["sha256"]


def test_an_exported_program_is_remembered_and_loads_without_a_probe(artifact, monkeypatch):
    # setup: the exporter's marker; any probe would fail
    d = artifact("executorch")
    monkeypatch.setattr(probe, "_ask", lambda *a: pytest.fail("probed a program edgesmith exported"))
    # execute
    session = runtimes.load(d)
    # assert
    marker = probe.probed_dir() / sha256(d)
    assert json.loads(marker.read_text())["source"] == "export"
    assert len(session.prefill([1, 2, 3])) == 3


def test_a_program_not_seen_here_is_probed_once_then_remembered(artifact, tmp_path, monkeypatch):
    # setup: a cache that has never seen the program
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    d = artifact("executorch")
    assert not probe.is_probed(sha256(d))
    # execute
    runtimes.load(d)
    # assert: remembered by the probe; the second load does not probe again
    assert json.loads((probe.probed_dir() / sha256(d)).read_text())["source"] == "probe"
    monkeypatch.setattr(probe, "_ask", lambda *a: pytest.fail("probed twice"))
    assert runtimes.load(d).decode(1).shape[-1] > 0


def test_a_program_that_aborts_executorch_is_refused_and_this_process_lives_on(artifact, tmp_path, monkeypatch):
    # setup: a kernel argument of the wrong type (ExecuTorch's evalue.h aborts the process on it)
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", edited_program(src, non_tensor_argument))
    # execute
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    # assert: one line naming the file, the signal and ExecuTorch's diagnostic; not remembered
    msg = str(e.value)
    assert "\n" not in msg and str(d / "model.pte") in msg
    assert "SIGABRT" in msg and "EValue is not a Tensor" in msg
    assert not probe.is_probed(sha256(d))


def test_a_probe_that_does_not_finish_is_refused(artifact, tmp_path, monkeypatch):
    # setup: a probe with no time to finish
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache"))
    d = artifact("executorch")
    # execute
    with pytest.raises(EdgesmithError, match="did not load and run the program within 0 s"):
        probe.probe(d / "model.pte", sha256(d), timeout=0.001)
    # assert
    assert not probe.is_probed(sha256(d))
