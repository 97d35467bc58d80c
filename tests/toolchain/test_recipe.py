"""Recipes: bundled ones parse, overrides apply, every bad value is one line naming its key path."""

import copy
import tomllib

import pytest

from models.errors import EdgesmithError
from edgesmith.cli import main
from toolchain.recipe import BUNDLED, apply_override, list_recipes, load_recipe, parse_recipe, to_toml

BASE = {
    "name": "t",
    "source": {"train": {"model": "nano", "data": "stdlib", "steps": 10}},
    "pass": [{"kind": "prune", "method": "magnitude", "ratio": 0.25},
             {"kind": "quantize", "method": "gptq", "bits": 4}],
    "export": {"formats": ["gguf", "onnx"]},
    "target": {"device": "local"},
}


def _with(path: str, value):
    """BASE with one value set (path like 'pass[1].bits'); value DELETE removes the key."""
    doc = copy.deepcopy(BASE)
    node, parts = doc, path.split(".")
    for part in parts[:-1]:
        name, _, index = part.partition("[")
        node = node[name][int(index[:-1])] if index else node.setdefault(name, {})
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return doc


DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ("colour", "red", "colour: unknown key; allowed: compress, description, export, name, pass, source, target"),
    ("pass[0].colour", 1, "pass[0].colour: unknown key; allowed: drop, method, n_calib, ratio, scope, targets, unit"),
    ("source.train.colour", 1, "source.train.colour: unknown key; allowed: "),
    ("export.colour", 1, "export.colour: unknown key; allowed: exact, formats, fuse, max_seq_len, optional, portable_embedding, precision"),
    ("pass[1].bits", "4", "pass[1].bits: expected an integer, got a string '4'"),
    ("source.train.steps", 2.5, "source.train.steps: expected an integer, got a number 2.5"),
    ("export.fuse", "yes", "export.fuse: expected true or false, got a string 'yes'"),
    ("export.formats", "gguf", "export.formats: expected an array, got a string 'gguf'"),
    ("pass[0].kind", "sparsify", "pass[0].kind: 'sparsify' is not one of quantize, distill, lowrank, prune, qat"),
    ("pass[0].kind", DELETE, "pass[0].kind: missing; allowed: quantize, distill, lowrank, prune, qat"),
    ("pass[1].method", "magic", "pass[1].method: 'magic' is not one of awq, gptq, kv_int8, rtn, smoothquant"),
    ("pass[1].bits", 6, "pass[1].bits: 6 is not allowed; allowed: 4, 5, 8"),
    ("pass[1].group_size", 48, "pass[1].group_size: 48 is not allowed; allowed: "),
    ("pass[0].method", "sideways", "pass[0].method: 'sideways' is not supported; allowed: "),
    ("pass[0].ratio", 1.5, "pass[0].ratio: 1.5 is out of range; allowed: 0 < ratio < 1"),
    ("source.train.steps", 0, "source.train.steps: 0 must be an integer >= 1"),
    ("source.train.model", "huge", "source.train.model: 'huge' is not one of nano, micro, small"),
    ("source.train.precision", "fp8", "source.train.precision: 'fp8' is not supported; allowed: fp32, bf16"),
    ("source.train.vocab_size", 100, "source.train.vocab_size: 100 is too small; byte-level BPE needs at least 259"),
    ("source.checkpoint", "x", "source: give exactly one of source.checkpoint"),
    ("target.device", "toaster", "target.device: unknown device profile 'toaster'; known: "),
    ("target.repeat", 0, "target.repeat: 0 must be an integer >= 1"),
    ("export.formats", ["gguf", "tflite"], "export.formats[1]: unknown format 'tflite'; allowed: executorch, gguf, "
                                           "onnx, tensorrt"),
    ("export.precision", "fp8", "export.precision: 'fp8' is not one of fp32, fp16, device"),
    ("name", "a b", "name: 'a b' must be letters, digits"),
])
def test_bad_recipe_values_name_their_key_path(path, value, message):
    # setup
    doc = _with(path, value)
    # execute
    with pytest.raises(EdgesmithError) as e:
        parse_recipe(doc, origin="t.toml")
    # assert
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("nokey", "--set 'nokey': expected KEY=VALUE"),
    ("pass[5].bits=4", "--set 'pass[5].bits=4': pass[5] does not exist (the recipe has 2)"),
    ("pass.bits=4", "--set 'pass.bits=4': pass is not a table"),
    ("a..b=1", "--set 'a..b=1': '' is not a key"),
])
def test_bad_overrides(override, message):
    with pytest.raises(EdgesmithError) as e:
        apply_override(copy.deepcopy(BASE), override)
    assert str(e.value).startswith(message), str(e.value)


def test_overrides_are_toml_values_or_bare_words():
    # setup
    doc = copy.deepcopy(BASE)
    # execute
    for o in ("source.train.steps=20", "pass[1].bits=8", 'export.formats=["gguf"]', "target.device=pixel-8",
              "compress.eval_tokens=4096"):
        apply_override(doc, o)
    r = parse_recipe(doc)
    # assert
    assert r.source.train.train.steps == 20 and r.passes[1].bits == 8 and r.export.formats == ("gguf",)
    assert r.target.device == "pixel-8" and r.compress.eval_tokens == 4096


def test_bundled_recipes_parse_and_device_ones_take_the_profile_formats():
    from devices.profiles import load_profile

    # setup
    names = [n for n, _ in list_recipes()]
    # execute
    recipes = {n: load_recipe(n) for n in names}
    # assert
    assert {"demo", "phone-int4", "jetson-int8", "pi-q4"} <= set(names)
    demo = recipes["demo"]
    assert demo.source.train.nproc == 2 and demo.source.train.model == "nano" and demo.source.train.data == "stdlib"
    assert demo.passes[0].bits == 4 and type(demo.passes[0]).__name__ == "GPTQ"
    assert demo.export.formats == ("gguf", "onnx", "executorch") and demo.export.optional == ("tensorrt",)
    for name in ("phone-int4", "jetson-int8", "pi-q4"):
        r = recipes[name]
        profile = load_profile(r.target.device)
        assert r.export.formats == tuple(f for f in profile.formats if f in ("onnx", "executorch", "gguf", "tensorrt"))
        assert all(f"int{p.bits}" in profile.precisions for p in r.passes)
    assert recipes["jetson-int8"].export.formats[0] == "tensorrt"


def test_resolved_recipe_round_trips_through_toml():
    for path in sorted(BUNDLED.glob("*.toml")):
        doc = tomllib.loads(path.read_text())
        assert tomllib.loads(to_toml(doc)) == doc


def test_unknown_recipe_and_bad_toml(tmp_path):
    with pytest.raises(EdgesmithError, match=r"recipe 'nope': not a file and not a bundled recipe; bundled: demo"):
        load_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(EdgesmithError, match=r"bad.toml: not valid TOML"):
        load_recipe(bad)


def test_cli_run_bad_recipe_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    # setup
    recipe = tmp_path / "r.toml"
    recipe.write_text(to_toml(_with("pass[1].bits", 6)))
    before = sorted(tmp_path.rglob("*"))
    # execute
    code = main(["run", str(recipe), "--out", str(tmp_path / "out")])
    # assert
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["edgesmith: error: pass[1].bits: 6 is not allowed; allowed: 4, 5, 8"]
    assert sorted(tmp_path.rglob("*")) == before
    assert main(["run", str(recipe), "--set", "pass[1].bits=4", "--set", "source.train.steps=x",
                 "--out", str(tmp_path / "out")]) == 2
    assert "source.train.steps: expected an integer, got a string 'x'" in capsys.readouterr().err


def test_cli_recipes_lists_the_bundled_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, description in list_recipes():
        assert name in out and description in out
