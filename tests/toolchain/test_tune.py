"""`edgesmith tune` on the tiny trained checkpoint: search, build, measure, choose, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from tests.conftest import TEXT
from toolchain.recipe import load_recipe
from toolchain.tune import tune
from toolchain.tune.search import frontier, pick, uniform

FAST = dict(method="rtn", calib_windows=4, calib_seq_len=64, eval_seq_len=64, eval_tokens=512,
            bench_args={"prompt_len": 16, "gen_len": 8, "repeat": 1}, log=lambda line: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-corpus")
    for i in range(40):
        (root / f"doc{i}.txt").write_text(TEXT[(13 * i) % 200:] + TEXT[: (13 * i) % 200])
    return str(root)


# ----------------------------------------------------------------------------- the search alone

SENS = {"units": {"embed_tokens": {"4": 0.002, "8": 1e-5}, "layers.0": {"4": 0.004, "8": 2e-5},
                  "layers.1": {"4": 0.0005, "8": 2e-6}, "lm_head": {"4": 0.003, "8": 1e-5}},
        "bytes": {u: {"4": 100, "8": 190, "float": 360} for u in ("embed_tokens", "layers.0", "layers.1", "lm_head")}}


def test_the_frontier_grows_in_size_and_loses_estimated_kld_step_by_step():
    path = frontier(SENS)
    assert [a.est_bytes for a in path] == sorted(a.est_bytes for a in path)
    assert [a.est_kld for a in path] == sorted((a.est_kld for a in path), reverse=True)
    assert path[0].by_unit == dict.fromkeys(SENS["units"], "4") and path[-1].by_unit == dict.fromkeys(SENS["units"],
                                                                                                     "float")
    # the most sensitive unit per byte (layers.0) is the first one upgraded
    assert path[1].by_unit["layers.0"] == "8"


def test_pick_starts_at_uniform_4_bit_and_stays_within_the_size_limit():
    path = frontier(SENS)
    picked = pick(path, 3, max_bytes=600)
    assert picked[0] == path[0] and all(a.est_bytes <= 600 for a in picked)
    assert picked[-1] == max((a for a in path if a.est_bytes <= 600), key=lambda a: a.est_bytes)
    assert pick(path, 3, max_bytes=600) == picked  # deterministic
    assert picked[1].rules()[1] == [r"layers\.0\..*", 8]


SENS_DROP = {"units": {**SENS["units"], "layers.0": {**SENS["units"]["layers.0"], "drop": 0.9},
                       "layers.1": {**SENS["units"]["layers.1"], "drop": 0.05}},
             "bytes": {**SENS["bytes"], "layers.0": {**SENS["bytes"]["layers.0"], "drop": 0},
                       "layers.1": {**SENS["bytes"]["layers.1"], "drop": 0}}}


def test_with_blocks_allowed_to_drop_the_frontier_starts_below_uniform_4_bit():
    # execute
    path = frontier(SENS_DROP, max_drop=1)
    # assert: the cheapest block per byte (layers.1) dropped first, then the same upward path as without dropping
    assert path[0].by_unit["layers.1"] == "drop" and path[0].dropped() == (1,) and path[0].label() == \
        "4-bit x3, dropped x1"
    assert path[0].est_bytes == 300 and path[1] == uniform(path) and path[1:] == frontier(SENS)
    assert [a.est_bytes for a in path] == sorted(a.est_bytes for a in path)
    # the quantize rules name the blocks left after the drop; pick still builds uniform 4-bit first
    assert [r[0] for r in path[0].rules()] == ["embed_tokens", r"layers\.0\..*", "lm_head"]
    assert pick(path, 2, max_bytes=350) == [uniform(path), path[0]]
    # dropping layers.0 instead renumbers layers.1 to layers.0
    two = frontier(SENS_DROP, max_drop=2)
    assert len(two) == len(path)  # never every block
    assert frontier({**SENS_DROP, "units": {**SENS_DROP["units"], "layers.1": {**SENS_DROP["units"]["layers.1"],
                                                                              "drop": 2.0}}}, 1)[0].rules()[1] == \
        [r"layers\.0\..*", 4]


SENS5 = {"units": {u: {**k, "5": k["4"] / 4} for u, k in SENS["units"].items()},
         "bytes": {u: {**b, "5": 122} for u, b in SENS["bytes"].items()}}


def test_a_five_bit_step_is_taken_where_it_buys_more_per_byte():
    # execute
    path = frontier(SENS5)
    # assert: 4 -> 5 removes 3/4 of a unit's KLD for 22 bytes (4 -> 8: all of it for 90), so each unit goes to 5 bits
    # first, most sensitive first, then on to 8 and float; rules and labels carry the width
    assert path[1].by_unit["layers.0"] == "5" and path[1].est_bytes == 422
    assert [a.by_unit for a in path[1:5]][-1] == dict.fromkeys(SENS5["units"], "5")
    assert path[5].label() == "5-bit x3, 8-bit x1" and path[-1].by_unit == dict.fromkeys(SENS5["units"], "float")
    assert [a.est_bytes for a in path] == sorted(a.est_bytes for a in path)
    assert path[1].rules()[1] == [r"layers\.0\..*", 5]
    # without 5-bit sensitivities (a format that holds 5-bit codes as 8-bit) the path is the 4/8 one
    assert all("5" not in a.by_unit.values() for a in frontier(SENS))


# ----------------------------------------------------------------------------- end to end


def test_tune_builds_measures_and_chooses_within_the_limits(checkpoints, corpus, tmp_path):
    # execute
    doc = tune(checkpoints["float"], "local", tmp_path / "tune", formats=["gguf"], candidates=3,
               max_size_mb=0.1, data=corpus, **FAST)
    # assert: every candidate measured through llama.cpp and on this machine; the chosen one is the best that fits
    cands = doc["candidates"]
    assert cands[0]["label"] == "4-bit x4" and len(cands) >= 2
    assert all(set(k) == {"4", "5", "8"} for k in doc["sensitivity"]["units"].values())  # GGUF stores Q5_0
    for r in cands:
        assert r["kld_through"] == "llamacpp" and r["speed_source"].startswith("measured on local")
        assert r["parity"] == {"gguf": True} and r["decode_tok_s"] > 0 and 0 < r["same_top_p"] <= 1
    (best,) = [r for r in cands if r["chosen"]]
    fitting = [r for r in cands if r["size_mb"] <= 0.1]
    assert best == min(fitting, key=lambda r: r["kld_mean"]) and not best["misses"]
    out = tmp_path / "tune"
    assert {p.name for p in out.iterdir()} >= {"pareto.json", "best", "recipe.toml", "report.html", "pareto.png"}
    # the best checkpoint holds the chosen precisions; the recipe rebuilds it
    ckpt = load_checkpoint(out / "best")
    for unit, bits in best["bits"].items():
        name = "layers.0.mlp.down_proj" if unit == "layers.0" else "layers.1.mlp.down_proj" if unit == "layers.1" \
            else unit
        module = ckpt.model.get_submodule(name)
        assert (getattr(module, "bits", None) or "float") == (bits if bits == "float" else int(bits)), unit
    recipe = load_recipe(out / "recipe.toml")
    assert [list(r) for r in recipe.passes[0].rules] == best["rules"]
    assert "<img src='data:image/png;base64," in (out / "report.html").read_text()
    assert "limits: --max-size-mb 0.1;" in (out / "report.html").read_text()


def test_an_unreachable_device_gets_the_planner_bound_and_says_so(checkpoints, corpus, tmp_path):
    # the pixel-8 profile's transport is adb://pixel-8: no adb here, so no measurement
    doc = tune(checkpoints["float"], "pixel-8", tmp_path / "tune", formats=["gguf"], candidates=1, data=corpus, **FAST)
    (r,) = doc["candidates"]
    assert r["speed_source"].startswith("planner bound (pixel-8 not reachable: ") and r["decode_tok_s"] > 0
    assert r["chosen"] and r["kld_through"] == "llamacpp"


def test_limits_no_candidate_meets_are_one_line_with_the_best_point_reached(checkpoints, corpus, tmp_path):
    with pytest.raises(EdgesmithError) as e:
        tune(checkpoints["float"], "local", tmp_path / "tune", formats=["gguf"], candidates=1, max_size_mb=0.01,
             data=corpus, **FAST)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tune: no candidate meets --max-size-mb 0.01; best reached: 4-bit x4")
    assert json.loads((tmp_path / "tune" / "pareto.json").read_text())["chosen"] is None
    assert not (tmp_path / "tune" / "best").exists()


def test_a_killed_tune_resumes_from_its_cache(checkpoints, corpus, tmp_path):
    # setup: the CLI, killed with SIGKILL as soon as its first candidate is complete
    out = tmp_path / "tune"
    argv = [sys.executable, "-m", "edgesmith", "tune", str(checkpoints["float"]), "--target", "local", "--out",
            str(out), "--formats", "gguf", "--method", "rtn", "--candidates", "3", "--max-size-mb", "0.1",
            "--calib-windows", "4", "--eval-tokens", "512", "--data", corpus]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("candidates/*/result.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (first,) = list(out.glob("candidates/*/result.json"))
    stamp = first.stat().st_mtime_ns
    # execute: the same command again
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    # assert: sensitivity and the first candidate come from the cache; the run completes and chooses
    assert r.returncode == 0, r.stderr
    assert "(cached, rtn" in r.stdout and "measured before (cached)" in r.stdout
    assert first.stat().st_mtime_ns == stamp
    assert "chosen:" in r.stdout and (out / "best" / "model.safetensors").is_file()


def test_structured_pruning_in_the_search_drops_a_block_to_meet_a_size_limit(checkpoints, corpus, tmp_path):
    # setup: a limit below uniform 4-bit's file (0.073 MB), above its size with one of the two blocks dropped (0.052)
    out = tmp_path / "tune"
    # execute
    doc = tune(checkpoints["float"], "local", out, formats=["gguf"], candidates=2, max_size_mb=0.06,
               drop_layers=1, data=corpus, **FAST)
    # assert: uniform 4-bit measured first and too large; the chosen candidate dropped a block and fits
    first, *rest = doc["candidates"]
    assert first["label"] == "4-bit x4" and first["misses"] == ["--max-size-mb 0.06"]
    (best,) = [r for r in rest if r["chosen"]]
    assert best["dropped"] and best["label"] == "4-bit x3, dropped x1" and best["size_mb"] <= 0.06
    assert best["kld_mean"] > first["kld_mean"] and doc["sensitivity"]["units"]["layers.0"]["drop"] > 0
    # the best checkpoint has one block, and the recipe prunes exactly that block before quantizing
    assert load_checkpoint(out / "best", with_model=False).config.n_layers == 1
    recipe = load_recipe(out / "recipe.toml")
    assert [type(p).__name__ for p in recipe.passes] == ["Prune", "RTN"] and recipe.passes[0].drop == \
        tuple(best["dropped"])
    assert "KLD dropped" in (out / "report.html").read_text()


def test_a_dropped_block_healed_by_distillation_loses_less(checkpoints, corpus, tmp_path):
    # setup: the same limit with and without healing (the sensitivities measured once, shared through the cache)
    args = dict(formats=["gguf"], candidates=2, max_size_mb=0.06, drop_layers=1, data=corpus, **FAST)
    plain = tune(checkpoints["float"], "local", tmp_path / "plain", **args)
    (tmp_path / "healed" / "cache").mkdir(parents=True)
    for f in (tmp_path / "plain" / "cache").iterdir():
        (tmp_path / "healed" / "cache" / f.name).write_bytes(f.read_bytes())
    # execute
    healed = tune(checkpoints["float"], "local", tmp_path / "healed", heal_steps=40, **args)
    # assert: the same block dropped, then distilled from the float model before quantizing: measured lower KLD
    (a,) = [r for r in plain["candidates"] if r["chosen"]]
    (b,) = [r for r in healed["candidates"] if r["chosen"]]
    assert a["dropped"] == b["dropped"] and b["heal_steps"] == 40 and b["label"].endswith("healed 40 steps")
    assert b["kld_mean"] < a["kld_mean"], (a["kld_mean"], b["kld_mean"])
    assert healed["candidates"][0]["heal_steps"] == 0  # uniform 4-bit drops nothing, so nothing to heal
    # the recipe rebuilds it: prune, distill, quantize
    recipe = load_recipe(tmp_path / "healed" / "recipe.toml")
    assert [type(p).__name__ for p in recipe.passes] == ["Prune", "Distill", "RTN"] and recipe.passes[1].steps == 40
    with pytest.raises(EdgesmithError, match="--heal-steps: heals a model after dropped blocks; give --drop-layers"):
        tune(checkpoints["float"], "local", tmp_path / "x", **{**args, "drop_layers": 0}, heal_steps=5)
