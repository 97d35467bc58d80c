"""Bad artifacts and checkpoints at every entry point: one line naming the file, exit status 2.

Each bad file is made from a good one (the session's trained tiny checkpoint and its GGUF, ONNX,
ONNX with external data and ExecuTorch artifacts): truncated, emptied, bytes flipped, header
edited; a tokenizer of another model (vocab larger than the model's); a tensor of the wrong shape.
Artifact files are tried twice: as they are (the manifest's sha256 refuses them) and "resealed",
with the manifest's sha256 updated to match, so that the format's own parser must refuse them
cleanly. Entry points: `runtimes.load`, and `edgesmith eval / generate / export / bench` run in
process through `edgesmith.cli.main` (plus the real console script for the no-traceback check).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import runtimes
from models.checkpoint import sha256_file
from models.errors import EdgesmithError
from models.tokenizer import train_tokenizer
from tests.conftest import TEXT
from edgesmith.cli import main
from toolchain.export.manifest import write_manifest
from toolchain.export.parity import torch_threads

# ----------------------------------------------------------------------------- corruptions


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 16, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_header(path: Path) -> None:
    """The first bytes: safetensors' header length, GGUF's magic, the .pte identifier, ONNX's first
    protobuf field; a JSON file loses its opening brace."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        path.write_bytes(b"\x00garbage" + bytes(data[1:]))
        return
    data[:8] = b"\xff\xff\xff\xff\xff\xff\xff\x7f" if path.suffix == ".safetensors" else b"BADHEADR"
    path.write_bytes(bytes(data))


def wrong_tokenizer(path: Path) -> None:
    """tokenizer.json of another model: 400 tokens for a model with 320."""
    train_tokenizer([TEXT + "other model, other merges"], vocab_size=400, show_progress=False).save(path.parent)


def wrong_shape(path: Path) -> None:
    """model.safetensors with one tensor cut to half its rows."""
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def root_offset(path: Path) -> None:
    """A .pte whose flatbuffer root offset points into its extended header: every size in the header is fine,
    so only ExecuTorch's own flatbuffer verifier can refuse it."""
    data = bytearray(path.read_bytes())
    data[0:4] = (16).to_bytes(4, "little")
    path.write_bytes(bytes(data))


CORRUPT = {"root-offset": root_offset, "truncate": truncate, "zero": zero_bytes, "flip": flip_bytes, "header": edit_header,
           "wrong-tokenizer": wrong_tokenizer, "wrong-shape": wrong_shape}

# ----------------------------------------------------------------------------- the bad directories

# source: "checkpoint" or an artifact name; "onnx-external" is the ONNX artifact re-saved with external data
# (file, corruption, reseal): reseal updates the manifest's (or edgesmith.json's) sha256 to the bad bytes
CHECKPOINT_CASES = [(f, c, False) for f in ("model.safetensors", "config.json", "tokenizer.json")
                    for c in ("truncate", "zero", "flip", "header")]
CHECKPOINT_CASES = [case for case in CHECKPOINT_CASES if case[:2] != ("config.json", "flip")]  # flips a value
CHECKPOINT_CASES += [("model.safetensors", c, True) for c in ("truncate", "zero", "header")]
CHECKPOINT_CASES += [("model.safetensors", "wrong-shape", True), ("tokenizer.json", "wrong-tokenizer", False),
                     ("edgesmith.json", "truncate", False), ("edgesmith.json", "zero", False)]

ENTRY_FILES = {"gguf": ["model.gguf"], "onnx": ["model.onnx"], "onnx-external": ["model.onnx", "model.onnx.data"],
               "executorch": ["model.pte"]}
ARTIFACT_CASES = []
for _source, _files in ENTRY_FILES.items():
    for _file in _files:
        ARTIFACT_CASES += [(_source, _file, c, False) for c in ("truncate", "zero", "flip", "header")]
        # resealed: the parser must refuse it (new bytes in external data are only other weights)
        ARTIFACT_CASES += [(_source, _file, c, True) for c in ("truncate", "zero", "header")
                           if (_file, c) != ("model.onnx.data", "header")]
for _source in ("gguf", "executorch"):
    ARTIFACT_CASES += [(_source, "manifest.json", c, False) for c in ("truncate", "zero", "header")]
    ARTIFACT_CASES += [(_source, "tokenizer.json", c, r) for c in ("truncate", "header") for r in (False, True)]
    ARTIFACT_CASES += [(_source, "tokenizer.json", "wrong-tokenizer", True)]


def reseal_artifact(directory: Path) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, manifest)


def reseal_checkpoint(directory: Path) -> None:
    meta = json.loads((directory / "edgesmith.json").read_text())
    weights = directory / "model.safetensors"
    meta["files"]["model.safetensors"] = {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}
    (directory / "edgesmith.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def onnx_external(artifact, tmp_path_factory):  # noqa: F811
    """The ONNX artifact with its weights moved to `model.onnx.data` (what the exporter writes past
    1 GB), manifest rewritten to match."""
    import onnx

    out = tmp_path_factory.mktemp("onnx-external") / "onnx-external"
    shutil.copytree(artifact("onnx"), out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"]["external_data"] = True
    write_manifest(out, manifest)
    runtimes.load(out)  # the good one loads
    return out


@pytest.fixture
def good(artifact, checkpoints, onnx_external):  # noqa: F811
    def source(name: str) -> Path:
        if name == "checkpoint":
            return checkpoints["float"]
        return onnx_external if name == "onnx-external" else artifact(name)
    return source


def make_bad(good_dir: Path, tmp_path: Path, file: str, corruption: str, reseal: bool) -> tuple[Path, Path]:
    """A copy of `good_dir` with `file` corrupted; returns (directory, bad file)."""
    bad = tmp_path / "bad"
    shutil.copytree(good_dir, bad)
    CORRUPT[corruption](bad / file)
    if reseal:
        (reseal_artifact if (bad / "manifest.json").is_file() else reseal_checkpoint)(bad)
    return bad, bad / file


# ----------------------------------------------------------------------------- entry points


def cli(capsys, *args) -> tuple[int, str]:
    with torch_threads(1):
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out + err


def check_cli(code: int, output: str, bad_file: Path) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("edgesmith: error: "), output
    assert bad_file.name in lines[0] and str(bad_file.parent) in lines[0], output


def run_entry(entry: str, bad: Path, bad_file: Path, tmp_path: Path, capsys, text_folder: Path) -> None:
    if entry == "load":
        with pytest.raises(EdgesmithError) as e:
            with torch_threads(1):
                runtimes.load(bad)
        assert bad_file.name in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    elif entry == "eval":
        check_cli(*cli(capsys, "eval", bad, "--data", text_folder, "--seq-len", 32), bad_file)
    elif entry == "generate":
        check_cli(*cli(capsys, "generate", bad, "--prompt", "x", "--max-new-tokens", 2), bad_file)
    elif entry == "export":
        out = tmp_path / "exported"
        check_cli(*cli(capsys, "export", bad, "--format", "gguf", "--out", out), bad_file)
        assert not out.exists() and not list(tmp_path.glob(".exported*"))  # no temporary left behind


@pytest.mark.parametrize("entry", ["load", "eval", "generate", "export"])
@pytest.mark.parametrize("file, corruption, reseal", CHECKPOINT_CASES,
                         ids=[f"{f}-{c}{'-resealed' if r else ''}" for f, c, r in CHECKPOINT_CASES])
def test_a_bad_checkpoint_file_is_one_line_naming_it(file, corruption, reseal, entry, good, tmp_path, capsys,
                                                     text_folder):
    # setup
    bad, bad_file = make_bad(good("checkpoint"), tmp_path, file, corruption, reseal)
    # execute / assert
    run_entry(entry, bad, bad_file, tmp_path, capsys, text_folder)


ARTIFACT_ENTRY_CASES = [(*case, entry) for case in ARTIFACT_CASES for entry in ("load", "eval", "generate")]


@pytest.mark.parametrize("source, file, corruption, reseal, entry", ARTIFACT_ENTRY_CASES,
                         ids=[f"{s}-{f}-{c}{'-resealed' if r else ''}-{e}" for s, f, c, r, e in ARTIFACT_ENTRY_CASES])
def test_a_bad_artifact_file_is_one_line_naming_it(source, file, corruption, reseal, entry, good, tmp_path, capsys,
                                                   text_folder):
    # setup
    bad, bad_file = make_bad(good(source), tmp_path, file, corruption, reseal)
    # execute / assert
    run_entry(entry, bad, bad_file, tmp_path, capsys, text_folder)


@pytest.mark.parametrize("source, file, corruption, reseal", [
    ("gguf", "model.gguf", "flip", False),
    ("onnx", "model.onnx", "truncate", True),
])
def test_bench_of_a_bad_artifact_is_one_line_naming_the_file(source, file, corruption, reseal, good, tmp_path,
                                                              capsys):
    # setup
    bad, bad_file = make_bad(good(source), tmp_path, file, corruption, reseal)
    results = tmp_path / "results.json"
    # execute
    code, output = cli(capsys, "bench", bad, "--prompt-len", 4, "--gen-len", 4, "--repeat", 1, "--json", results)
    # assert: the tqdm bar goes to stderr; the error is the one line after it
    output = "\n".join(line for line in output.splitlines() if "bench on local" not in line)
    check_cli(code, output, bad_file)
    assert not results.exists()


@pytest.mark.parametrize("args", [("generate", "--prompt", "x"), ("export", "--format", "gguf", "--out", "OUT")])
def test_the_console_script_prints_no_traceback(args, good, tmp_path):
    # setup
    bad, bad_file = make_bad(good("checkpoint"), tmp_path, "model.safetensors", "header", True)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    # execute
    script = shutil.which("edgesmith") or pytest.fail("the edgesmith console script is not installed")
    r = subprocess.run([script, argv[0], str(bad), *argv[1:]], capture_output=True, text=True, timeout=120)
    # assert
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and str(bad_file) in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("corruption", ["header", "truncate", "root-offset"])
def test_a_corrupt_program_is_one_line_on_the_real_stderr(corruption, good, tmp_path):
    """ExecuTorch's C++ loader writes its own diagnostic to file descriptor 2 (which capsys does not
    see): through the console script, stderr must still be our one line, carrying that diagnostic. A bad
    header or a cut file is refused by our header check before ExecuTorch sees it; a root offset into the
    header passes every size check and is refused by ExecuTorch's flatbuffer verifier (full verification), in the
    probe's child process, with the diagnostic carried into our line."""
    # setup
    bad, bad_file = make_bad(good("executorch"), tmp_path, "model.pte", corruption, True)
    script = shutil.which("edgesmith") or pytest.fail("the edgesmith console script is not installed")
    # execute
    r = subprocess.run([script, "generate", str(bad), "--prompt", "x", "--max-new-tokens", "2"], capture_output=True,
                       text=True, timeout=120)
    # assert
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("edgesmith: error: "), r.stderr
    assert str(bad_file) in r.stderr
    if corruption == "root-offset":
        # refused by the probe (runtimes/probe.py) that loads a program not seen here in a child first
        assert "could not load or run the program" in r.stderr and "Verification failed" in r.stderr, r.stderr


@pytest.mark.parametrize("flag", [["--debug"], []])
def test_debug_prints_the_traceback_and_only_then(flag, good, tmp_path):
    # setup
    bad, bad_file = make_bad(good("checkpoint"), tmp_path, "model.safetensors", "header", True)
    script = shutil.which("edgesmith") or pytest.fail("the edgesmith console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "EDGESMITH_DEBUG"}
    # execute
    r = subprocess.run([script, "generate", str(bad), "--prompt", "x", *flag], capture_output=True, text=True,
                       timeout=120, env=env)
    # assert: the same exit status and last line either way; the traceback only with --debug
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("edgesmith: error: ") and str(bad_file) in r.stderr
    assert ("Traceback (most recent call last)" in r.stderr) == bool(flag), r.stderr


def test_an_internal_error_is_one_line_with_a_hint_and_exit_1(monkeypatch, capsys):
    """A bug of ours (not bad input) is still one line, exit status 1, pointing at --debug."""
    # setup: make the plan command hit an unexpected exception
    import devices.planner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(devices.planner, "plan", broken)
    # set (not deleted) so that undoing it also removes the EDGESMITH_DEBUG=1 that `--debug` sets below:
    # left in os.environ, every later test's subprocess would print tracebacks
    monkeypatch.setenv("EDGESMITH_DEBUG", "0")
    # execute
    code = main(["devices", "plan", "pixel-8", "--model", "nano"])
    out, err = capsys.readouterr()
    # assert
    assert code == 1 and "Traceback" not in out + err
    assert err.strip() == "edgesmith: internal error: ZeroDivisionError: division by zero (rerun with --debug for " \
                          "the traceback)"
    # and with the flag after the command, the traceback
    code = main(["devices", "plan", "pixel-8", "--model", "nano", "--debug"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback (most recent call last)" in err and "ZeroDivisionError" in err


def test_the_bad_files_really_differ_from_the_good_ones(good, tmp_path):
    """Guards the table: every corruption changes the file (a no-op corruption would test nothing)."""
    for file, corruption in sorted({case[:2] for case in CHECKPOINT_CASES}):
        bad, bad_file = make_bad(good("checkpoint"), tmp_path / f"{file}-{corruption}", file, corruption, False)
        assert bad_file.read_bytes() != (good("checkpoint") / file).read_bytes(), (file, corruption)
