"""The Benchmark tab: `edgesmith bench ARTIFACT... --device D --json bench/<id>.json` as a background
job; when it finishes, the results file (devices.bench.write_results) is shown as a table with the
roofline fraction and the runtime options each row ran with, next to the plot the command wrote beside it
(devices.bench.plot_results). The runtime option controls (gui/run_options.py; "default": each artifact's
manifest) become the command's flags, checked against the artifacts before the job starts.

It runs the bench command, not a recipe: a recipe's source is a checkpoint, and this tab measures
artifacts that already exist (any number of them, from any run). A recipe run benches its own
artifacts in its bench stage.
"""

from __future__ import annotations

import json
import time

import gradio as gr

from devices.bench import check_options
from gui import views
from gui.actions import Actions
from gui.devices_tab import bench_table, profiles
from gui.recipes import number as _int
from gui.run_options import bench_flags, controls, form_options
from models.errors import EdgesmithError


def bench_start(act: Actions, artifacts: list[str], device: str, prompt_len, gen_len, repeat, job_id: str = "",
                threads="", accuracy_level="default", kv_cache="default", flash_attn="default"):
    """Start the benchmark job; returns (job id, status)."""
    try:
        if not artifacts:
            raise EdgesmithError("artifacts: choose at least one")
        paths = [str(act.ws.resolve(a, "artifact", must_exist=True)) for a in artifacts]
        device = (device or "local").strip()
        options = form_options(threads, accuracy_level, kv_cache, flash_attn)
        if options:
            check_options(paths, device, options)  # an option no artifact has: refused here, not by the job
        out = act.ws.resolve(f"bench/{time.strftime('%Y%m%d-%H%M%S')}-{device.replace('/', '_').replace(':', '_')}"
                             ".json", "results file")
        argv = ["bench", *paths, "--device", device, "--prompt-len", str(_int(prompt_len, "prompt length")),
                "--gen-len", str(_int(gen_len, "generated tokens")), "--repeat", str(_int(repeat, "repeats")),
                "--json", str(out), *bench_flags(options)]
    except EdgesmithError as e:
        return "", views.refused(e)  # no job: the poll leaves this line shown
    rel = act.ws.rel(out)
    job = act.jobs.start("bench", [argv], title=f"bench {len(paths)} artifact(s) on {device}",
                         outputs={"json": rel, "png": rel[:-len(".json")] + ".png"}, result_file=rel)
    return job.id, views.job_markdown(job)


def bench_poll(act: Actions, job_id: str, shown: str = ""):
    """(status, progress, results table, plot path, log, shown-key); nothing changes without a job."""
    if not job_id:
        return (gr.skip(),) * 6
    status, bar, log = act.job_state(job_id)
    job = act._job(job_id)  # noqa: SLF001
    key = f"{job_id}:{job.status if job else ''}"
    if key == shown:
        return status, bar, gr.skip(), gr.skip(), log, key
    results = None
    if job is not None and job.status == "done":
        try:
            results = json.loads((act.ws.root / job.outputs["json"]).read_text())
        except (OSError, ValueError):
            results = None
    if isinstance(results, dict):
        results = results.get("results", [])
    png = act.ws.root / job.outputs["png"] if job is not None and results else None
    return status, bar, bench_table(results), str(png) if png and png.is_file() else None, log, key


def build(act: Actions, timer, demo):
    """The tab's widgets and events; returns the artifacts dropdown (gui/app.py refreshes its choices)."""
    names = ["local"] + [p for p in profiles() if p != "local"]
    with gr.Row():
        # a dropdown that takes typed paths too: the choices a page was given are kept per session, and a
        # script (gradio_client) or a page whose session state was dropped (gui/bounds.py) has none
        artifacts = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True,
                                label="Artifacts (one or more)", elem_id="bench-artifacts")
    with gr.Row():
        device = gr.Dropdown(names, value="local", allow_custom_value=True,
                             label="Device: local, a profile, ssh://user@host or adb://SERIAL", elem_id="bench-device")
        prompt_len = gr.Number(128, label="Prompt tokens", precision=0, minimum=1, elem_id="bench-prompt-len")
        gen_len = gr.Number(128, label="Generated tokens", precision=0, minimum=1, elem_id="bench-gen-len")
        repeat = gr.Number(5, label="Repeats", precision=0, minimum=1, elem_id="bench-repeat")
    runtime = controls("bench")  # "default": the configuration each artifact's export verified
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="bench-start")
        stop = gr.Button("Stop", variant="stop", elem_id="bench-stop")
    note = gr.Markdown(elem_id="bench-note")  # a refused start: no poll writes here, so none overwrites it
    job = gr.Textbox(label="Job", interactive=False, elem_id="bench-job")
    status = gr.Markdown(elem_id="bench-status")
    bar = gr.HTML(elem_id="bench-progress")
    table = gr.Dataframe(bench_table(None), label="Results (medians; options = what each row ran with; roofline "
                         "fraction = decode / bandwidth bound)", interactive=False, elem_id="bench-table")
    plot = gr.Image(label="Plots", type="filepath", interactive=False, elem_id="bench-plot")
    log = gr.Textbox(label="Log", lines=6, max_lines=10, interactive=False, autoscroll=True)
    shown = gr.State("")

    def start_fn(artifacts, device, prompt_len, gen_len, repeat, job_id, *runtime_values):
        job_id, status = bench_start(act, artifacts, device, prompt_len, gen_len, repeat, job_id, *runtime_values)
        return job_id, status, "" if job_id else status

    def poll(job_id, key):
        return bench_poll(act, job_id, key)

    # the option controls come after the job box: scripts that pass the first six keep working
    start.click(start_fn, [artifacts, device, prompt_len, gen_len, repeat, job, *runtime], [job, status, note],
                api_name="bench")
    stop.click(act.cancel, [job], [status], api_name="cancel_bench")
    timer.tick(poll, [job, shown], [status, bar, table, plot, log, shown], api_name="bench_status",
               show_progress="hidden")
    demo.load(lambda: act.latest_job("bench"), None, [job], api_visibility="private")
    return artifacts
