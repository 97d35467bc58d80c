"""The `edgesmith` console script, run as a user would: a subprocess, exit codes, stdout/stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import child_lineage, save_checkpoint
from edgesmith.cli import main


def edgesmith(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "edgesmith", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_version_and_help():
    assert edgesmith("--version").stdout.startswith("edgesmith ")
    out = edgesmith("--help").stdout
    for command in ("run", "generate", "eval", "import-hf"):
        assert command in out


RECIPE = """
name = "cli"
[source.train]
model = "nano"
data = "{corpus}"
vocab_size = 512
steps = 200
batch_size = 8
seq_len = 64
[export]
formats = []
[target]
bench = false
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `edgesmith run RECIPE` (training only) shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for p in sorted(Path(json.__file__).parent.glob("*.py")):  # a few files of real Python
        (corpus / p.name).write_text(p.read_text())
    (root / "cli.toml").write_text(RECIPE.format(corpus=corpus))
    result = edgesmith("run", root / "cli.toml", "--out", root / "out")
    return root, corpus, result


def test_run_trains_saves_and_beats_unigram(trained):
    from models.tokenizer import Tokenizer
    from toolchain.data import load_corpus, tokenize_corpus
    from toolchain.evaluate import unigram_perplexity

    root, corpus, result = trained
    assert result.returncode == 0, result.stderr
    ckpt = root / "out" / "checkpoints" / "00-train"
    summary = json.loads((ckpt / "train_summary.json").read_text())
    tokens = tokenize_corpus(load_corpus(corpus), Tokenizer.load(ckpt))
    unigram = unigram_perplexity(tokens.train, tokens.val[1:], 512)
    assert summary["val_perplexity"] < 0.5 * unigram  # measured: 57 vs 190
    assert "00-train: done in" in result.stdout and "Passes: size, perplexity, KLD" in result.stdout
    meta = json.loads((ckpt / "edgesmith.json").read_text())
    assert meta["lineage"]["passes"][0]["kind"] == "train"


def test_eval_and_generate_on_the_checkpoint(trained):
    root, corpus, _ = trained
    ckpt = root / "out" / "checkpoints" / "00-train"
    ev = edgesmith("eval", ckpt, "--data", corpus, "--seq-len", 64)
    assert ev.returncode == 0, ev.stderr
    assert "validation perplexity " in ev.stdout
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
    (["run", "--set", "source.train.model=huge"], "source.train.model: 'huge' is not one of nano, micro, small"),
    (["run", "--set", "source.train.data={tmp}/missing"], "missing: no such file or directory (corpus)"),
    (["run", "--set", "source.train.data={tmp}/empty"], "empty: corpus is empty"),
    (["run", "--set", "source.train.vocab_size=100"], "source.train.vocab_size: 100 is too small; byte-level BPE "
                                                      "needs at least 259"),
    (["run", "--set", "source.train.seq_len=4096"], "source.train.seq_len: 4096 exceeds the model's max_seq_len 1024"),
    (["run", "--set", "pass[0].bits=6"], "pass[0].bits: 6 is not allowed; allowed: 4, 5, 8"),
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


def test_export_target_records_the_device_and_says_whether_it_fits(checkpoints, tmp_path, capsys):
    # execute
    out = tmp_path / "gguf"
    code = main(["export", str(checkpoints["float"]), "--format", "gguf", "--out", str(out), "--target", "pixel-8"])
    # assert: the manifest names the device; the planner's verdict is printed
    printed = capsys.readouterr().out
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["target_device"] == "pixel-8"
    verdict = [line for line in printed.splitlines() if line.startswith("target pixel-8")]
    assert len(verdict) == 1 and " fits (" in verdict[0] and "decode bound" in verdict[0]
    assert "prefers" not in verdict[0]  # GGUF is one of the Pixel 8's formats
    # an unknown device: one line naming the flag and the known profiles, nothing written
    code = main(["export", str(checkpoints["float"]), "--format", "gguf", "--out", str(tmp_path / "x"),
                 "--target", "moon"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("edgesmith: error: --target: unknown device profile 'moon'")
    assert "pixel-8" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family, fmt", [("phi3", "executorch"), ("gemma2", "gguf"), ("gemma3", "onnx")])
def test_a_family_goes_from_import_to_generate_through_the_cli(tokenizer, tmp_path, family, fmt):
    from tests.models.test_families import hf_model

    # setup: a transformers model of the family, saved as a user's download would be
    src = tmp_path / "hf"
    hf_model(family).save_pretrained(src)
    tokenizer.save(src)
    # execute: import, quantize, export, generate, as a user types them
    steps = [("import-hf", src, "--out", tmp_path / "ckpt"),
             ("compress", tmp_path / "ckpt", "--pass", "quantize:method=rtn,bits=4", "--out", tmp_path / "q4",
              "--seq-len", 64, "--max-tokens", 2048),
             ("export", tmp_path / "q4", "--format", fmt, "--out", tmp_path / fmt)]
    for args in steps:
        done = edgesmith(*args)
        assert done.returncode == 0, (args[0], done.stderr[-2000:])
    args = ("--prompt", "def ", "--max-new-tokens", 8, "--temperature", 0)
    got, want = edgesmith("generate", tmp_path / fmt, *args), edgesmith("generate", tmp_path / "q4", *args)
    # assert: the family survives each step, and the artifact writes what the checkpoint writes
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["model_type"] == hf_model(family).config.model_type
    assert got.returncode == 0 and want.returncode == 0, got.stderr[-2000:] + want.stderr[-2000:]
    assert got.stdout == want.stdout and got.stdout.startswith("def ")
