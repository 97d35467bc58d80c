"""What the GUI builds without a browser: a job's stage progress read from a recipe run's log, the recipes
the job tabs write, and a run's report made self-contained (tables and images, nothing fetched)."""

import re
import shutil
import time
import tomllib

import pytest

from gui import recipes, views
from gui.playground import sampling
from gui.runs import inline_images, report_frame
from gui.workspace import Workspace
from models.errors import EdgesmithError
from toolchain.jobs import read_progress
from toolchain.recipe import parse_recipe

# what toolchain/pipeline.py prints (Progress.start) and the trainer's tqdm counter after it
LOG = ("edgesmith run t -> runs/t: 3 steps, 3 to run\n"
       "[1/3 source] 1/1 00-train: train nano on corpus, 12 steps  (elapsed 0:02, ETA 1:40)\n"
       "train:  25%|##   | 3/12 [00:01<00:03, 2.1step/s]\r"
       "train:  50%|#### | 6/12 [00:02<00:02, 2.1step/s]\r")


@pytest.mark.parametrize("log, stage, counter, fraction", [
    (LOG, "source", "train 6/12", (0 + 0.5) / 3),
    (LOG + "    00-train: done in 3.0 s\n[2/3 compress] 1/1 01-quantize-rtn: quantize {\"bits\": 4}  "
     "(elapsed 0:05, ETA 0:30)\n", "compress", None, 1 / 3),
    ("train:  50%|#### | 6/12 [00:02<00:02, 2.1step/s]\r", None, "train 6/12", 0.5),
    (LOG + "    00-train: done in 3.0 s\n[2/3 compress] 1/1 01-quantize-rtn: quantize {\"bits\": 4}  "
     "(elapsed 0:05, ETA 0:30)\ntokenize train:  25%|##   | 1.00MB/4.00MB [00:01<00:03, 1.0MB/s]\r", "compress",
     "tokenize train 1M/4M", (1 + 0.25) / 3),
], ids=["counter-in-stage", "stage-without-counter", "plain-command", "tokenization-bytes-in-stage"])
def test_progress_reads_the_stage_and_the_counter_after_it(tmp_path, log, stage, counter, fraction):
    # setup
    (tmp_path / "log.txt").write_text(log)
    # execute
    p = read_progress(tmp_path / "log.txt", started=time.time() - 20)
    text = views.progress_text(p)
    # assert
    assert p["fraction"] == pytest.approx(fraction)
    assert (p.get("stage") or {}).get("name") == stage
    if stage:
        assert re.search(rf"stage \d/3 {stage} · .* · ETA \d+:\d\d", text), text
    if counter:
        assert counter in text, text
    if stage == "compress":  # printed 5 s after the run began with 30 s to go; the run began 20 s ago
        assert 10 <= p["stage"]["eta_s"] <= 16, p


def test_an_overdue_stage_says_so_instead_of_a_negative_time():
    p = {"label": "report", "n": 1, "total": 1, "fraction": 0.5,
         "stage": {"index": 2, "count": 2, "name": "report", "step": "report.html", "steps": "1/1", "eta_s": -3}}
    assert views.progress_text(p).endswith("ETA: any moment (past the estimate)")


def test_compress_form_becomes_a_valid_recipe_with_rules_and_extra_passes(tmp_path, checkpoints):
    # setup
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(checkpoints["float"], ws.root / "models" / "tiny")
    out, name = recipes.run_dir(ws, "", "runs/tiny-compressed")
    # execute
    doc = recipes.compress_doc(ws, name, out, "models/tiny", ["quantize:method=rtn,bits=4,group_size=32",
                                                            "prune:method=heads,ratio=0.25"], "lm_head=8",
                               "stdlib", 64, 4096)
    path, recipe = recipes.write(ws, doc)
    # assert: the file is the recipe, validated, with the form's values in the right tables
    assert path == "recipes/tiny-compressed.toml"
    again = parse_recipe(tomllib.loads((ws.root / path).read_text()), origin=str(ws.root / path))
    assert again == recipe and recipe.source.checkpoint == "models/tiny"
    assert [type(p).__name__ for p in recipe.passes][0] != type(recipe.passes[1]).__name__
    assert recipe.passes[0].rules == (("lm_head", 8),) and recipe.compress.calib_seq_len == 64


@pytest.mark.parametrize("specs, rules, message", [
    ([], "", "passes: choose a quantization method"),
    (["quantize:method=rtn,bits=6,group_size=32"], "", "bits"),
    (["quantize:method=rtn,bits=4,group_size=32"], "lm_head", "expected REGEX=4"),
    (["nope:x=1"], "", "unknown pass kind 'nope'"),
])
def test_a_bad_compress_form_is_one_line(tmp_path, checkpoints, specs, rules, message):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(checkpoints["float"], ws.root / "models" / "tiny")
    out, name = recipes.run_dir(ws, "runs/x", "runs/x")
    with pytest.raises(EdgesmithError, match=re.escape(message)) as e:
        recipes.compress_doc(ws, name, out, "models/tiny", specs, rules, "stdlib", 64, 4096)
    assert "\n" not in str(e.value)


def test_a_run_directory_holding_the_source_checkpoint_is_refused(tmp_path, checkpoints):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(checkpoints["float"], ws.root / "runs" / "t" / "checkpoints" / "00-train")
    out, name = recipes.run_dir(ws, "runs/t", "runs/x")
    with pytest.raises(EdgesmithError, match="holds the source checkpoint"):
        recipes.export_doc(ws, name, out, "runs/t/checkpoints/00-train", ["gguf"], "fp32", 0, "")


def test_report_images_are_inlined_and_outside_paths_dropped(tmp_path):
    # setup: a report naming a plot of its own, one outside the run, one missing, one already inline
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (run / "report" / "a.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    doc = ('<table><tr><th>max |Δlogit|</th></tr></table><img src="report/a.png"><img src="../secret.png">'
           '<img alt="gone" src="report/missing.png"><img src="data:image/png;base64,AAAA">')
    (run / "report.html").write_text(doc)
    # execute
    inlined = inline_images(doc, run)
    frame = report_frame(run)
    # assert
    srcs = re.findall(r'src="([^"]*)"', inlined)
    assert srcs[0].startswith("data:image/png;base64,") and srcs[1:] == ["", "", "data:image/png;base64,AAAA"]
    assert frame.startswith('<iframe class="es-report"') and 'sandbox=""' in frame and "max |Δlogit|" in frame
    assert "report/a.png" not in frame and "No report" in report_frame(tmp_path)


@pytest.mark.parametrize("fields, message", [
    ((96, "abc", "", "", 1.0, 0), "temperature: 'abc' is not a number"),
    ((96, "nan", "", "", 1.0, 0), "temperature: 'nan' is not a finite number"),
    (("1.5", 0.8, "", "", 1.0, 0), "max new tokens: '1.5' must be a whole number"),
    ((96, 0.8, "-2", "", 1.0, 0), "top-k: '-2' must be >= 0"),
    ((96, 0.8, "", "0", 1.0, 0), "top-p: '0' must be > 0"),
])
def test_bad_sampling_numbers_are_one_line(fields, message):
    with pytest.raises(EdgesmithError) as e:
        sampling(*fields)
    assert str(e.value) == message


def test_blank_sampling_fields_mean_off():
    cfg = sampling("32", "0.7", "", "", "", "-1")
    assert (cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.seed) == \
        (32, 0.7, None, None, 1.0, None)
    cfg = sampling(32, 0.7, "40", "0.9", "1.1", "7")
    assert (cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.seed) == (40, 0.9, 1.1, 7)
