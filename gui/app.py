"""The Gradio Blocks layout: seven tabs wired to `Actions`, `Playground` and the devices/runs helpers.

Layout only: every event handler is a method or function of gui/actions.py, gui/playground.py,
gui/devices_tab.py or gui/runs.py, each with an `api_name` so `gradio_client` reaches the same
actions the browser does. One `gr.Timer` polls the jobs' state on disk, and each tab picks up the
newest job of its kind on page load, so a reload (or a restarted GUI) shows running jobs again.
Import it through gui/server.py, which sets the environment (analytics off, caches in the
workspace) before Gradio is imported.
"""

from __future__ import annotations

import os

import gradio as gr

from gui import devices_tab, runs
from gui.actions import SKIP, Actions
from gui.playground import Playground
from models.llama import SIZES
from toolchain.export.spec import MODULES, PRECISIONS

POLL_S = 1.0
CACHE_S = 24 * 3600  # Gradio's copies of uploads and of files it shows are deleted after a day (checked hourly)
PLAY_CONCURRENCY = 2  # Playground streams at once (gui/playground.py COPIES: each has its own session)
HIDDEN = dict(show_progress="hidden")


def _skips(values):
    return tuple(gr.skip() if v is SKIP else v for v in values)


def _models(act: Actions, extra=()) -> list[str]:
    checkpoints, artifacts = act.choices()
    return list(extra) + checkpoints + artifacts


def build_app(workspace) -> gr.Blocks:
    act = Actions(workspace)
    with gr.Blocks(title="edgesmith", analytics_enabled=False, delete_cache=(3600, CACHE_S)) as demo:
        gr.Markdown(f"## edgesmith\nWorkspace `{act.ws.root}`: paths are relative to it, and paths outside it "
                    "are refused.")
        timer = gr.Timer(POLL_S)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                _train_tab(act, timer, demo)
            with gr.Tab("Compress", id="compress"):
                _compress_tab(act, timer, demo)
            with gr.Tab("Export", id="export"):
                _export_tab(act, timer, demo)
            with gr.Tab("Benchmark", id="benchmark"):
                _bench_tab(act, timer, demo)
            with gr.Tab("Devices", id="devices"):
                _devices_tab(act, demo)
            with gr.Tab("Playground", id="playground"):
                _playground_tab(act, demo)
            with gr.Tab("Runs", id="runs"):
                _runs_tab(act, timer, demo)
    return demo


def _job_widgets(prefix: str):
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=f"{prefix}-start")
        stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
    job = gr.Textbox(label="Job", interactive=False, elem_id=f"{prefix}-job")
    status = gr.Markdown(elem_id=f"{prefix}-status")
    bar = gr.HTML(elem_id=f"{prefix}-progress")
    return start, stop, job, status, bar


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
        out = gr.Textbox("runs/train", label="Output directory", elem_id="train-out")
    start, stop, job, status, bar = _job_widgets("train")
    plot = gr.LinePlot(x="step", y="loss", title="train loss (live)", height=260, elem_id="train-loss")
    log = _log()
    start.click(act.train_start, [model, data, steps, nproc, batch, seq, out, job], [job, status], api_name="train")
    stop.click(act.cancel, [job], [status], api_name="cancel_train")
    upload.upload(act.upload_corpus, [upload], [data, status], api_name="upload_corpus")
    timer.tick(lambda job_id: _skips(act.train_poll(job_id)), [job], [status, bar, plot, log], api_name="train_status",
               **HIDDEN)
    demo.load(lambda: act.latest_job("train"), None, [job], api_visibility="private")


def _compress_tab(act: Actions, timer, demo):
    with gr.Row():
        ckpt = gr.Dropdown([], label="Checkpoint", allow_custom_value=True, elem_id="compress-checkpoint")
        refresh = gr.Button("↻", scale=0, min_width=40)
        out = gr.Textbox("", label="Output directory (default runs/<name>-compressed)", elem_id="compress-out")
    with gr.Row():
        method = gr.Dropdown(["rtn", "gptq", "awq", "smoothquant", "none"], value="rtn", label="Quantization",
                             elem_id="compress-method")
        bits = gr.Dropdown([4, 8], value=4, label="Bits", elem_id="compress-bits")
        group = gr.Dropdown([32, 64, 128], value=32, label="Group size", elem_id="compress-group")
        force = gr.Checkbox(False, label="Replace the output if it exists")
    with gr.Row():
        extra = gr.Textbox("", lines=2, label="More passes, one per line (e.g. prune:method=heads,ratio=0.25)",
                           elem_id="compress-extra")
        rules = gr.Textbox("", lines=2, label="Per-layer rules REGEX=4|8|skip, first match wins", elem_id="compress-rules")
    with gr.Row():
        data = gr.Textbox("stdlib", label="Calibration / evaluation corpus", elem_id="compress-data")
        seq = gr.Number(128, label="Sequence length", precision=0, minimum=8)
        tokens = gr.Number(32768, label="Validation tokens scored", precision=0, minimum=64)
    start, stop, job, status, bar = _job_widgets("compress")
    with gr.Row():
        table = gr.Dataframe(label="Size, perplexity and KL", interactive=False, elem_id="compress-table", scale=2)
        heat = gr.Plot(label="Per-layer SQNR", elem_id="compress-heatmap", scale=1)
    log, shown = _log(), gr.State("")
    refresh.click(lambda: gr.Dropdown(choices=act.ws.checkpoints()), None, [ckpt], api_visibility="private")
    start.click(act.compress_start, [ckpt, method, bits, group, extra, rules, data, seq, tokens, out, force, job],
                [job, status], api_name="compress")
    stop.click(act.cancel, [job], [status], api_name="cancel_compress")

    def poll(job_id, key):
        return _skips(act.compress_poll(job_id, key))

    timer.tick(poll, [job, shown], [status, bar, table, heat, log, shown], api_name="compress_status", **HIDDEN)
    demo.load(lambda: (act.latest_job("compress"), gr.Dropdown(choices=act.ws.checkpoints())), None, [job, ckpt],
              api_visibility="private")


def _export_tab(act: Actions, timer, demo):
    with gr.Row():
        ckpt = gr.Dropdown([], label="Checkpoint", allow_custom_value=True, elem_id="export-checkpoint")
        refresh = gr.Button("↻", scale=0, min_width=40)
        out = gr.Textbox("", label="Output directory (default artifacts/<name>), one folder per format",
                         elem_id="export-out")
    with gr.Row():
        formats = gr.CheckboxGroup(list(MODULES), value=["gguf"], label="Formats", elem_id="export-formats")
        precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Precision (quantized checkpoints keep codes)")
        seq = gr.Number(0, label="KV cache length (0: the model's)", precision=0, minimum=0)
        target = gr.Dropdown([""] + _profiles(), value="", label="Target device", elem_id="export-target")
        force = gr.Checkbox(False, label="Replace existing artifacts")
    start, stop, job, status, bar = _job_widgets("export")
    parity = gr.Dataframe(label="Parity against the torch reference", interactive=False, elem_id="export-parity")
    files = gr.Dataframe(label="Artifacts", interactive=False, elem_id="export-files")
    verdict = gr.Markdown(elem_id="export-verdict")
    log, shown = _log(), gr.State("")
    refresh.click(lambda: gr.Dropdown(choices=act.ws.checkpoints()), None, [ckpt], api_visibility="private")
    start.click(act.export_start, [ckpt, formats, precision, seq, target, out, force, job], [job, status],
                api_name="export")
    stop.click(act.cancel, [job], [status], api_name="cancel_export")

    def poll(job_id, key):
        return _skips(act.export_poll(job_id, key))

    timer.tick(poll, [job, shown], [status, bar, parity, files, verdict, log, shown], api_name="export_status",
               **HIDDEN)
    demo.load(lambda: (act.latest_job("export"), gr.Dropdown(choices=act.ws.checkpoints())), None, [job, ckpt],
              api_visibility="private")


def _profiles() -> list[str]:
    try:
        return devices_tab.profiles()
    except ImportError:
        return []


def _bench_tab(act: Actions, timer, demo):
    from gui import bench_tab

    bench_tab.build(act, timer, demo)


def _devices_tab(act: Actions, demo):
    with gr.Row():
        device = gr.Dropdown(_profiles(), value="pixel-8" if "pixel-8" in _profiles() else None, label="Device profile",
                             elem_id="devices-profile")
        model = gr.Dropdown(list(SIZES), value="nano", label="Model: size, checkpoint or artifact",
                            allow_custom_value=True, elem_id="devices-model")
        context = gr.Number(0, label="Context tokens (0: the model's)", precision=0, minimum=0, elem_id="devices-context")
        bits = gr.Dropdown(["auto", "4", "8", "16", "32"], value="auto", label="Weight bits", elem_id="devices-bits")
    go = gr.Button("Plan", variant="primary", elem_id="devices-plan")
    verdict = gr.Markdown(elem_id="devices-verdict")
    with gr.Row():
        table = gr.Dataframe(label="Plan", interactive=False, elem_id="devices-table")
        spec = gr.Dataframe(label="Profile", interactive=False, elem_id="devices-spec")

    def do_plan(device, model, context, bits):
        v, t = devices_tab.plan(act.ws, device, model, context or None, None if bits == "auto" else bits)
        return v, t, devices_tab.profile_table(device) if device else None

    go.click(do_plan, [device, model, context, bits], [verdict, table, spec], api_name="plan")
    demo.load(lambda: gr.Dropdown(choices=_models(act, SIZES)), None, [model], api_visibility="private")


def _playground_tab(act: Actions, demo):
    play = Playground(act.ws)
    with gr.Row():
        a = gr.Dropdown([], label="Model A (artifact or checkpoint)", allow_custom_value=True, elem_id="play-a")
        b = gr.Dropdown(["none"], value="none", label="Model B (side by side)", allow_custom_value=True, elem_id="play-b")
        refresh = gr.Button("↻", scale=0, min_width=40)
    with gr.Row():
        max_new = gr.Number(96, label="Max new tokens", precision=0, minimum=1, elem_id="play-max-new")
        temperature = gr.Number(0.8, label="Temperature (0: greedy)", minimum=0, elem_id="play-temperature")
        seed = gr.Number(0, label="Seed (-1: random)", precision=0, elem_id="play-seed")
    with gr.Row():
        with gr.Column():
            chat_a = gr.Chatbot(label="A", height=300, elem_id="play-chat-a")
            stats_a = gr.Markdown(elem_id="play-stats-a")
        with gr.Column():
            chat_b = gr.Chatbot(label="B", height=300, elem_id="play-chat-b")
            stats_b = gr.Markdown(elem_id="play-stats-b")
    with gr.Row():
        msg = gr.Textbox(label="Prompt", placeholder="def fibonacci(n):", scale=4, elem_id="play-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="play-send")
        clear = gr.Button("Clear", scale=0, elem_id="play-clear")
    send.click(play.generate, [msg, a, b, max_new, temperature, seed, chat_a, chat_b], [chat_a, chat_b, stats_a, stats_b],
               api_name="generate", concurrency_limit=PLAY_CONCURRENCY, show_progress="minimal")
    clear.click(lambda: ([], [], "", ""), None, [chat_a, chat_b, stats_a, stats_b], api_visibility="private")

    def choices():
        models = _models(act)
        return gr.Dropdown(choices=models, value=models[-1] if models else None), gr.Dropdown(choices=["none", *models])

    refresh.click(choices, None, [a, b], api_visibility="private")
    demo.load(choices, None, [a, b], api_visibility="private")


def _runs_tab(act: Actions, timer, demo):
    with gr.Row():
        run = gr.Dropdown([], label="Run (runs/…)", allow_custom_value=True, elem_id="runs-run")
        refresh = gr.Button("↻", scale=0, min_width=40)
        show = gr.Button("Show", variant="primary", elem_id="runs-show")
    summary = gr.Markdown(elem_id="runs-summary")
    with gr.Row():
        lineage = gr.Markdown(elem_id="runs-lineage")
        with gr.Column():
            report = gr.Markdown(elem_id="runs-report")
            report_file = gr.File(label="report.html", elem_id="runs-report-file")
    show.click(lambda r: runs.run_details(act.ws, r), [run], [summary, lineage, report, report_file], api_name="run")
    with gr.Accordion("Run a recipe", open=False):
        _recipe_widgets(act, timer, demo)
    with gr.Accordion("Jobs", open=True):
        jobs = gr.Dataframe(label="Background jobs (newest first)", interactive=False, elem_id="runs-jobs")
        with gr.Row():
            job_id = gr.Textbox(label="Job id", elem_id="runs-job-id")
            cancel = gr.Button("Cancel job", variant="stop", elem_id="runs-cancel")
        job_status = gr.Markdown(elem_id="runs-job-status")
    cancel.click(act.cancel, [job_id], [job_status], api_name="cancel")
    refresh.click(lambda: (gr.Dropdown(choices=act.ws.runs()), act.jobs_table()), None, [run, jobs], api_name="runs")
    demo.load(lambda: (gr.Dropdown(choices=act.ws.runs()), act.jobs_table()), None, [run, jobs],
              api_visibility="private")


def _recipe_widgets(act: Actions, timer, demo):
    try:
        names = [n for n, _ in runs.recipes()]
    except ImportError:
        gr.Markdown("Recipes (toolchain/recipe.py) are not in this build yet.")
        return
    with gr.Row():
        recipe = gr.Dropdown(names, value=names[0] if names else None, allow_custom_value=True,
                             label="Recipe (bundled name or a .toml in the workspace)", elem_id="recipe-name")
        out = gr.Textbox("", label="Run directory (default runs/<recipe>)", elem_id="recipe-out")
    overrides = gr.Textbox("", lines=2, label="Overrides KEY=VALUE, one per line (e.g. source.train.steps=50)",
                           elem_id="recipe-overrides")
    start, stop, job, status, bar = _job_widgets("recipe")
    log = _log()

    def start_recipe(recipe, out, overrides, job_id):
        from gui import views
        from models.errors import EdgesmithError

        try:
            argv, rel = runs.recipe_command(act.ws, recipe, out, overrides)
        except EdgesmithError as e:
            return "", views.refused(e)  # no job: the poll leaves this line shown
        j = act.jobs.start("run", [argv], title=f"recipe {recipe} → {rel}", outputs={"out": rel})
        return j.id, views.job_markdown(j)

    start.click(start_recipe, [recipe, out, overrides, job], [job, status], api_name="run_recipe")
    stop.click(act.cancel, [job], [status], api_name="cancel_recipe")
    timer.tick(lambda job_id: _skips(act.job_state(job_id)), [job], [status, bar, log], api_name="recipe_status",
               **HIDDEN)
    demo.load(lambda: act.latest_job("run"), None, [job], api_visibility="private")
