"""The Tune tab: `edgesmith tune CKPT --target DEVICE --out tune/<checkpoint>-<device>` as a background job, with its
progress; each candidate's measured size, KLD and speed appear in the table as soon as it is measured, and
the Pareto plot (size x mean KLD, coloured by decode tok/s) and the chosen candidate when the search ends.

It runs the tune command, not a recipe: tune writes the recipe (`recipe.toml` of the chosen candidate),
which the Runs tab can then run. Limits no candidate meets end the job with that one line, and the table
still shows every candidate measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from gui import views
from gui.actions import Actions
from gui.devices_tab import profiles
from gui import recipes
from gui.recipes import run_stem
from models.errors import EdgesmithError
from toolchain.tune.driver import METHODS
from toolchain.tune.report import COLUMNS, candidate_rows

FORMATS = ["gguf", "onnx", "executorch"]


def _positive(value, what: str) -> str | None:
    """A form number as a flag value, or None when blank; refused in one line when not a positive number."""
    if value in (None, ""):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise EdgesmithError(f"{what}: {value!r} is not a number") from None
    if not x > 0:
        raise EdgesmithError(f"{what}: {value!r} must be > 0")
    return f"{x:g}"


def tune_start(act: Actions, checkpoint: str, device: str, max_size_mb, min_decode, max_kld, formats: list[str],
               method: str, candidates, budget, data: str = "stdlib", drop_layers=0, heal_steps=0, job_id: str = ""):
    """Start the tune job; returns (job id, status)."""
    try:
        ckpt = act.ws.resolve(checkpoint, "checkpoint", must_exist=True)
        device = (device or "local").strip()
        if not formats:
            raise EdgesmithError("formats: choose at least one")
        # under tune/, not runs/: a tune is not a recipe run (the Runs tab lists those)
        out = act.ws.resolve(f"tune/{run_stem(ckpt)}-{device.replace('/', '_').replace(':', '_')}", "output")
        argv = ["tune", str(ckpt), "--target", device, "--out", str(out), "--formats", ",".join(formats),
                "--method", method, "--candidates", str(int(float(_positive(candidates, "candidates") or 4))),
                "--data", recipes.corpus(act.ws, data or "stdlib")]
        if drop_layers not in (None, "", 0):
            argv += ["--drop-layers", str(int(float(_positive(drop_layers, "drop blocks"))))]
        if heal_steps not in (None, "", 0):
            argv += ["--heal-steps", str(int(float(_positive(heal_steps, "heal steps"))))]
        for flag, value, what in (("--max-size-mb", max_size_mb, "max size"), ("--min-decode-tok-s", min_decode,
                                  "min decode tok/s"), ("--max-kld", max_kld, "max KLD"),
                                  ("--budget-minutes", budget, "budget minutes")):
            if (v := _positive(value, what)) is not None:
                argv += [flag, v]
    except EdgesmithError as e:
        return "", views.refused(e)
    rel = act.ws.rel(out)
    job = act.jobs.start("tune", [argv], title=f"tune {act.ws.rel(ckpt)} for {device}", outputs={"out": rel},
                         result_file=f"{rel}/pareto.json")
    return job.id, views.job_markdown(job)


def candidates_table(out: Path | None) -> tuple[pd.DataFrame, str | None]:
    """(table, plot path): from pareto.json when the search ended, else each candidate measured so far."""
    if out is None:
        return pd.DataFrame(columns=COLUMNS), None
    try:
        doc = json.loads((out / "pareto.json").read_text())
    except (OSError, ValueError):
        done = sorted(out.glob("candidates/*/result.json"), key=lambda p: p.stat().st_mtime)
        cands = []
        for p in done:
            try:
                cands.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return pd.DataFrame(candidate_rows({"candidates": cands}), columns=COLUMNS), None
    png = out / "pareto.png"
    return pd.DataFrame(candidate_rows(doc), columns=COLUMNS), str(png) if png.is_file() else None


def tune_poll(act: Actions, job_id: str, shown: str = ""):
    """(status, progress, table, plot, log, shown-key); the table is rebuilt when a candidate was added."""
    if not job_id:
        return (gr.skip(),) * 6
    status, bar, log = act.job_state(job_id)
    job = act._job(job_id)  # noqa: SLF001
    out = act.ws.root / job.outputs["out"] if job is not None else None
    n = len(list(out.glob("candidates/*/result.json"))) if out is not None and out.is_dir() else 0
    key = f"{job_id}:{job.status if job else ''}:{n}"
    if key == shown:
        return status, bar, gr.skip(), gr.skip(), log, key
    table, png = candidates_table(out)
    return status, bar, table, png, log, key


def build(act: Actions, timer, demo):
    """The tab's widgets and events; returns the checkpoint dropdown (gui/app.py refreshes its choices)."""
    names = ["local"] + [p for p in profiles() if p != "local"]
    with gr.Row():
        ckpt = gr.Dropdown([], label="Float checkpoint", allow_custom_value=True, elem_id="tune-checkpoint")
        device = gr.Dropdown(names, value="local", allow_custom_value=True, elem_id="tune-device",
                             label="Target: local, a profile (measured there, or its planner bound if unreachable)")
    with gr.Row():
        max_size = gr.Textbox("", label="Max size MB (blank: none)", max_lines=1, elem_id="tune-max-size")
        min_decode = gr.Textbox("", label="Min decode tok/s (blank: none)", max_lines=1, elem_id="tune-min-decode")
        max_kld = gr.Textbox("", label="Max mean KLD (blank: none)", max_lines=1, elem_id="tune-max-kld")
        budget = gr.Textbox("", label="Budget minutes (blank: none)", max_lines=1, elem_id="tune-budget")
    with gr.Row():
        formats = gr.CheckboxGroup(FORMATS, value=["gguf"], label="Formats (the first is measured)",
                                   elem_id="tune-formats")
        method = gr.Dropdown(list(METHODS), value="gptq", label="Method", elem_id="tune-method")
        candidates = gr.Number(4, label="Candidates", precision=0, minimum=1, elem_id="tune-candidates")
        data = gr.Textbox("stdlib", label="Corpus (calibration: train split; KLD: validation)", max_lines=1,
                          elem_id="tune-data")
        drop = gr.Number(0, label="Drop up to N blocks (structured pruning; 0: none)", precision=0, minimum=0,
                         elem_id="tune-drop")
        heal = gr.Number(0, label="Heal a drop: distill steps (0: none)", precision=0, minimum=0, elem_id="tune-heal")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="tune-start")
        stop = gr.Button("Stop", variant="stop", elem_id="tune-stop")
    note = gr.Markdown(elem_id="tune-note")
    job = gr.Textbox(label="Job", interactive=False, elem_id="tune-job")
    status = gr.Markdown(elem_id="tune-status")
    bar = gr.HTML(elem_id="tune-progress")
    table = gr.Dataframe(pd.DataFrame(columns=COLUMNS), label="Candidates (measured: size of the artifact file, "
                         "KLD through its runtime on validation tokens, decode on the target)", interactive=False,
                         wrap=True, elem_id="tune-table")
    plot = gr.Image(label="Pareto: size against mean KLD, coloured by decode tok/s", type="filepath",
                    interactive=False, elem_id="tune-plot")
    log = gr.Textbox(label="Log", lines=6, max_lines=10, interactive=False, autoscroll=True)
    shown = gr.State("")

    def start_fn(*values):
        job_id, text = tune_start(act, *values)
        return job_id, text, "" if job_id else text

    start.click(start_fn, [ckpt, device, max_size, min_decode, max_kld, formats, method, candidates, budget, data,
                           drop, heal, job],
                [job, status, note], api_name="tune")
    stop.click(act.cancel, [job], [status], api_name="cancel_tune")
    timer.tick(lambda job_id, key: tune_poll(act, job_id, key), [job, shown], [status, bar, table, plot, log, shown],
               api_name="tune_status", show_progress="hidden")
    demo.load(lambda: act.latest_job("tune"), None, [job], api_visibility="private")
    return ckpt
