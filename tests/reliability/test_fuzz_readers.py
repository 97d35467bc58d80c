"""The reader fuzzer (scripts/fuzz_readers.py) at CI size: a fixed seed, 200 cases for each of the nine readers.

The property the issue sets: no case crashes (a traceback, a signal, an exit other than 0/2), none hangs (10 s),
no worker's peak RSS grows past 4x the largest input it was given, and the fuzzer is fuzzing (some cases are
refused, some still load). One run of the script serves every reader's test (about 2 minutes on 2 cores: ~30 s
to build the quick seeds, the rest cases). A crash it finds names its reproducer directory; the script's default
is the full scale (10,000 cases per reader). A selftest reader shows that the harness does catch each kind of
failure, so a clean run means clean readers, not a blind harness.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fuzz_readers.py"
READERS = ("gguf", "safetensors", "onnx", "pte", "manifest", "tokenizer", "config", "recipe", "profile")
CASES = 200


def fuzz(work: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    out = work / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.is_file(), f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, {r["reader"]: r for r in json.loads(out.read_text())["readers"]}


def describe(r: dict) -> str:
    crashes = "; ".join(f"{n}x {c}" for c, n in r["crash_classes"].items())
    return f"{r['reader']}: {crashes} (reproducers: {', '.join(r['findings'][:3])})"


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """Every reader, 200 cases each, seed 0; a reader stops after 5 crashes or hangs (enough to report them)."""
    return fuzz(tmp_path_factory.mktemp("fuzz"), "--cases", str(CASES), "--seed", "0", "--quick-seeds",
                "--max-findings", "5")


@pytest.mark.slow
@pytest.mark.parametrize("reader", READERS)
def test_a_reader_survives_its_fuzz_cases(fuzz_run, reader):
    # setup / execute: the module's one run of the script
    _, results = fuzz_run
    r = results[reader]
    # assert
    assert not r["harness_errors"], r["harness_errors"][0]
    assert r["crash"] == 0 and r["hang"] == 0, describe(r)
    assert r["cases"] == CASES
    assert r["bound_met"], (f"{reader}: peak RSS grew {r['growth_mb']} MB, more than 4x the largest input "
                            f"({r['largest_input_mb']} MB)")
    assert r["refused"] > 0 and r["ok"] > 0, f"{reader}: {r['refused']} refused, {r['ok']} loaded: not fuzzing"


@pytest.mark.slow
def test_the_exit_status_and_table_match_the_results(fuzz_run):
    # setup / execute: the module's one run of the script
    proc, results = fuzz_run
    clean = all(not (r["crash"] or r["hang"] or r["harness_errors"]) and r["bound_met"] for r in results.values())
    # assert
    assert proc.returncode == (0 if clean else 1), proc.stderr[-2000:]
    rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert set(READERS) <= rows
    for r in results.values():
        assert sum(r["classes"].values()) == r["refused"]


@pytest.mark.slow
def test_the_harness_catches_every_kind_of_failure(tmp_path):
    # setup: the selftest reader does, case by case: load, refuse, raise, abort, hang, allocate 64 MB, refuse in
    # two lines
    # execute
    proc, results = fuzz(tmp_path, "--readers", "_selftest", "--cases", "7", "--hang-s", "2", timeout=300)
    r = results["_selftest"]
    # assert
    assert proc.returncode == 1
    assert (r["cases"], r["ok"], r["refused"], r["crash"], r["hang"]) == (7, 2, 1, 3, 1)
    assert list(r["classes"]) == ["case.bin: refused, first byte N"]
    assert any(c.startswith("RuntimeError") for c in r["crash_classes"])
    assert any(c.startswith("worker killed by SIGABRT") for c in r["crash_classes"])
    assert any("multi-line" in c for c in r["crash_classes"])
    assert any(c.startswith("no answer in 2 s") for c in r["crash_classes"])
    assert r["restarts"] == 4 and len(r["findings"]) == 4
    for finding in map(Path, r["findings"]):
        assert (finding / "finding.json").is_file() and (finding / "case" / "case.bin").is_file()
    assert r["growth_mb"] >= 60 and not r["bound_met"]
