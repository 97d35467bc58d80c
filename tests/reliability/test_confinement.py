"""Confinement: every path an artifact or checkpoint names stays inside its directory and is a regular file.

A directory built to cause harm — a manifest entry pointing up or to an absolute path, a symlink that
leaves the directory, a FIFO or a device where a file should be — is refused in one line naming the
entry, before any byte of it is read. The FIFO cases prove "before": opening a FIFO for reading blocks
until a writer comes, so a reader that touched it would hang the test (each CLI case runs under a timeout).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtimes
from models.checkpoint import load_checkpoint, sha256_file
from models.confine import confined, read_json, sha256_file as bounded_sha256
from models.errors import EdgesmithError
from models.hf import import_hf
from toolchain.export.manifest import write_manifest


def one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


@pytest.fixture
def outside(tmp_path):
    """A file outside the artifact, and a FIFO outside it (reading it would block)."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    (d / "secret.bin").write_bytes(b"not yours" * 10)
    os.mkfifo(d / "pipe")
    return d


def copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def add_file_entry(directory: Path, entry: str, sha: str = "0" * 64, size: int = 90) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    m["files"][entry] = {"sha256": sha, "bytes": size}
    (directory / "manifest.json").write_text(json.dumps(m))


# ----------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("entry, message", [
    ("../elsewhere/secret.bin", "goes up with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("~/x", "is an absolute path"),
    ("a\\..\\b", "has a NUL or backslash"),
    ("", "must be a non-empty relative path"),
])
def test_a_manifest_entry_outside_the_directory_is_refused(artifact, tmp_path, entry, message):
    # setup
    d = copy(artifact("gguf"), tmp_path)
    add_file_entry(d, entry)
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    assert message in one_line(e) and repr(entry) in str(e.value) and "manifest.json" in str(e.value)


@pytest.mark.parametrize("make, message", [
    (lambda d, out: os.symlink(out / "secret.bin", d / "extra.bin"), "leaves its directory"),
    (lambda d, out: os.symlink(out / "pipe", d / "extra.bin"), "leaves its directory"),
    (lambda d, out: os.mkfifo(d / "extra.bin"), "is a FIFO, not a regular file"),
    (lambda d, out: os.symlink("/dev/zero", d / "extra.bin"), "leaves its directory"),
    (lambda d, out: (d / "extra.bin").mkdir(), "is a directory, not a regular file"),
    (lambda d, out: os.symlink("extra.bin", d / "extra.bin"), "cannot be resolved"),
])
def test_a_listed_file_that_is_not_a_regular_file_inside_is_refused(artifact, tmp_path, outside, make, message):
    # setup: the manifest lists extra.bin, which is a symlink out, a FIFO, a device, a directory, a loop
    d = copy(artifact("gguf"), tmp_path)
    make(d, outside)
    add_file_entry(d, "extra.bin")
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    assert message in one_line(e) and "extra.bin" in str(e.value)


def test_the_entry_swapped_for_a_symlink_out_is_refused_even_with_a_matching_sha256(artifact, tmp_path, outside):
    # setup: model.gguf replaced by a link to a file outside, and the manifest resealed to match it
    d = copy(artifact("gguf"), tmp_path)
    shutil.copy(d / "model.gguf", outside / "model.gguf")
    (d / "model.gguf").unlink()
    os.symlink(outside / "model.gguf", d / "model.gguf")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["model.gguf"] = {"sha256": sha256_file(outside / "model.gguf"),
                                "bytes": (outside / "model.gguf").stat().st_size}
    (d / "manifest.json").write_text(json.dumps(m))
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    assert "model.gguf" in one_line(e) and "leaves its directory" in str(e.value)


def test_a_symlink_inside_the_directory_is_followed(artifact, tmp_path):
    # setup: the entry is a relative symlink to a file in the same directory (what some sync tools make)
    d = copy(artifact("gguf"), tmp_path)
    (d / "model.gguf").rename(d / "weights.gguf")
    os.symlink("weights.gguf", d / "model.gguf")
    write_manifest(d, json.loads((d / "manifest.json").read_text()))
    # execute
    session = runtimes.load(d)
    # assert
    assert session.prefill([1, 2, 3]).shape[-1] == session.vocab_size


@pytest.mark.parametrize("field", ["entry", "options.onnx_file", "tokenizer.file"])
def test_a_named_file_must_be_one_the_manifest_lists(artifact, tmp_path, field):
    # setup: a field naming a file that exists but is not in `files` (its bytes were never checked)
    d = copy(artifact("onnx"), tmp_path)
    (d / "other.onnx").write_bytes(b"x")
    m = json.loads((d / "manifest.json").read_text())
    holder, _, key = field.rpartition(".")
    (m[holder] if holder else m)[key] = "other.onnx"
    (d / "manifest.json").write_text(json.dumps(m))
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    assert f"{field} names 'other.onnx', which is not one of its files" in one_line(e)


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json"])
def test_a_fixed_name_that_is_a_fifo_or_a_link_out_is_refused(artifact, tmp_path, outside, name):
    for make in (lambda p: os.mkfifo(p), lambda p: os.symlink(outside / "pipe", p)):
        # setup
        d = copy(artifact("gguf"), tmp_path, f"copy-{name}-{len(list(tmp_path.iterdir()))}")
        (d / name).unlink()
        make(d / name)
        # execute / assert
        with pytest.raises(EdgesmithError) as e:
            runtimes.load(d)
        assert name in one_line(e)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "edgesmith.json", "tokenizer.json",
                                  "tokenizer_config.json"])
def test_a_checkpoint_file_that_leaves_or_is_not_regular_is_refused(checkpoints, tmp_path, outside, name):
    for i, make in enumerate((lambda p: os.mkfifo(p), lambda p: os.symlink(outside / "secret.bin", p),
                              lambda p: os.symlink("/dev/zero", p))):
        # setup
        d = copy(checkpoints["float"], tmp_path, f"ckpt-{i}")
        (d / name).unlink()
        make(d / name)
        # execute / assert
        with pytest.raises(EdgesmithError) as e:
            load_checkpoint(d)
        assert name in one_line(e) and ("leaves its directory" in str(e.value) or "FIFO" in str(e.value))


def test_an_hf_shard_index_pointing_outside_is_refused(checkpoints, tmp_path, outside):
    # setup: a transformers-style directory whose shard index names a file outside it
    src = copy(checkpoints["float"], tmp_path, "hf")
    (src / "model.safetensors").rename(outside / "shard.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "../elsewhere/shard.safetensors"}}))
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        import_hf(src, tmp_path / "out")
    assert "shard '../elsewhere/shard.safetensors'" in one_line(e) and "index.json" in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bounded reads


def test_hashing_stops_at_the_recorded_size(tmp_path):
    # setup: a file larger than the bound we hash it with
    p = tmp_path / "big.bin"
    p.write_bytes(b"x" * 5000)
    # execute / assert
    assert bounded_sha256(p) == sha256_file(p)
    with pytest.raises(EdgesmithError, match="more than the 4096 bytes recorded"):
        bounded_sha256(p, limit=4096)


def test_a_json_file_over_its_limit_is_refused_without_reading_it(tmp_path):
    p = tmp_path / "config.json"
    p.write_bytes(b"{" + b" " * 2000 + b"}")
    with pytest.raises(EdgesmithError, match="2002 bytes, more than the 1000"):
        read_json(p, limit=1000)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EdgesmithError, match="deep.json: not valid JSON"):
        read_json(deep)


def test_confined_accepts_plain_entries_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"a")
    assert confined(tmp_path, "sub/a.bin") == tmp_path / "sub" / "a.bin"
    for bad in (None, 3, ["a"], "sub/../sub/a.bin", "sub/a.bin\x00"):
        with pytest.raises(EdgesmithError):
            confined(tmp_path, bad)


# ----------------------------------------------------------------------------- through the CLI


def test_the_cli_refuses_a_fifo_entry_in_one_line_without_hanging(artifact, tmp_path, outside):
    # setup
    d = copy(artifact("gguf"), tmp_path)
    os.symlink(outside / "pipe", d / "extra.bin")
    add_file_entry(d, "extra.bin")
    # execute: the real console script, with a timeout a blocked open would exceed
    r = subprocess.run([sys.executable, "-m", "edgesmith", "generate", str(d), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    # assert
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgesmith: error:") and "extra.bin" in lines[0], r.stderr
