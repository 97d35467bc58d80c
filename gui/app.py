"""The Gradio Blocks layout: eight tabs wired to `Actions`, `Playground` and the devices/runs helpers.

Layout only: every event handler is a method or function of gui/actions.py, gui/playground.py,
gui/devices_tab.py, gui/bench_tab.py, gui/tune_tab.py or gui/runs.py, each with an `api_name` so `gradio_client`
reaches the same actions the browser does. Choices come from the registries (formats, quantize
methods, pass kinds, precisions) and from the workspace. One `gr.Timer` polls the jobs' state on
disk; each tab picks up the newest job of its kind on page load, so a reload (or a restarted GUI)
shows running jobs again; when a job finishes, the lists of runs, checkpoints and artifacts are
refreshed. Import it through gui/server.py, which sets the environment (analytics off, caches in
the workspace) before Gradio is imported.
"""

from __future__ import annotations

import os

import gradio as gr
import pandas as pd

from gui import bench_tab, devices_tab, run_options, runs, tune_tab, views
from gui.actions import JOB_COLUMNS, SKIP, Actions
from gui.playground import VERDICT_COLUMNS, Playground, verdict_line, verdict_table
from models.llama import SIZES
from models.quant import BITS as QUANT_BITS
from models.registry import FORMATS, METHODS
from toolchain.compress import pass_kinds
from toolchain.export.spec import PRECISIONS

POLL_S = 1.0
CACHE_S = 24 * 3600  # Gradio's copies of uploads and of files it shows are deleted after a day (checked hourly)
PLAY_CONCURRENCY = 2  # Playground streams at once (gui/playground.py COPIES: each has its own session)
HIDDEN = dict(show_progress="hidden")
CSS = ".es-code textarea{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace!important;" \
      "white-space:pre-wrap;tab-size:4;font-size:13px;line-height:1.45}"  # gui/server.py passes it to launch
PRIVATE = dict(api_visibility="private")


def _skips(values):
    return tuple(gr.skip() if v is SKIP else v for v in values)


def build_app(workspace) -> gr.Blocks:
    act = Actions(workspace)
    lists = {}  # name -> dropdowns refreshed from the workspace when a job finishes
    with gr.Blocks(title="edgesmith", analytics_enabled=False, delete_cache=(3600, CACHE_S)) as demo:
        gr.Markdown(f"## edgesmith\nWorkspace `{act.ws.root}`: paths are relative to it, and paths outside it "
                    "are refused. Each job runs a recipe (written to `recipes/`) into a run directory under `runs/`.")
        timer = gr.Timer(POLL_S)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                _train_tab(act, timer, demo)
            with gr.Tab("Compress", id="compress"):
                lists["compress"] = _compress_tab(act, timer, demo)
            with gr.Tab("Export", id="export"):
                lists["export"] = _export_tab(act, timer, demo)
            with gr.Tab("Benchmark", id="benchmark"):
                lists["bench"] = bench_tab.build(act, timer, demo)
            with gr.Tab("Tune", id="tune"):
                lists["tune"] = tune_tab.build(act, timer, demo)
            with gr.Tab("Devices", id="devices"):
                lists["devices"] = _devices_tab(act)
            with gr.Tab("Playground", id="playground"):
                lists["play_a"], lists["play_b"] = _playground_tab(act)
            with gr.Tab("Runs", id="runs"):
                lists["runs"], lists["recipe"], lists["jobs"] = _runs_tab(act, timer, demo)
        jobs = lists.pop("jobs")
        _refresh_lists(act, timer, demo, lists, jobs)
    return demo


def _refresh_lists(act: Actions, timer, demo, lists: dict, jobs) -> None:
    """Every list of workspace paths and the jobs table, refreshed on load and whenever a job starts or
    finishes (the jobs' state key changes)."""
    key = gr.State("")
    names = list(lists)

    def choices() -> dict:
        ckpts, arts = act.choices()
        models = ckpts + arts
        return {"compress": ckpts, "export": ckpts, "tune": ckpts, "bench": arts, "devices": devices_tab.shapes() + models,
                "play_a": models, "play_b": ["none", *models], "runs": act.ws.runs(),
                "recipe": runs.recipe_names(act.ws)}

    def refresh(shown: str):
        now = act.lists_key()
        if now == shown:
            return (gr.skip(),) * (len(names) + 2)
        c = choices()
        return (now, act.jobs_table(), *(gr.Dropdown(choices=c[n]) for n in names))

    outputs = [key, jobs, *(lists[n] for n in names)]
    timer.tick(refresh, [key], outputs, **HIDDEN, **PRIVATE)

    def first():
        c = choices()
        values = {"play_a": c["play_a"][-1] if c["play_a"] else None, "runs": c["runs"][0] if c["runs"] else None}
        return (act.lists_key(), act.jobs_table(), *(gr.Dropdown(choices=c[n], value=values[n]) if n in values
                                                     else gr.Dropdown(choices=c[n]) for n in names))

    demo.load(first, None, outputs, **PRIVATE)


def _job_widgets(prefix: str):
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=f"{prefix}-start")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
    note = gr.Markdown(elem_id=f"{prefix}-note")  # a refused start: no poll writes here, so none overwrites it
    job = gr.Textbox(label="Job", interactive=False, elem_id=f"{prefix}-job")
    status = gr.Markdown(elem_id=f"{prefix}-status")
    bar = gr.HTML(elem_id=f"{prefix}-progress")
    return start, stop, job, status, bar, note


def noted(start):
    """A start handler's (job id, status) plus the note line: the refusal when no job started, else empty."""
    def handler(*args):
        job, status = start(*args)
        return job, status, "" if job else status
    return handler


def _log():
    return gr.Textbox(label="Log", lines=6, max_lines=10, interactive=False, autoscroll=True)


def _train_tab(act: Actions, timer, demo):
    with gr.Row():
        model = gr.Dropdown(list(SIZES), value="nano", label="Model size (or a CONFIG.json)", allow_custom_value=True,
                            elem_id="train-model")
        data = gr.Textbox("stdlib", label="Corpus: 'stdlib' or a file/folder in the workspace", elem_id="train-data")
        upload = gr.File(label="Upload a corpus file (to data/)", elem_id="train-upload", height=80)
    with gr.Row():
        steps = gr.Number(600, label="Steps", precision=0, minimum=1, elem_id="train-steps")
        nproc = gr.Number(1, label="Processes", precision=0, minimum=1, maximum=os.cpu_count(), elem_id="train-nproc")
        batch = gr.Number(16, label="Global batch (sequences)", precision=0, minimum=1, elem_id="train-batch")
        seq = gr.Number(256, label="Sequence length", precision=0, minimum=8, elem_id="train-seq")
        out = gr.Textbox("runs/train", label="Run directory", elem_id="train-out")
    start, stop, job, status, bar, note = _job_widgets("train")
    plot = gr.LinePlot(x="step", y="loss", title="train loss (live)", height=260, elem_id="train-loss")
    log = _log()
    start.click(noted(act.train_start), [model, data, steps, nproc, batch, seq, out, job], [job, status, note],
                api_name="train")
    stop.click(act.cancel, [job], [status], api_name="cancel_train")
    upload.upload(act.upload_corpus, [upload], [data, status], api_name="upload_corpus")
    timer.tick(lambda job_id: _skips(act.train_poll(job_id)), [job], [status, bar, plot, log], api_name="train_status",
               **HIDDEN)
    demo.load(lambda: act.latest_job("train"), None, [job], **PRIVATE)


def _compress_tab(act: Actions, timer, demo):
    with gr.Row():
        ckpt = gr.Dropdown([], label="Checkpoint", allow_custom_value=True, elem_id="compress-checkpoint")
        out = gr.Textbox("", label="Run directory (default runs/<checkpoint>-compressed)", elem_id="compress-out")
    with gr.Row():
        method = gr.Dropdown([*METHODS.names(), "none"], value="rtn", label="Quantization", elem_id="compress-method")
        bits = gr.Dropdown(list(QUANT_BITS), value=4, label="Bits (5: GGUF Q5_0)", elem_id="compress-bits")
        group = gr.Dropdown([32, 64, 128], value=32, label="Group size", elem_id="compress-group")
    with gr.Row():
        extra = gr.Textbox("", lines=2, label=f"More passes, one per line: KIND:key=value,… (kinds: "
                           f"{', '.join(pass_kinds())}; e.g. prune:method=heads,ratio=0.25)", elem_id="compress-extra")
        rules = gr.Textbox("", lines=2, label="Per-layer rules REGEX=4|5|8|skip, first match wins", elem_id="compress-rules")
    with gr.Row():
        data = gr.Textbox("stdlib", label="Calibration / evaluation corpus", elem_id="compress-data")
        seq = gr.Number(128, label="Sequence length", precision=0, minimum=8)
        tokens = gr.Number(32768, label="Validation tokens scored", precision=0, minimum=64)
    start, stop, job, status, bar, note = _job_widgets("compress")
    with gr.Row():
        table = gr.Dataframe(views.compress_table(None), label="Size, perplexity and KL", interactive=False,
                             elem_id="compress-table", scale=2)
        heat = gr.Plot(label="Per-layer SQNR", elem_id="compress-heatmap", scale=1)
    log, shown = _log(), gr.State("")
    start.click(noted(act.compress_start), [ckpt, method, bits, group, extra, rules, data, seq, tokens, out, job],
                [job, status, note], api_name="compress")
    stop.click(act.cancel, [job], [status], api_name="cancel_compress")

    def poll(job_id, key):
        return _skips(act.compress_poll(job_id, key))

    timer.tick(poll, [job, shown], [status, bar, table, heat, log, shown], api_name="compress_status", **HIDDEN)
    demo.load(lambda: act.latest_job("compress"), None, [job], **PRIVATE)
    return ckpt


def _export_tab(act: Actions, timer, demo):
    with gr.Row():
        ckpt = gr.Dropdown([], label="Checkpoint", allow_custom_value=True, elem_id="export-checkpoint")
        out = gr.Textbox("", label="Run directory (default runs/<checkpoint>-export); artifacts/<format> inside",
                         elem_id="export-out")
    with gr.Row():
        formats = gr.CheckboxGroup(FORMATS.names(), value=["gguf"], label="Formats", elem_id="export-formats")
        precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Precision (quantized checkpoints keep codes)")
        seq = gr.Number(0, label="KV cache length (0: the model's)", precision=0, minimum=0)
        target = gr.Dropdown(["", *devices_tab.profiles()], value="", label="Target device", elem_id="export-target")
    start, stop, job, status, bar, note = _job_widgets("export")
    parity = gr.Dataframe(views.parity_table({}), label="Parity against the torch reference", interactive=False,
                          elem_id="export-parity")
    files = gr.Dataframe(views.files_table({}, {}), label="Artifacts", interactive=False, elem_id="export-files")
    verdict = gr.Markdown(elem_id="export-verdict")
    log, shown = _log(), gr.State("")
    start.click(noted(act.export_start), [ckpt, formats, precision, seq, target, out, job], [job, status, note],
                api_name="export")
    stop.click(act.cancel, [job], [status], api_name="cancel_export")

    def poll(job_id, key):
        return _skips(act.export_poll(job_id, key))

    timer.tick(poll, [job, shown], [status, bar, parity, files, verdict, log, shown], api_name="export_status",
               **HIDDEN)
    demo.load(lambda: act.latest_job("export"), None, [job], **PRIVATE)
    return ckpt


def _devices_tab(act: Actions):
    names = devices_tab.profiles()
    with gr.Row():
        device = gr.Dropdown(names, value="pixel-8" if "pixel-8" in names else None, label="Device profile",
                             elem_id="devices-profile")
        model = gr.Dropdown(devices_tab.shapes(), value="nano", allow_custom_value=True,
                            label="Model: size, public shape, checkpoint or artifact", elem_id="devices-model")
        context = gr.Number(0, label="Context tokens (0: the model's)", precision=0, minimum=0, elem_id="devices-context")
        bits = gr.Dropdown(["auto", "4", "5", "8", "16", "32"], value="auto", label="Weight bits", elem_id="devices-bits")
    go = gr.Button("Plan", variant="primary", elem_id="devices-plan")
    verdict = gr.Markdown(elem_id="devices-verdict")
    with gr.Row():
        table = gr.Dataframe(pd.DataFrame(columns=devices_tab.PLAN_COLUMNS), label="Plan", interactive=False,
                             elem_id="devices-table")
        spec = gr.Dataframe(pd.DataFrame(columns=["field", "value"]), label="Profile", interactive=False,
                            elem_id="devices-spec")

    def do_plan(device, model, context, bits):
        v, t = devices_tab.plan(act.ws, device, model, context or None, None if bits == "auto" else bits)
        return v, t, devices_tab.profile_table(device) if device else None

    go.click(do_plan, [device, model, context, bits], [verdict, table, spec], api_name="plan")
    return model


def _code_pane(label: str, elem_id: str):
    # a read-only text box in a monospace font (CSS): the text exactly as generated, indentation and all
    # (gr.Code strips the value's leading and trailing whitespace; gr.Chatbot renders Markdown)
    return gr.Textbox(label=label, lines=12, max_lines=30, interactive=False, buttons=["copy"],
                      elem_classes=["es-code"], elem_id=elem_id)


def _playground_tab(act: Actions):
    play = Playground(act.ws)
    with gr.Row():
        a = gr.Dropdown([], label="Model A (artifact or checkpoint)", allow_custom_value=True, elem_id="play-a")
        b = gr.Dropdown(["none"], value="none", label="Model B (side by side)", allow_custom_value=True, elem_id="play-b")
    with gr.Row():  # text fields: a bad value is one line in the status (gui/playground.py), never a toast
        max_new = gr.Textbox("96", label="Max new tokens", max_lines=1, elem_id="play-max-new")
        temperature = gr.Textbox("0.8", label="Temperature (0: greedy)", max_lines=1, elem_id="play-temperature")
        top_k = gr.Textbox("", label="Top-k (blank: off)", max_lines=1, elem_id="play-top-k")
        top_p = gr.Textbox("", label="Top-p (blank: off)", max_lines=1, elem_id="play-top-p")
        penalty = gr.Textbox("1.0", label="Repetition penalty (1: off)", max_lines=1, elem_id="play-penalty")
        seed = gr.Textbox("0", label="Seed (-1: random)", max_lines=1, elem_id="play-seed")
    runtime = run_options.controls("play")  # "default": the configuration each artifact's export verified
    prompt = gr.Textbox(label="Prompt (the text the model continues)", lines=4, placeholder="def fibonacci(n):",
                        elem_id="play-prompt")
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="play-send")
        stop = gr.Button("Stop", variant="stop", elem_id="play-stop")
        clear = gr.Button("Clear", elem_id="play-clear")
    status = gr.Markdown(elem_id="play-status")
    verdict_summary = gr.Markdown(elem_id="play-verdict-line")
    with gr.Accordion("Verify: the verdict per file (edgesmith verify, checked before a model is loaded)", open=False):
        verdict = gr.Dataframe(pd.DataFrame(columns=VERDICT_COLUMNS), interactive=False, wrap=True,
                               column_widths=["20%", "16%", "8%", "56%"], elem_id="play-verdict")
    with gr.Row():
        with gr.Column():
            out_a = _code_pane("A: prompt + completion", "play-out-a")
            stats_a = gr.Markdown(elem_id="play-stats-a")
        with gr.Column():
            out_b = _code_pane("B: prompt + completion", "play-out-b")
            stats_b = gr.Markdown(elem_id="play-stats-b")
    def generate(prompt, model_a, model_b, max_new_tokens, temperature, top_k, top_p, penalty, seed, threads,
                 accuracy_level, kv_cache, flash_attn, request: gr.Request):
        yield from play.generate(prompt, model_a, model_b, max_new_tokens, temperature, top_k, top_p, penalty, seed,
                                 stop_key=request.session_hash if request else None,
                                 runtime=(threads, accuracy_level, kv_cache, flash_attn))

    def stop_streams(request: gr.Request):
        play.stop(request.session_hash if request else None)  # the stream itself then says "Stopped."

    send.click(generate, [prompt, a, b, max_new, temperature, top_k, top_p, penalty, seed, *runtime],
               [out_a, out_b, stats_a, stats_b, status], api_name="generate", concurrency_limit=PLAY_CONCURRENCY,
               show_progress="minimal")
    # the streams end themselves (between two tokens) rather than being cancelled: their text stays, no error
    stop.click(stop_streams, None, None, api_name="stop_generate", concurrency_limit=None, show_progress="hidden")
    clear.click(lambda: ("", "", "", "", ""), None, [out_a, out_b, stats_a, stats_b, status], **PRIVATE)
    def show_verdict(x, y):
        table = verdict_table(act.ws, x, y)
        return table, verdict_line(table)

    for model in (a, b):
        model.change(show_verdict, [a, b], [verdict, verdict_summary], **PRIVATE, **HIDDEN)
    return a, b


def _runs_tab(act: Actions, timer, demo):
    with gr.Row():
        run = gr.Dropdown([], label="Run (runs/…, newest first)", allow_custom_value=True, elem_id="runs-run")
        show = gr.Button("Show", variant="primary", scale=0, min_width=100, elem_id="runs-show")
    report = gr.HTML(elem_id="runs-report")
    with gr.Row():
        with gr.Column(scale=3):
            lineage = gr.Markdown(elem_id="runs-lineage")
        report_file = gr.File(label="report.html", elem_id="runs-report-file", scale=1)
    with gr.Accordion("Files", open=True):
        summary = gr.Markdown(elem_id="runs-summary")
    details = [summary, lineage, report, report_file]
    show.click(lambda r: runs.run_details(act.ws, r), [run], details, api_name="run")
    run.change(lambda r: runs.run_details(act.ws, r) if r else (gr.skip(),) * 4, [run], details, **PRIVATE)
    with gr.Accordion("Run a recipe", open=False):
        recipe = _recipe_widgets(act, timer, demo)
    with gr.Accordion("Jobs", open=True):
        jobs = gr.Dataframe(pd.DataFrame(columns=JOB_COLUMNS), label="Background jobs (newest first)",
                            interactive=False, elem_id="runs-jobs")
        with gr.Row():
            job_id = gr.Textbox(label="Job id", elem_id="runs-job-id")
            cancel = gr.Button("Cancel job", variant="stop", elem_id="runs-cancel")
        job_status = gr.Markdown(elem_id="runs-job-status")
    cancel.click(act.cancel, [job_id], [job_status], api_name="cancel")
    refresh = gr.Button("Refresh the lists", size="sm", elem_id="runs-refresh")
    refresh.click(lambda: (gr.Dropdown(choices=act.ws.runs()), act.jobs_table()), None, [run, jobs], api_name="runs")
    return run, recipe, jobs


def _recipe_widgets(act: Actions, timer, demo):
    names = runs.recipe_names(act.ws)
    with gr.Row():
        recipe = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True,
                             label="Recipe (bundled name, or a .toml in the workspace: the tabs write recipes/)",
                             elem_id="recipe-name")
        out = gr.Textbox("", label="Run directory (default runs/<recipe>)", elem_id="recipe-out")
    overrides = gr.Textbox("", lines=2, label="Overrides KEY=VALUE, one per line (e.g. source.train.steps=50)",
                           elem_id="recipe-overrides")
    start, stop, job, status, bar, note = _job_widgets("recipe")
    log = _log()
    start.click(noted(lambda *a: runs.start_recipe(act, *a)), [recipe, out, overrides, job], [job, status, note],
                api_name="run_recipe")
    stop.click(act.cancel, [job], [status], api_name="cancel_recipe")
    timer.tick(lambda job_id: _skips(act.job_state(job_id)), [job], [status, bar, log], api_name="recipe_status",
               **HIDDEN)
    demo.load(lambda: act.latest_job("run"), None, [job], **PRIVATE)
    return recipe
