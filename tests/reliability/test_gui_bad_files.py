"""The GUI as an entry point for bad files, against one real `edgesmith gui` (tests/gui/harness.py).

Bad checkpoints and artifacts (the corruptions of test_bad_files.py: a corrupt safetensors, a truncated
GGUF, a corrupt ONNX resealed into its manifest, a bad tokenizer.json, manifest.json, config.json and
summary.json) are put in the workspace and used from every tab that reads such files: the Playground
(in the server), Export, Compress and Benchmark (background `edgesmith` jobs), Devices (the planner,
in the server) and Runs. Each answer is one line naming the bad file ("Refused: ..." or the failed
job's `edgesmith: error: ...` line), no traceback reaches the page, nothing is written where an
output was asked for, and the server goes on serving: a good request afterwards works.
"""

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.gui.harness import fill_workspace, start_gui, stop_gui
from tests.reliability.test_bad_files import make_bad

JOB_S = 180.0


@pytest.fixture(scope="module")
def gui(tmp_path_factory, checkpoints, artifact):  # noqa: F811
    ws = fill_workspace(tmp_path_factory.mktemp("gui-bad") / "workspace", checkpoints, artifact)
    good = {"checkpoint": checkpoints["float"], "gguf": artifact("gguf"), "onnx": artifact("onnx")}

    def bad(name: str, source: str, file: str, corruption: str, reseal: bool = False):
        """(workspace path of a copy of `source` with `file` corrupted, the bad file's absolute path)."""
        directory, bad_file = make_bad(good[source], ws / "bad" / name, file, corruption, reseal)
        return str(directory.relative_to(ws)), bad_file

    proc, url, log = start_gui(ws)
    yield SimpleNamespace(proc=proc, url=url, ws=ws, bad=bad)
    stop_gui(proc, ws)


@pytest.fixture(scope="module")
def client(gui):
    from gradio_client import Client

    return Client(gui.url, verbose=False)


TRACEBACK = ("Traceback", 'File "', "raise ", "errors.EdgesmithError")  # what pieces of a traceback look like


def one_line_naming(text: str, bad_file) -> str:
    """The line of `text` that names `bad_file`; asserts it is the only one and no piece of a traceback shows."""
    assert not any(mark in text for mark in TRACEBACK), text
    lines = [line for line in text.splitlines() if str(bad_file) in line]
    assert len(lines) == 1, text
    return lines[0]


PROMPT = "def add(a, b):"


def generate(client, model: str) -> tuple[str, str, str]:
    """(completion, stats line, status line) of a short greedy Playground request."""
    text, _, stats, _, status = client.predict(PROMPT, model, "none", 8, 0, "", "", 1.0, 0, api_name="/generate")
    return text[len(PROMPT):] if text.startswith(PROMPT) else text, stats, status


# ----------------------------------------------------------------------------- in the server


# (name, source, file, corruption, resealed): one per format the Playground loads
PLAYGROUND_CASES = [
    ("safetensors", "checkpoint", "model.safetensors", "header", True),
    ("gguf-truncated", "gguf", "model.gguf", "truncate", True),
    ("onnx-resealed", "onnx", "model.onnx", "truncate", True),
    ("tokenizer", "gguf", "tokenizer.json", "header", True),
    ("manifest", "gguf", "manifest.json", "truncate", False),
    ("config", "checkpoint", "config.json", "zero", False),
]


@pytest.mark.parametrize("name, source, file, corruption, reseal", PLAYGROUND_CASES,
                         ids=[c[0] for c in PLAYGROUND_CASES])
def test_the_playground_refuses_a_bad_file_in_one_line(gui, client, name, source, file, corruption, reseal):
    # setup
    model, bad_file = gui.bad(f"play-{name}", source, file, corruption, reseal)
    # execute
    text, stats, status = generate(client, model)
    # assert: "Refused: <the file>: ..." and no answer
    line = one_line_naming(status, bad_file)
    assert line.startswith("**Refused:**") and text == "" and stats == "", (status, stats, text)


def test_the_planner_refuses_a_bad_manifest_in_one_line(gui, client):
    # setup
    model, bad_file = gui.bad("plan-manifest", "gguf", "manifest.json", "header")
    # execute
    verdict, table, _ = client.predict("pixel-8", model, 0, "auto", api_name="/plan")
    # assert
    assert one_line_naming(verdict, bad_file).startswith("**Refused:**") and not table["data"], verdict


def test_the_runs_tab_shows_an_unreadable_summary_in_one_line(gui, client):
    # setup: a training run whose summary.json was cut short
    run = gui.ws / "runs" / "cut"
    run.mkdir(parents=True)
    (run / "summary.json").write_text('{"checkpoint": "runs/cut/checkpoint", "steps": 4, "final_lo')
    # execute
    summary, lineage, report, _ = client.predict("runs/cut", api_name="/run")
    # assert
    assert "cannot read" in one_line_naming(summary, run / "summary.json"), summary


# ----------------------------------------------------------------------------- in background jobs


def wait_failed(client, api_name: str, job: str, *extra) -> tuple:
    deadline = time.monotonic() + JOB_S
    while time.monotonic() < deadline:
        out = client.predict(job, *extra, api_name=api_name)
        if any(f"**{s}**" in out[0] for s in ("done", "failed", "cancelled", "lost")):
            return out
        time.sleep(0.5)
    raise AssertionError(f"{api_name} {job}: not finished in {JOB_S:.0f} s: {out[0]}")


@pytest.fixture(scope="module")
def failed_jobs(gui, client):
    """Three jobs on bad files, started at once, run to their end: {tab: (status, log, bad file)}.
    Export: a checkpoint with a truncated model.safetensors (its sha256 check names it); Compress: one
    with a bad tokenizer.json; Benchmark: an ONNX artifact whose truncated model.onnx was resealed."""
    export_ckpt, export_bad = gui.bad("export-safetensors", "checkpoint", "model.safetensors", "truncate")
    compress_ckpt, compress_bad = gui.bad("compress-tokenizer", "checkpoint", "tokenizer.json", "header")
    bench_art, bench_bad = gui.bad("bench-onnx", "onnx", "model.onnx", "truncate", True)
    export_job, _, _ = client.predict(export_ckpt, ["gguf"], "fp32", 0, "", "runs/export-from-bad", "",
                                   api_name="/export")
    compress_job, _, _ = client.predict(compress_ckpt, "rtn", 8, 32, "", "", "corpus", 32, 2048, "runs/from-bad",
                                     "", api_name="/compress")
    bench_job, _, _ = client.predict([bench_art], "local", 4, 4, 1, "", api_name="/bench")
    # a tab's recipe names its source checkpoint as typed, relative to the workspace: so do its errors
    export_bad, compress_bad = export_bad.relative_to(gui.ws), compress_bad.relative_to(gui.ws)
    out = {"export": (wait_failed(client, "/export_status", export_job, ""), 5, export_bad),
           "compress": (wait_failed(client, "/compress_status", compress_job, ""), 4, compress_bad),
           "bench": (wait_failed(client, "/bench_status", bench_job, ""), 4, bench_bad)}
    return {tab: (o[0], o[i], bad) for tab, (o, i, bad) in out.items()}


def check_failed(status: str, log: str, bad_file) -> None:
    """Failed, the status names the file in our one error line, the log shown has no traceback."""
    assert "**failed**" in status, (status, log)
    assert one_line_naming(status, bad_file).startswith("edgesmith: error: "), status
    assert "Traceback" not in log, log


def outputs_of(run: Path) -> list[Path]:
    """What a run directory holds beyond its own bookkeeping (the resolved recipe.toml, its lock, the empty
    folders a step's output goes in): files of checkpoints, artifacts, results, reports, and temporaries."""
    if not run.exists():
        return []
    return [p for p in run.rglob("*") if (p.is_file() and p.name not in ("recipe.toml", ".lock"))
            or ".tmp-" in p.name or ".old-" in p.name]


def test_an_export_of_a_bad_checkpoint_fails_in_one_line_and_writes_nothing(gui, failed_jobs):
    check_failed(*failed_jobs["export"])
    assert not outputs_of(gui.ws / "runs" / "export-from-bad"), outputs_of(gui.ws / "runs" / "export-from-bad")


def test_a_compress_of_a_bad_checkpoint_fails_in_one_line_and_writes_nothing(gui, failed_jobs):
    check_failed(*failed_jobs["compress"])
    assert not outputs_of(gui.ws / "runs" / "from-bad"), outputs_of(gui.ws / "runs" / "from-bad")


def test_a_bench_of_a_bad_artifact_fails_in_one_line_and_writes_nothing(gui, failed_jobs):
    assert not (gui.ws / "bench").exists() or not any((gui.ws / "bench").iterdir())  # no results file
    check_failed(*failed_jobs["bench"])


def test_the_server_keeps_serving_after_bad_files(gui, client):
    # execute: a good model after every refusal above
    text, stats, status = generate(client, "models/tiny-gguf")
    # assert
    assert gui.proc.poll() is None
    assert len(text) > 0 and "tok/s" in stats and status == "Done.", (stats, status)
