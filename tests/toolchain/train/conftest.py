"""Fixtures for trainer tests: a tiny model config file, a small corpus, and a runner for the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = {"vocab_size": 320, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128, "max_seq_len": 64}


def edgesmith(*args, timeout=300, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgesmith", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A few files of real Python (the json package's sources)."""
    root = tmp_path_factory.mktemp("corpus")
    for p in sorted(Path(json.__file__).parent.glob("*.py")):
        (root / p.name).write_text(p.read_text())
    return root


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one thread is faster, and the trainer (which sets the
    thread count from OMP_NUM_THREADS) must leave the test process as it found it."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
