"""Start and stop a real `edgesmith gui` for tests, and fill its workspace.

Shared by tests/gui (one GUI for the session) and tests/reliability (one GUI per module, under load
and with bad files): a subprocess on a free port, polled until it answers; stopping it cancels the
jobs it left running. `fill_workspace` puts a small corpus, the trained tiny checkpoint, a copy of it
with a long KV cache (a stream long enough to stop half-way), its GGUF artifact (the runtime tests'
session fixtures, copied in) and a symlink out of the workspace in it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from toolchain.jobs import JobManager

REPO = Path(__file__).resolve().parents[2]
LONG_SEQ = 16384  # models/tiny-long's KV cache: streams of thousands of tokens, each reading every position


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
        proc = subprocess.Popen([sys.executable, "-m", "edgesmith", "gui", "--workspace", str(workspace),
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
        proc.wait()


def long_context(src: Path, out: Path, max_seq_len: int) -> None:
    """The checkpoint at `src` with a longer KV cache: a stream of thousands of tokens (~10 ms each here,
    the static cache's attention reads every position), long enough to stop or cancel half-way."""
    import dataclasses

    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.llama import Transformer

    ckpt = load_checkpoint(src)
    model = Transformer(dataclasses.replace(ckpt.model.config, max_seq_len=max_seq_len))
    model.load_state_dict(ckpt.model.state_dict())
    save_checkpoint(model, ckpt.tokenizer, out, lineage={"parent": None, "passes": []})


def fill_workspace(ws: Path, checkpoints: dict, artifact) -> Path:
    """`ws` with corpus/ (a few files of real Python), models/tiny (the float checkpoint), models/tiny-long
    (the same weights with a LONG_SEQ-token KV cache), models/tiny-gguf (its GGUF artifact) and
    escape -> ../outside (a copy of the checkpoint)."""
    (ws / "models").mkdir(parents=True)
    corpus = ws / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):
        (corpus / p.name).write_text(p.read_text())
    shutil.copytree(checkpoints["float"], ws / "models" / "tiny")
    long_context(ws / "models" / "tiny", ws / "models" / "tiny-long", LONG_SEQ)
    shutil.copytree(artifact("gguf"), ws / "models" / "tiny-gguf")
    outside = ws.parent / "outside"
    outside.mkdir()
    shutil.copytree(checkpoints["float"], outside / "ckpt")
    (ws / "escape").symlink_to(outside, target_is_directory=True)
    return ws
