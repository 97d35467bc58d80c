"""Background jobs: real `edgesmith` subprocesses, state on disk, progress, cancel, restart."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from models.errors import EdgesmithError
from toolchain.jobs import JobManager, _alive, log_tail, read_progress


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):
        (corpus / p.name).write_text(p.read_text())
    return tmp_path


def wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_commands_run_in_order_and_finish(workspace):
    # setup
    jobs = JobManager(workspace / "jobs")
    # execute
    job = jobs.start("check", [["--version"], ["--version"]], title="two versions")
    final = jobs.wait(job.id, timeout_s=120)
    # assert
    assert final.status == "done" and final.returncode == 0 and final.step == 1
    log = jobs.log(job.id)
    assert log.count("edgesmith 0.1.0") == 2 and "$ edgesmith --version" in log
    assert final.command_lines() == ["edgesmith --version", "edgesmith --version"]
    assert [j.id for j in jobs.list()] == [job.id] and jobs.latest("check").id == job.id


def test_a_failing_command_stops_the_job(workspace):
    jobs = JobManager(workspace / "jobs")
    job = jobs.start("train", [["train", "--model", "huge", "--out", "x"], ["--version"]])
    final = jobs.wait(job.id, timeout_s=120)
    assert final.status == "failed" and final.returncode == 2 and final.step == 0
    assert "unknown model size 'huge'" in jobs.log(job.id)
    assert "edgesmith 0.1.0" not in jobs.log(job.id)


def test_progress_survives_a_restart_and_cancel_kills_the_group(workspace):
    # setup: a training run far longer than the test
    jobs = JobManager(workspace / "jobs")
    job = jobs.start("train", [["train", "--model", "nano", "--data", str(workspace / "corpus"), "--steps", "100000",
                                "--batch-size", "2", "--seq-len", "32", "--out", "runs/long"]],
                     outputs={"out": "runs/long"})
    # execute: a second manager (a restarted GUI) reads the same job back while it trains
    other = JobManager(workspace / "jobs")
    seen = wait_for(lambda: (lambda j: j if j.progress.get("n", 0) >= 3 else None)(other.get(job.id)), 120)
    pid = json.loads((Path(job.dir) / "pid.json").read_text())
    final = other.cancel(job.id)
    # assert
    assert seen.status == "running" and seen.progress["label"] == "train" and seen.progress["total"] == 100000
    assert 0 < seen.progress["fraction"] < 0.01
    assert (workspace / "runs" / "long" / "metrics.jsonl").is_file()
    assert final.status == "cancelled" and final.done
    assert not _alive(pid["pid"], pid["start_time"])
    with pytest.raises(ProcessLookupError):
        os.killpg(pid["pid"], 0)  # nothing of the group is left
    assert jobs.get(job.id).status == "cancelled"


def test_a_runner_killed_from_outside_is_lost(workspace):
    jobs = JobManager(workspace / "jobs")
    job = jobs.start("train", [["train", "--model", "nano", "--data", str(workspace / "corpus"), "--steps", "100000",
                                "--batch-size", "2", "--seq-len", "32", "--out", "runs/lost"]])
    pid = wait_for(lambda: json.loads((Path(job.dir) / "pid.json").read_text()) if
                   (Path(job.dir) / "pid.json").is_file() else None)
    os.killpg(pid["pid"], signal.SIGKILL)
    assert wait_for(lambda: jobs.get(job.id).status == "lost", 30)


def test_bad_ids_and_commands_are_refused(workspace):
    jobs = JobManager(workspace / "jobs")
    for bad in ("../etc", "20250101-000000-x-zzzz", "", None):
        with pytest.raises(EdgesmithError, match="not a job id"):
            jobs.get(bad)
    with pytest.raises(EdgesmithError, match="no such job"):
        jobs.get("20250101-000000-train-abcd")
    with pytest.raises(EdgesmithError, match="argument lists"):
        jobs.start("train", ["train --model nano"])
    with pytest.raises(EdgesmithError, match="job kind"):
        jobs.start("Train!", [["--version"]])


def test_progress_and_tail_read_like_a_terminal(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("tokenize train:   0%|   | 0.00/35.9k [00:00<?, ?B/s]\nstart\n"
                   "train:  20%|##  | 1/5 [00:00<00:00, 26.16step/s, loss=7.6]\rtrain:  40%|####  | 2/5 [00:00<00:00]")
    assert read_progress(log) == {"label": "train", "n": 2, "total": 5, "fraction": 0.4}
    assert log_tail(log).splitlines()[-1] == "train:  40%|####  | 2/5 [00:00<00:00]"
    assert read_progress(tmp_path / "missing") == {} and log_tail(tmp_path / "missing") == ""
