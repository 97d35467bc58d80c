"""The recipe pipeline, run for real: end to end, caching, one changed pass, a killed run resumed,
a two-process training step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtimes.artifact import read_manifest
from tests.toolchain.conftest import edgesmith
from toolchain.pipeline import MARKER, run_pipeline
from toolchain.recipe import load_recipe

STEPS = ["00-train", "01-prune-magnitude", "02-quantize-rtn", "gguf", "onnx", "local.json", "report.html"]


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _mtimes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("run.json", ".lock")}


def test_tiny_recipe_runs_end_to_end(tiny_run):
    # setup / execute
    out, result = tiny_run
    # assert
    assert result.returncode == 0, result.stderr[-3000:]
    run = _run_json(out)
    assert [s["name"] for s in run["steps"]] == STEPS
    assert not any(s["cached"] for s in run["steps"]) and run["did_work"]
    for d in ("checkpoints/00-train", "checkpoints/01-prune-magnitude", "checkpoints/02-quantize-rtn"):
        assert (out / d / "model.safetensors").is_file() and (out / d / MARKER).is_file()
    meta = json.loads((out / "checkpoints/02-quantize-rtn/edgesmith.json").read_text())
    assert [p["kind"] for p in meta["lineage"]["passes"]] == ["train", "prune", "quantize"]
    for fmt in ("gguf", "onnx"):
        m = read_manifest(out / "artifacts" / fmt)  # sha256 of every file checked
        assert m["parity"]["passed"] is True
    bench = json.loads((out / "bench/local.json").read_text())
    assert [r["format"] for r in bench] == ["gguf", "onnx"]
    assert all(r["decode_tok_s"]["median"] > 0 and r["repeat"] == 2 for r in bench)
    assert (out / "recipe.toml").is_file() and (out / "report.html").is_file() and (out / "report.md").is_file()
    assert "Export parity" in result.stdout and "Bench on local (measured)" in result.stdout
    assert "[1/5 source] 1/1 00-train" in result.stdout and "ETA" in result.stdout
    assert not list(out.rglob(".*.tmp-*")), "no temporary debris"


def test_second_run_does_no_work(tiny_run):
    # setup
    out, first = tiny_run
    assert first.returncode == 0
    before = _mtimes(out)
    # execute
    again = edgesmith("run", out / "recipe.toml", "--out", out)
    # assert
    assert again.returncode == 0, again.stderr[-2000:]
    run = _run_json(out)
    assert all(s["cached"] for s in run["steps"]) and not run["did_work"]
    assert f"{len(STEPS)} steps, 0 to run" in again.stdout
    assert _mtimes(out) == before, "no output file was rewritten"


def test_one_changed_pass_reruns_only_it_and_what_follows(tiny_run, tmp_path):
    # setup: a copy of the finished run (keys do not depend on where the run directory is)
    out, first = tiny_run
    assert first.returncode == 0
    copy = tmp_path / "tiny"
    shutil.copytree(out, copy)
    before = _mtimes(copy)
    events = []
    # execute
    recipe = load_recipe(copy / "recipe.toml", ["pass[1].bits=8"])
    summary = run_pipeline(recipe, copy, progress=events.append, echo=False)
    # assert
    cached = {s["name"]: s["cached"] for s in summary["steps"]}
    assert cached == {"00-train": True, "01-prune-magnitude": True, "02-quantize-rtn": False, "gguf": False,
                      "onnx": False, "local.json": False, "report.html": False}
    after = _mtimes(copy)
    for kept in ("checkpoints/00-train/model.safetensors", "checkpoints/01-prune-magnitude/model.safetensors"):
        assert after[kept] == before[kept]
    meta = json.loads((copy / "checkpoints/02-quantize-rtn/edgesmith.json").read_text())
    assert {w["bits"] for w in meta["quantization"]["weights"].values()} == {8}
    assert json.loads((copy / "bench/local.json").read_text())[0]["precision"] == "int8"
    # progress: one event stream for the whole run
    assert {"stage", "step", "total", "eta_s", "message"} <= set(events[0])
    assert [e["stage"] for e in events][0] == "source" and events[-1]["stage"] == "report"
    assert all(e["total"] == len(STEPS) for e in events)


def test_killed_run_resumes_from_its_last_completed_step(tiny_recipe, tmp_path):
    # setup: start a run, SIGKILL it as soon as its first step is complete
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    args = ["run", str(tiny_recipe), "--out", str(out), "--set", "target.bench=false"]
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = out / "checkpoints" / "00-train" / MARKER
    deadline = time.monotonic() + 300
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file(), "the first step completed before the kill"
    assert not (out / "report.html").exists(), "killed before the run finished"
    first_key = json.loads(marker.read_text())["key"]
    weights = (out / "checkpoints/00-train/model.safetensors").stat().st_mtime_ns
    # execute
    again = edgesmith(*args)
    # assert
    assert again.returncode == 0, again.stderr[-2000:]
    run = _run_json(out)
    assert run["steps"][0]["cached"] and run["steps"][0]["key"] == first_key
    assert all(not s["cached"] for s in run["steps"][3:])
    assert (out / "checkpoints/00-train/model.safetensors").stat().st_mtime_ns == weights
    assert (out / "report.html").is_file() and not list(out.rglob(".*.tmp-*"))
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())


def test_two_process_training_step(tiny_recipe, tmp_path):
    # setup: the demo's shape (2 ranks under torchrun), made tiny; no passes, one export, no bench
    recipe = tmp_path / "ddp.toml"
    text = tiny_recipe.read_text().replace("nproc = 1", "nproc = 2").replace("steps = 20", "steps = 4")
    recipe.write_text(text.split("[[pass]]")[0] + "[export]\nformats = [\"gguf\"]\n[target]\nbench = false\n")
    # execute
    result = edgesmith("run", recipe, "--out", tmp_path / "ddp")
    # assert
    assert result.returncode == 0, result.stderr[-3000:]
    info = _run_json(tmp_path / "ddp")["steps"][0]["info"]
    assert info["world_size"] == 2 and info["steps"] == 4
    assert (tmp_path / "ddp/checkpoints/00-train/train_metrics.jsonl").is_file()
    assert not (tmp_path / "ddp/.work").exists() or not any((tmp_path / "ddp/.work").iterdir())
