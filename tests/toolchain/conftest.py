"""A tiny recipe and one run of it, shared by the pipeline and report tests (trained once per session)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RECIPE = """
name = "tiny"
description = "nano, 20 steps, 1 process, vocab 320; magnitude prune + rtn 4; gguf + onnx; bench here"

[source.train]
model = "nano"
data = "{corpus}"
vocab_size = 320
nproc = 1
steps = 20
batch_size = 8
seq_len = 64
eval_tokens = 2048

[[pass]]
kind = "prune"
method = "magnitude"
ratio = 0.25

[[pass]]
kind = "quantize"
method = "rtn"
bits = 4
group_size = 32

[compress]
calib_seq_len = 64
eval_seq_len = 64
eval_tokens = 4096

[export]
formats = ["gguf", "onnx"]
max_seq_len = 128

[target]
device = "local"
prompt_len = 16
gen_len = 16
repeat = 2
"""


def edgesmith(*args, timeout=600, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "edgesmith", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def pipeline_corpus(tmp_path_factory) -> Path:
    """A few files of real Python (the json package's sources)."""
    root = tmp_path_factory.mktemp("pipeline-corpus")
    for p in sorted(Path(json.__file__).parent.glob("*.py")):
        (root / p.name).write_text(p.read_text())
    return root


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory, pipeline_corpus) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TINY_RECIPE.format(corpus=pipeline_corpus))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_recipe):
    """(run directory, the finished `edgesmith run` process) of one run of the tiny recipe."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return out, edgesmith("run", tiny_recipe, "--out", out)
