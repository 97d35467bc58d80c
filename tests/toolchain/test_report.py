"""The run report: every section, figures taken from the run's own files, no network, predictions
labelled as such."""

import base64
import json
import re

import pytest

from models.errors import EdgesmithError
from tests.toolchain.conftest import edgesmith
from runtimes.options import describe
from toolchain.report import write_report

SECTIONS = ("Lineage", "Passes: size, perplexity, KLD", "Per-layer SQNR (dB)", "Export parity",
            "Bench on local (measured)")


@pytest.fixture(scope="module")
def report(tiny_run):
    out, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    return out, (out / "report.html").read_text(), (out / "report.md").read_text()


def test_html_has_every_section_and_embedded_plots(report):
    # setup / execute
    out, html, _ = report
    # assert
    for title in SECTIONS:
        assert f">{title}</h2>" in html
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', html)
    assert {name for name, _ in images} == {"size_perplexity", "sqnr", "tok_s"}
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")


def test_html_is_self_contained(report):
    _, html, _ = report
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "@import" not in html


def test_figures_come_from_the_run_files(report):
    # setup
    out, html, md = report
    quant = json.loads((out / "checkpoints/02-quantize-rtn/compress_report.json").read_text())
    prune = json.loads((out / "checkpoints/01-prune-magnitude/compress_report.json").read_text())
    gguf = json.loads((out / "artifacts/gguf/manifest.json").read_text())
    bench = json.loads((out / "bench/local.json").read_text())
    # assert: per-pass perplexity and KL, parity, roofline fraction, as the tables print them
    for text in (html, md):
        assert f"{quant['passes'][0]['after']['perplexity']:.3f}" in text
        assert f"{quant['quality']['kl']:.3g}" in text
        assert f"{prune['passes'][0]['before']['perplexity']:.3f}" in text  # the source row
        assert f"{gguf['parity']['max_abs_logit_diff']:.3g}" in text
        for r in bench:
            assert f"{r['roofline_fraction']:.3f}" in text
            assert r["run_options"] and describe(r["run_options"]) in text  # what the row ran with
            assert f"{r['decode_tok_s']['median']:,.1f}" in text
    layers = quant["layer_sqnr_db"]
    assert len(layers) >= 10 and all(f"{v:.1f}" in html for v in layers.values() if v is not None)


def test_markdown_has_the_same_sections_and_its_pictures_exist(report):
    out, _, md = report
    for title in SECTIONS:
        assert f"## {title}" in md
    pictures = re.findall(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", md)
    assert len(pictures) == 3 and all((out / p).is_file() for p in pictures)


def test_unmeasured_device_shows_the_prediction_never_a_measurement(tiny_run, tmp_path):
    # setup: the tiny run's trained checkpoint, exported for a phone that cannot be reached
    out, first = tiny_run
    assert first.returncode == 0
    recipe = tmp_path / "phone.toml"
    recipe.write_text(f'name = "phone"\n[source]\ncheckpoint = "{out / "checkpoints/00-train"}"\n'
                      '[export]\nformats = ["gguf"]\nmax_seq_len = 128\n[target]\ndevice = "pixel-8"\n')
    # execute
    result = edgesmith("run", recipe, "--out", tmp_path / "phone")
    # assert
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "phone/bench/pixel-8.plan.json").read_text())
    assert plan["measured"] is False and "no target.uri" in plan["reason"]
    html = (tmp_path / "phone/report.html").read_text()
    assert "Bench on pixel-8: NOT MEASURED — planner prediction" in html and "(measured)" not in html
    assert f"{plan['plan']['decode_tok_s_bound']:,.4g}" in html
    assert not (tmp_path / "phone/bench/pixel-8.json").exists()
    assert "NOT MEASURED" in result.stdout


def test_write_report_outside_a_run_directory(tmp_path):
    with pytest.raises(EdgesmithError, match="no run.json"):
        write_report(tmp_path)
