"""Fuzzing the readers of user-supplied files: the recipe parser, the artifact manifest reader and
the GGUF file our llama.cpp loader opens (runtimes.backends.llamacpp.check_gguf reads its metadata first).
The property everywhere: a bad file either loads or raises EdgesmithError with a one-line message;
nothing else escapes (llama.cpp aborts the whole process on some corruptions; none may reach it).
"""

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.checkpoint import sha256_file
from models.errors import EdgesmithError
from models.llama import Transformer
from runtimes.artifact import read_manifest
from toolchain.recipe import BUNDLED, load_recipe, to_toml

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def one_line(e: EdgesmithError) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ----------------------------------------------------------------------------- recipes

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["nano", "rtn", "gptq", "gguf", "onnx", "local", "device",
                                                           "quantize", "prune", "fp16", "stdlib"]))
keys = st.sampled_from(["name", "description", "source", "train", "checkpoint", "pass", "kind", "method", "bits",
                        "group_size", "compress", "export", "formats", "optional", "precision", "target",
                        "device", "steps", "model", "nproc", "max_seq_len", "bench", "x"])
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
BUNDLED_TEXT = {p.name: p.read_text() for p in sorted(BUNDLED.glob("*.toml"))}


def load_text(tmp_path, text: str | bytes):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_recipe(path)
    except EdgesmithError as e:
        assert str(path) in one_line(e) or "." in str(e) or ":" in str(e)


@FUZZ
@given(doc=st.dictionaries(keys, documents, max_size=6))
def test_recipe_random_structures(tmp_path_factory, doc):
    # setup: a random document, written as TOML (what the file would hold)
    tmp = tmp_path_factory.mktemp("recipe")
    doc = {k: v for k, v in doc.items() if v is not None}
    try:
        text = to_toml(_drop_none(doc))
    except EdgesmithError:
        return
    # execute / assert
    load_text(tmp, text)


def _drop_none(v):
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v if x is not None]
    return v


@FUZZ
@given(name=st.sampled_from(sorted(BUNDLED_TEXT)), data=st.data())
def test_recipe_mutated_text(tmp_path_factory, name, data):
    # setup: a bundled recipe with a few characters deleted, replaced or inserted
    text = list(BUNDLED_TEXT[name])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["del", "set", "ins"]))
        ch = data.draw(st.sampled_from(list("=[]\"'.,0123456789-x \n#{}") + ["\x00", "\udcff", "é"]))
        if op == "del":
            del text[i]
        elif op == "set":
            text[i] = ch
        else:
            text.insert(i, ch)
    # execute / assert
    load_text(tmp_path_factory.mktemp("recipe"), "".join(text))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_recipe_random_bytes(tmp_path_factory, raw):
    load_text(tmp_path_factory.mktemp("recipe"), raw)


# ----------------------------------------------------------------------------- manifests

json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=10)


def good_manifest(directory):
    (directory / "model.bin").write_bytes(b"weights" * 10)
    return {"manifest": "edgesmith-artifact", "format": "gguf", "entry": "model.bin", "precision": "fp32",
            "options": {"max_seq_len": 64},
            "files": {"model.bin": {"bytes": 70, "sha256": sha256_file(directory / "model.bin")}}}


def check_manifest(directory):
    try:
        read_manifest(directory, "gguf")
    except EdgesmithError as e:
        assert "manifest.json" in one_line(e) or "model.bin" in str(e) or str(directory) in str(e)


@FUZZ
@given(data=st.data())
def test_manifest_mutated_fields(tmp_path_factory, data):
    # setup: a valid manifest with fields replaced by random JSON values, or dropped
    d = tmp_path_factory.mktemp("artifact")
    m = good_manifest(d)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(["top", "files", "record"]))
        target = m if where == "top" else m["files"] if where == "files" and isinstance(m.get("files"), dict) \
            else m["files"]["model.bin"] if isinstance(m.get("files"), dict) and \
            isinstance(m["files"].get("model.bin"), dict) else m
        key = data.draw(st.sampled_from(sorted(target) + ["extra"]))
        if data.draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = data.draw(json_values)
    (d / "manifest.json").write_text(json.dumps(m))
    # execute / assert
    check_manifest(d)


@FUZZ
@given(data=st.data())
def test_manifest_mutated_bytes(tmp_path_factory, data):
    # setup: the bytes of a valid manifest, truncated and flipped
    d = tmp_path_factory.mktemp("artifact")
    raw = bytearray(json.dumps(good_manifest(d)).encode())
    raw = raw[:data.draw(st.integers(0, len(raw)))]
    for _ in range(data.draw(st.integers(0, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    (d / "manifest.json").write_bytes(bytes(raw))
    # execute / assert
    check_manifest(d)


# ----------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory, tokenizer, tiny_config):
    """A small valid GGUF of a random tiny model, as our exporter writes it."""
    from toolchain.export.formats.gguf import write_gguf

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_gguf(path, Transformer(tiny_config).eval(), tokenizer, "fp32", 64)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), span=st.sampled_from([32, 512, 4096, 16384]))
def test_gguf_mutated_header(tmp_path_factory, gguf_bytes, tiny_config, seed, n, span):
    pytest.importorskip("llama_cpp")
    from runtimes.backends.llamacpp import LlamaCppSession

    # setup: bytes flipped in the header / metadata region, with a manifest whose sha256 matches the
    # bad file (so the GGUF reading is exercised, not only the sha256 check)
    rng, data = random.Random(seed), bytearray(gguf_bytes)
    for _ in range(n):
        data[rng.randrange(0, span)] = rng.randrange(256)
    d = tmp_path_factory.mktemp("gguf-bad")
    (d / "model.gguf").write_bytes(data)
    manifest = {"manifest": "edgesmith-artifact", "format": "gguf", "entry": "model.gguf", "precision": "fp32",
                "options": {"max_seq_len": 64}, "model": tiny_config.to_dict(),
                "files": {"model.gguf": {"bytes": len(data), "sha256": sha256_file(d / "model.gguf")}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    # execute / assert: no abort, no exception but ours
    try:
        LlamaCppSession(d, n_threads=1).close()
    except EdgesmithError as e:
        assert "model.gguf" in one_line(e) or str(d) in str(e)
