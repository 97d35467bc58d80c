"""The `edgesmith` console script, run as a user would: a subprocess, exit codes, stdout/stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import child_lineage, save_checkpoint
from toolchain.cli import main


def edgesmith(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "toolchain.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_version_and_help():
    assert edgesmith("--version").stdout.startswith("edgesmith ")
    out = edgesmith("--help").stdout
    for command in ("run", "generate", "eval", "import-hf"):
        assert command in out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `edgesmith run` shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):  # a few files of real Python
        (corpus / p.name).write_text(p.read_text())
    result = edgesmith("run", "--data", corpus, "--steps", 200, "--vocab-size", 512, "--seq-len", 64,
                       "--batch-size", 8, "--out", root / "out")
    return root, corpus, result


def test_run_trains_saves_and_beats_unigram(trained):
    root, _, result = trained
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["val_perplexity"] < 0.5 * summary["unigram_perplexity"]  # measured: 57 vs 190
    assert f"validation perplexity {summary['val_perplexity']:.2f}" in result.stdout
    assert "unigram baseline" in result.stdout and "sample:" in result.stdout
    ckpt = root / "out" / "checkpoints" / "00-train"
    meta = json.loads((ckpt / "edgesmith.json").read_text())
    assert meta["lineage"]["passes"][0]["kind"] == "train"


def test_eval_and_generate_on_the_checkpoint(trained):
    root, corpus, _ = trained
    ckpt = root / "out" / "checkpoints" / "00-train"
    summary = json.loads((root / "out" / "summary.json").read_text())
    ev = edgesmith("eval", ckpt, "--data", corpus, "--seq-len", 64)
    assert ev.returncode == 0, ev.stderr
    assert f"validation perplexity {summary['val_perplexity']:.3f}" in ev.stdout
    args = ("generate", ckpt, "--prompt", "def ", "--max-new-tokens", 20, "--seed", 3)
    a, b = edgesmith(*args), edgesmith(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def ")
    greedy = edgesmith("generate", ckpt, "--prompt", "import ", "--temperature", 0, "--max-new-tokens", 10)
    assert greedy.returncode == 0 and greedy.stdout.startswith("import ")


def test_import_hf_cli(tiny_model, tokenizer, tmp_path):
    src = save_checkpoint(tiny_model, tokenizer, tmp_path / "src", child_lineage(None, {"kind": "test"}))
    ok = edgesmith("import-hf", src, "--out", tmp_path / "imported")
    assert ok.returncode == 0, ok.stderr
    again = edgesmith("import-hf", src, "--out", tmp_path / "imported")
    assert again.returncode == 2 and "already exists (pass --force" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--model", "huge"], "unknown model size 'huge'; allowed: nano, micro, small"),
    (["run", "--data", "{tmp}/missing"], "missing: no such file or directory (corpus)"),
    (["run", "--data", "{tmp}/empty"], "empty: corpus is empty"),
    (["run", "--vocab-size", "100"], "--vocab-size: 100 is too small; byte-level BPE needs at least 259"),
    (["run", "--seq-len", "4096"], "--seq-len: 4096 exceeds the model's max_seq_len 1024"),
    (["eval", "{tmp}/nockpt"], "nockpt: not a checkpoint directory"),
    (["generate", "{tmp}/nockpt", "--prompt", "x"], "nockpt: not a checkpoint directory"),
    (["import-hf", "{tmp}/nohf", "--out", "{tmp}/o"], "nohf: no such directory"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    # In-process (the console script is `main`): a subprocess per case would cost a torch import each.
    (tmp_path / "empty").mkdir()
    before = sorted(tmp_path.rglob("*"))
    out = ["--out", str(tmp_path / "out")] if args[0] == "run" else []
    assert main([a.format(tmp=tmp_path) for a in args] + out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before, "nothing written"


def test_a_bad_input_through_the_console_script(tmp_path):
    result = edgesmith("eval", tmp_path / "nockpt")
    assert result.returncode == 2 and result.stderr.strip().endswith("nockpt: not a checkpoint directory (no such directory)")
