"""One running `edgesmith gui` for the GUI tests: a subprocess on a free port, with a temporary
workspace holding a small corpus, a trained tiny checkpoint and its GGUF artifact (the runtime
tests' fixtures, copied in), and a symlink that points out of the workspace."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from toolchain.jobs import JobManager

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-output" / "gui"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gui(workspace: Path, *extra: str, env: dict | None = None):
    """(process, url, log path) of `edgesmith gui` serving `workspace`, once it answers."""
    port = free_port()
    log = workspace.parent / f"gui-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **(env or {})}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "gui", "--workspace", str(workspace),
                                 "--port", str(port), *extra], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"edgesmith gui exited: {log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, log
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"edgesmith gui did not answer in 90 s: {log.read_text()}")


def stop_gui(proc, workspace: Path) -> None:
    jobs = JobManager(workspace / "jobs")
    for job in jobs.list():
        if not job.done:
            jobs.cancel(job.id)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def gui_workspace(tmp_path_factory, checkpoints, artifact):  # noqa: F811
    ws = tmp_path_factory.mktemp("gui") / "workspace"
    (ws / "models").mkdir(parents=True)
    corpus = ws / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):  # a few files of real Python
        (corpus / p.name).write_text(p.read_text())
    shutil.copytree(checkpoints["float"], ws / "models" / "tiny")
    shutil.copytree(artifact("gguf"), ws / "models" / "tiny-gguf")
    outside = ws.parent / "outside"
    outside.mkdir()
    shutil.copytree(checkpoints["float"], outside / "ckpt")
    (ws / "escape").symlink_to(outside, target_is_directory=True)
    return ws


@pytest.fixture(scope="session")
def gui_url(gui_workspace):
    proc, url, _ = start_gui(gui_workspace)
    yield url
    stop_gui(proc, gui_workspace)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
