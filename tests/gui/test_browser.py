"""The GUI in a real browser: Debian's chromium driven by Playwright against `edgesmith gui`.

Each test drives one tab (fill, click, wait for the result written by the real command) and saves a
screenshot of the tab's final state into test-output/gui/. The tests share one app and one
workspace (tests/gui/conftest.py) and run in file order: compress reads the checkpoint fixture,
the runs tab shows what the earlier tests wrote.
"""

import importlib.util
import os
import re

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (Debian package "
                                "chromium; .ci/run installs it)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
JOB_S = 120_000  # ms a background job may take here (tokenizer training included)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, gui_url):
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.goto(gui_url)
    page.wait_for_selector("#train-start")
    yield page
    page.close()


def expect():
    from playwright.sync_api import expect as e

    return e


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def fill(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id}").locator("input, textarea").first
    field.fill(str(value))
    field.press("Tab")


def choose(page, elem_id: str, value: str) -> None:
    """Set a dropdown (custom values allowed) by typing its value."""
    field = page.locator(f"#{elem_id} input").first
    field.click()
    field.fill(value)
    option = page.get_by_role("option", name=value, exact=True)
    if option.count():
        option.first.click()
    else:
        field.press("Enter")
    field.press("Tab")
    assert field.input_value() == value


def job_value(page, prefix: str) -> str:
    return page.locator(f"#{prefix}-job input, #{prefix}-job textarea").first.input_value()


def start_and_wait(page, prefix: str) -> str:
    """Click Start, wait for the new job's id, then for that job (not an earlier one) to be done."""
    before = job_value(page, prefix)
    page.click(f"#{prefix}-start")
    page.wait_for_function(f"""() => {{
        const f = document.querySelector('#{prefix}-job input, #{prefix}-job textarea');
        return f && f.value && f.value !== {before!r};
    }}""", timeout=30_000)
    job_id = job_value(page, prefix)
    expect()(page.locator(f"#{prefix}-status")).to_contain_text(re.compile(re.escape(job_id) + r".*done"),
                                                                timeout=JOB_S)
    return job_id


def shot(page, screenshots, name: str) -> None:
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # close an open dropdown list
    page.mouse.click(2, 2)
    page.wait_for_timeout(200)
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


WATCH = """([sel, key]) => {
  window[key] = [];
  const target = document.querySelector(sel);
  new MutationObserver(() => window[key].push(target.innerText))
    .observe(target, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


# every table, before anything has filled it: tab -> table ids
EMPTY_TABLES = {"Compress": ["compress-table"], "Export": ["export-parity", "export-files"],
                "Benchmark": ["bench-table"], "Devices": ["devices-table", "devices-spec"]}


def test_every_empty_table_shows_its_column_names(page):
    # execute / assert: Gradio's placeholder headers (1, 2, 3) mean a table was built without its columns
    for name, tables in EMPTY_TABLES.items():
        tab(page, name)
        for elem_id in tables:
            headers = [h.strip() for h in page.locator(f"#{elem_id} th").all_inner_texts() if h.strip()]
            assert headers and not any(h.isdigit() for h in headers), (elem_id, headers)


def test_train_tab_trains_with_a_live_loss_plot(page, screenshots):
    # setup
    tab(page, "Train")
    fill(page, "train-data", "corpus")
    fill(page, "train-steps", 12)
    fill(page, "train-batch", 2)
    fill(page, "train-seq", 32)
    fill(page, "train-out", "runs/browser-train")
    page.evaluate(WATCH, ["#train-progress", "trainBar"])
    # execute
    start_and_wait(page, "train")
    # assert: the bar showed the pipeline's stage with a time left while it trained
    seen = page.evaluate("window.trainBar")
    assert any(re.search(r"stage 1/2 source · 00-train \(1/1\) · .*ETA", t) for t in seen), seen
    expect()(page.locator("#train-progress")).to_contain_text("done")
    expect()(page.locator("#train-loss svg").first).to_be_visible(timeout=10_000)
    assert page.locator("#train-loss").inner_text().count("step") >= 1
    shot(page, screenshots, "train")


def test_a_path_outside_the_workspace_is_refused(page, screenshots, gui_workspace):
    tab(page, "Train")
    fill(page, "train-data", "../outside")
    page.click("#train-start")
    expect()(page.locator("#train-note")).to_contain_text("outside the workspace", timeout=10_000)
    expect()(page.locator("#train-note")).to_contain_text("Refused")
    fill(page, "train-data", "corpus")
    tab(page, "Compress")
    choose(page, "compress-checkpoint", "escape/ckpt")  # a symlink to a directory outside
    page.click("#compress-start")
    expect()(page.locator("#compress-note")).to_contain_text("outside the workspace", timeout=10_000)
    assert not (gui_workspace / "runs" / "ckpt-compressed").exists()
    shot(page, screenshots, "refused")


def options(page, elem_id: str) -> list[str]:
    """The choices a dropdown offers now (opens and closes its list)."""
    field = page.locator(f"#{elem_id} input").first
    field.click()
    field.fill("")
    found = page.get_by_role("option").all_inner_texts()
    field.press("Escape")
    page.mouse.click(2, 2)
    return [t.strip() for t in found]





def test_compress_tab_shows_stage_progress_quality_table_and_sqnr_heatmap(page, screenshots):
    tab(page, "Compress")
    # the train test's checkpoint is offered without a reload: lists refresh when a job finishes
    assert "runs/browser-train/checkpoints/00-train" in options(page, "compress-checkpoint")
    choose(page, "compress-checkpoint", "models/tiny")
    fill(page, "compress-out", "runs/browser-q4")
    fill(page, "compress-data", "corpus")
    page.evaluate(WATCH, ["#compress-progress", "compressBar"])
    start_and_wait(page, "compress")
    # every state the bar showed while it ran: the pipeline's stages with a time left, never a bare "starting 0 %"
    # (the compress stage itself takes under a poll here; the report stage takes seconds)
    seen = page.evaluate("window.compressBar")
    assert any(re.search(r"stage 2/2 report · report\.html \(1/1\) · 50 % of the run · ETA", t) for t in seen), seen
    assert not any("0 %" in t and "stage" not in t for t in seen), seen
    expect()(page.locator("#compress-table")).to_contain_text("total vs reference", timeout=10_000)
    expect()(page.locator("#compress-table")).to_contain_text("quantize rtn")
    expect()(page.locator("#compress-heatmap img, #compress-heatmap svg").first).to_be_visible(timeout=10_000)
    shot(page, screenshots, "compress")


def test_export_tab_shows_parity_artifacts_and_target_device(page, screenshots, gui_workspace):
    tab(page, "Export")
    assert "runs/browser-q4/checkpoints/01-quantize-rtn" in options(page, "export-checkpoint")
    choose(page, "export-checkpoint", "runs/browser-q4/checkpoints/01-quantize-rtn")
    fill(page, "export-out", "runs/browser-export")
    choose(page, "export-target", "pixel-8")
    start_and_wait(page, "export")
    expect()(page.locator("#export-parity")).to_contain_text("llama-cpp-python", timeout=10_000)
    expect()(page.locator("#export-files")).to_contain_text("runs/browser-export/artifacts/gguf/model.gguf")
    expect()(page.locator("#export-verdict")).to_contain_text("target pixel-8")
    expect()(page.locator("#export-verdict")).to_contain_text("decode bound")
    # the tab wrote its recipe into the workspace: the Runs tab can run it again
    assert 'formats = ["gguf"]' in (gui_workspace / "recipes" / "browser-export.toml").read_text()
    shot(page, screenshots, "export")


def test_devices_tab_plans_a_model_on_a_profile(page, screenshots):
    tab(page, "Devices")
    choose(page, "devices-profile", "raspberry-pi-5")
    choose(page, "devices-model", "nano")
    fill(page, "devices-context", 512)
    page.click("#devices-plan")
    verdict = page.locator("#devices-verdict")
    expect()(verdict).to_contain_text("nano on raspberry-pi-5: fits", timeout=30_000)
    expect()(verdict).to_contain_text("tok/s")
    expect()(page.locator("#devices-table")).to_contain_text("decode_tok_s_bound")
    shot(page, screenshots, "devices")


def test_devices_tab_plans_a_public_shape_and_refuses_in_one_line(page, screenshots):
    tab(page, "Devices")
    choose(page, "devices-profile", "pixel-8")
    choose(page, "devices-model", "llama-3.2-1b")
    fill(page, "devices-context", 0)
    page.click("#devices-plan")
    expect()(page.locator("#devices-verdict")).to_contain_text("llama-3.2-1b on pixel-8", timeout=30_000)
    expect()(page.locator("#devices-table")).to_contain_text("max_context")
    # a model that is nothing: one line, and the empty plan table keeps its real headers
    choose(page, "devices-model", "no-such-model")
    page.click("#devices-plan")
    expect()(page.locator("#devices-verdict")).to_contain_text("not a size or public shape", timeout=30_000)
    headers = page.locator("#devices-table th").all_inner_texts()
    assert any("quantity" in h for h in headers) and not any(h.strip() in ("1", "2", "3") for h in headers), headers


def test_benchmark_tab_runs_and_shows_the_roofline_fraction(page, screenshots):
    tab(page, "Benchmark")
    if importlib.util.find_spec("devices.bench") is None:
        expect()(page.locator("#bench-start, #bench-missing").first).to_be_visible()
        shot(page, screenshots, "benchmark")
        pytest.skip("devices/bench.py is not in this tree yet: the tab is there, the harness is not")
    field = page.locator("#bench-artifacts input").first
    field.click()
    page.get_by_role("option", name="models/tiny-gguf", exact=True).click()
    expect()(page.locator("#bench-artifacts")).to_contain_text("models/tiny-gguf")
    fill(page, "bench-prompt-len", 16)
    fill(page, "bench-gen-len", 16)
    fill(page, "bench-repeat", 1)
    start_and_wait(page, "bench")
    expect()(page.locator("#bench-table")).to_contain_text("tiny-gguf", timeout=10_000)
    assert re.search(r"0\.\d{3}|1\.\d{3}", page.locator("#bench-table").inner_text())  # a roofline fraction
    # the runtime options each row ran with (the artifact's manifest's: no control was touched)
    expect()(page.locator("#bench-table")).to_contain_text("options")
    assert re.search(r"kv_cache=f32 threads=1", page.locator("#bench-table").inner_text())
    for control in ("threads", "accuracy-level", "kv-cache", "flash-attn"):
        expect()(page.locator(f"#bench-{control}")).to_be_visible()
    shot(page, screenshots, "benchmark")


def test_tune_tab_measures_candidates_and_shows_the_pareto_plot(page, screenshots):
    tab(page, "Tune")
    choose(page, "tune-checkpoint", "models/tiny")
    fill(page, "tune-max-size", 0.1)
    choose(page, "tune-method", "rtn")
    fill(page, "tune-candidates", 2)
    fill(page, "tune-data", "corpus")
    start_and_wait(page, "tune")
    table = page.locator("#tune-table")
    expect()(table).to_contain_text("chosen", timeout=20_000)
    assert "4-bit x4" in table.inner_text() and "measured on local" in table.inner_text()
    expect()(page.locator("#tune-plot img")).to_be_visible(timeout=20_000)
    shot(page, screenshots, "tune")


OBSERVE = """([sel, key]) => {
  window[key] = [];
  const box = document.querySelector(sel + ' textarea');
  const timer = setInterval(() => window[key].push(box.value.length), 10);
  setTimeout(() => clearInterval(timer), 60000);
}"""


def code_text(page, elem_id: str) -> str:
    """The text a Playground pane shows, exactly (a read-only text box)."""
    return page.locator(f"#{elem_id} textarea").input_value()


def test_playground_streams_two_models_side_by_side_as_code(page, screenshots):
    tab(page, "Playground")
    page.click("#play-clear")
    choose(page, "play-a", "models/tiny-gguf")  # at most 63 new tokens (a 128-token KV cache), fast
    choose(page, "play-b", "models/tiny-long")  # 1500 tokens, each reading a 16384-position cache: seconds
    fill(page, "play-max-new", 1500)
    fill(page, "play-temperature", 0)
    fill(page, "play-top-k", 40)
    fill(page, "play-top-p", 0.9)
    fill(page, "play-penalty", 1.1)
    prompt = "    def __init__(self, x):\n        self.x = x\n"  # a method body: indented from its first line
    page.locator("#play-prompt textarea").fill(prompt)
    page.evaluate(OBSERVE, ["#play-out-a", "lengthsA"])
    page.evaluate(OBSERVE, ["#play-out-b", "lengthsB"])
    page.click("#play-send")
    expect()(page.locator("#play-status")).to_contain_text("Done.", timeout=60_000)
    # the text grew over several renders (at most 25 a second: gui/playground.py UPDATE_S); A's 63 fast tokens
    # may all come in one of them, B's 1500 slower ones come over many
    for key, stats, renders in (("lengthsA", "#play-stats-a", 2), ("lengthsB", "#play-stats-b", 10)):
        lengths = page.evaluate(f"window.{key}")
        assert len(set(lengths)) >= renders and lengths == sorted(lengths), (key, sorted(set(lengths)))
        assert re.search(r"\d+ tokens", page.locator(stats).inner_text())
    assert "llamacpp" in page.locator("#play-stats-a").inner_text()
    assert "torch" in page.locator("#play-stats-b").inner_text()
    # plain code: the prompt's indentation is kept, `__init__` is not turned into bold Markdown, and the
    # pane's font is monospace (columns line up)
    for pane in ("play-out-a", "play-out-b"):
        assert code_text(page, pane).startswith(prompt), code_text(page, pane)
        assert page.locator(f"#{pane} strong, #{pane} b, #{pane} em").count() == 0
        font = page.locator(f"#{pane} textarea").evaluate("e => getComputedStyle(e).fontFamily")
        assert "monospace" in font, font
    shot(page, screenshots, "playground")


def test_playground_refuses_a_bad_number_in_one_status_line(page):
    tab(page, "Playground")
    choose(page, "play-a", "models/tiny-gguf")
    choose(page, "play-b", "none")
    page.locator("#play-prompt textarea").fill("def add(a, b):")
    for value, message in (("abc", "temperature: 'abc' is not a number"), ("-1", "temperature: '-1' must be >= 0")):
        fill(page, "play-temperature", value)
        page.click("#play-send")
        expect()(page.locator("#play-status")).to_contain_text(message, timeout=20_000)
        assert page.locator(".toast-body").count() == 0  # no error toast
        assert "Error" not in page.locator("#play-out-a").inner_text() and code_text(page, "play-out-a") == ""
    fill(page, "play-temperature", 0)


def test_playground_shows_the_verdict_and_loads_nothing_that_fails_it(page, screenshots, gui_workspace):
    # setup: a copy of the GGUF artifact whose header asks for 2^62 tensors, resealed (only the header check sees it)
    import json
    import shutil

    from toolchain.export.manifest import write_manifest

    bad = gui_workspace / "models" / "hostile-gguf"
    shutil.copytree(gui_workspace / "models" / "tiny-gguf", bad)
    data = bytearray((bad / "model.gguf").read_bytes())
    data[8:16] = (1 << 62).to_bytes(8, "little")
    (bad / "model.gguf").write_bytes(bytes(data))
    write_manifest(bad, json.loads((bad / "manifest.json").read_text()))
    tab(page, "Playground")
    page.click("#play-clear")
    # execute: pick it, open the verdict
    choose(page, "play-a", "models/hostile-gguf")
    choose(page, "play-b", "models/tiny-gguf")
    line = page.locator("#play-verdict-line")  # one line per model, the table in an accordion
    expect()(line).to_contain_text("B: models/tiny-gguf — verified (4 checks)", timeout=20_000)
    assert "A: models/hostile-gguf — FAILED: model.gguf" in line.inner_text()
    page.get_by_text("Verify: the verdict per file", exact=False).click()
    table = page.locator("#play-verdict")
    # assert: B's four files ok, A's model.gguf failed on its header, named in the row
    cells = [line.strip() for line in table.inner_text().splitlines() if line.strip()]
    assert cells[:4] == ["model", "file", "verdict", "detail"], cells
    rows = [cells[i:i + 4] for i in range(4, len(cells), 4)]
    verdicts = {(r[0].split(":")[0], r[1]): r[2] for r in rows if len(r) >= 3}
    assert verdicts[("A", "model.gguf")] == "FAILED" and verdicts[("A", "tokenizer.json")] == "ok", rows
    assert [v for (m, _), v in verdicts.items() if m == "B"] == ["ok"] * 4, rows
    page.locator("#play-prompt textarea").fill("def add(a, b):")
    page.click("#play-send")
    expect()(page.locator("#play-status")).to_contain_text("Refused:", timeout=20_000)
    assert "model.gguf" in page.locator("#play-status").inner_text()
    assert code_text(page, "play-out-a") == "" and code_text(page, "play-out-b") == ""
    shot(page, screenshots, "playground-verdict")
    choose(page, "play-b", "none")


def test_playground_stop_stops_the_stream(page, screenshots):
    # setup: a model with a 16384-token KV cache asked for 8000 tokens (a minute or more here)
    tab(page, "Playground")
    choose(page, "play-a", "models/tiny-long")
    choose(page, "play-b", "none")
    fill(page, "play-max-new", 8000)
    fill(page, "play-temperature", 0)
    page.locator("#play-prompt textarea").fill("def add(a, b):")
    page.click("#play-send")
    expect()(page.locator("#play-stats-a")).to_contain_text(re.compile(r"[1-9]\d* tokens"), timeout=60_000)
    expect()(page.locator("#play-status")).to_have_text("Generating…")
    # execute
    page.click("#play-stop")
    expect()(page.locator("#play-status")).to_contain_text("Stopped.", timeout=10_000)
    page.wait_for_timeout(500)
    stopped_at = page.locator("#play-stats-a").inner_text()
    page.wait_for_timeout(2000)
    # assert: nothing more arrives, and it stopped well before the 8000 tokens
    assert page.locator("#play-stats-a").inner_text() == stopped_at
    assert int(re.search(r"(\d+) tokens", stopped_at).group(1)) < 6000, stopped_at
    shot(page, screenshots, "playground-stopped")


def test_runs_tab_opens_on_the_newest_run_with_its_report(page, screenshots, gui_workspace):
    # setup: what a user finds on opening the page
    runs = [p for p in (gui_workspace / "runs").iterdir() if p.is_dir()]
    newest = max(runs, key=lambda p: p.stat().st_mtime)
    failed = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.reload()
    page.wait_for_selector("#train-start")
    tab(page, "Runs")
    # assert: the newest run is selected and shown, without a click
    expect()(page.locator("#runs-run input").first).to_have_value(f"runs/{newest.name}", timeout=10_000)
    assert newest.name == "browser-export"
    frame = page.frame_locator("#runs-report iframe")
    expect()(frame.locator("h1")).to_contain_text("browser-export", timeout=10_000)
    expect()(frame.locator("th", has_text="max |Δlogit|")).to_have_count(1)  # a real table, header and all
    # execute: choosing another run shows it (no Show click): a compress run, whose report has plots
    choose(page, "runs-run", "runs/browser-q4")
    expect()(frame.locator("h1")).to_contain_text("browser-q4", timeout=10_000)
    # assert: its tables render as tables, every image it shows has loaded, and nothing failed to load
    assert frame.locator("table").count() >= 3
    widths = frame.locator("img").evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : -1)")
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths
    lineage = page.locator("#runs-lineage")
    expect()(lineage).to_contain_text("runs/browser-q4")
    expect()(lineage).to_contain_text("models/tiny")
    expect()(lineage).to_contain_text("quantize rtn 4-bit g32")
    expect()(page.locator("#runs-summary")).to_contain_text("compress_report.json")
    expect()(page.locator("#runs-jobs")).to_contain_text("compress")
    assert not failed, failed
    shot(page, screenshots, "runs")


def test_a_running_job_survives_a_reload_and_stops(page, screenshots, gui_workspace):
    # setup: a training run far longer than the test
    tab(page, "Train")
    fill(page, "train-data", "corpus")
    fill(page, "train-steps", 100000)
    fill(page, "train-batch", 2)
    fill(page, "train-seq", 32)
    fill(page, "train-out", "runs/browser-long")
    page.click("#train-start")
    expect()(page.locator("#train-progress")).to_contain_text(re.compile(r"train [\d.]+k?/100k"), timeout=JOB_S)
    job_id = page.locator("#train-job input, #train-job textarea").first.input_value()
    # execute: reload the page; the tab finds the job again
    page.reload()
    page.wait_for_selector("#train-start")
    expect()(page.locator("#train-job input, #train-job textarea").first).to_have_value(job_id, timeout=10_000)
    expect()(page.locator("#train-status")).to_contain_text("running", timeout=10_000)
    expect()(page.locator("#train-progress")).to_contain_text(re.compile(r"train [\d.]+k?/100k"), timeout=10_000)
    page.click("#train-stop")
    # assert
    expect()(page.locator("#train-status")).to_contain_text("cancelled", timeout=30_000)
    assert list((gui_workspace / "runs" / "browser-long" / ".work").glob("train-*/metrics.jsonl"))
    shot(page, screenshots, "train-cancelled")
