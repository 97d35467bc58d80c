"""What the GUI's buttons do: build an `edgesmith` command line from the form, start it as a
background job (toolchain.jobs), and read its state and results back from disk on every poll.

`Actions` holds the workspace and the job manager; its methods are the Gradio event handlers and
take and return plain values (strings, numbers, pandas frames, figures), so tests call them without
a browser. Every path typed in the browser goes through `Workspace.resolve` (refused outside the
workspace); every command is an argument list. Nothing here trains, compresses or exports itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gui import views
from gui.workspace import Workspace
from models.errors import EdgesmithError
from models.llama import SIZES
from toolchain.jobs import Job, JobManager

SKIP = object()  # "leave this output as it is" (gr.skip() in the app)


def _int(value, what: str, low: int = 1) -> int:
    try:
        n = int(float(value))
    except (TypeError, ValueError):
        raise EdgesmithError(f"{what}: {value!r} is not a number") from None
    if n < low or n != float(value):
        raise EdgesmithError(f"{what}: {value!r} must be an integer >= {low}")
    return n


class Actions:
    def __init__(self, workspace: str | Path):
        self.ws = Workspace(workspace)
        self.jobs = JobManager(self.ws.root / "jobs", cwd=self.ws.root)

    # ------------------------------------------------------------------------- shared

    def _job(self, job_id: str | None) -> Job | None:
        if not job_id:
            return None
        try:
            return self.jobs.get(job_id)
        except EdgesmithError:
            return None

    def latest_job(self, kind: str) -> str:
        job = self.jobs.latest(kind)
        return job.id if job else ""

    def job_state(self, job_id: str) -> tuple[str, str, str]:
        """(status markdown, progress bar HTML, log tail) of a job; with no job, SKIP: what the page shows
        stays (a refusal, which clears the job box, is not overwritten by the next poll)."""
        if not job_id:
            return SKIP, SKIP, SKIP
        job = self._job(job_id)
        log = self.jobs.log(job.id, 25) if job else ""
        return views.job_markdown(job, log), views.progress_html(job), log

    def cancel(self, job_id: str) -> str:
        try:
            job = self.jobs.cancel(job_id)
        except EdgesmithError as e:
            return views.refused(e)
        return views.job_markdown(job)

    def jobs_table(self):
        import pandas as pd

        rows = []
        for j in self.jobs.list(limit=50):
            p = j.progress
            rows.append([j.id, j.kind, j.status, f"{p['n']}/{p['total']}" if p else "", j.title])
        return pd.DataFrame(rows, columns=["id", "kind", "status", "progress", "what"])

    def choices(self) -> tuple[list[str], list[str]]:
        """(checkpoints, artifacts) in the workspace."""
        return self.ws.checkpoints(), self.ws.artifacts()

    # ------------------------------------------------------------------------- train

    def train_start(self, model: str, data: str, steps, nproc, batch_size, seq_len, out: str,
                    job_id: str = "") -> tuple[str, str]:
        """Start `edgesmith train`; returns (job id, status)."""
        try:
            model = (model or "").strip()
            model_arg = model if model in SIZES else str(self.ws.resolve(model, "model config", must_exist=True))
            data_arg = self._data(data)
            out_p = self.ws.resolve(out or "runs/train", "output directory")
            argv = ["train", "--model", model_arg, "--data", data_arg, "--steps", str(_int(steps, "steps")),
                    "--nproc", str(_int(nproc, "processes")), "--batch-size", str(_int(batch_size, "batch size")),
                    "--seq-len", str(_int(seq_len, "sequence length")), "--out", str(out_p)]
        except EdgesmithError as e:
            return "", views.refused(e)  # no job: the poll leaves this line shown
        rel = self.ws.rel(out_p)
        job = self.jobs.start("train", [argv], title=f"train {model} → {rel}", outputs={"out": rel},
                              result_file=f"{rel}/summary.json")
        return job.id, views.job_markdown(job)

    def _data(self, data: str) -> str:
        data = (data or "").strip()
        return "stdlib" if data in ("", "stdlib") else str(self.ws.resolve(data, "corpus", must_exist=True))

    def upload_corpus(self, file) -> tuple[str, str]:
        """Copy an uploaded text file into data/; returns (its workspace path, status)."""
        if not file:
            return "", "No file."
        path = self.ws.upload(getattr(file, "name", file), "data")
        return self.ws.rel(path), f"Uploaded to `{self.ws.rel(path)}`."

    def train_poll(self, job_id: str):
        """(status, progress, loss frame, log) of a train job; the loss is read from its metrics.jsonl."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        job = self._job(job_id)
        out = job.outputs.get("out") if job else None
        frame = views.read_metrics(self.ws.root / out / "metrics.jsonl") if out else views.read_metrics(Path("-"))
        return status, bar, frame, log

    # ------------------------------------------------------------------------- compress

    def compress_start(self, checkpoint: str, method: str, bits, group_size, extra: str, rules: str, data: str,
                       seq_len, max_tokens, out: str, force: bool = False, job_id: str = "") -> tuple[str, str]:
        """Start `edgesmith compress` with the quantize pass from the form plus any extra pass specs
        (one per line, as `--pass` takes them) and rules (REGEX=VALUE, one per line)."""
        try:
            ckpt = self.ws.resolve(checkpoint, "checkpoint", must_exist=True)
            out_p = self.ws.resolve(out or f"runs/{ckpt.name}-compressed", "output directory")
            specs = [f"quantize:method={method},bits={_int(bits, 'bits')},group_size={_int(group_size, 'group size')}"] \
                if method and method != "none" else []
            specs += [s.strip() for s in (extra or "").splitlines() if s.strip()]
            if not specs:
                raise EdgesmithError("passes: choose a quantization method or add a pass spec")
            argv = ["compress", str(ckpt)]
            for s in specs:
                argv += ["--pass", s]
            for r in (rules or "").splitlines():
                if r.strip():
                    argv += ["--rule", r.strip()]
            argv += ["--out", str(out_p), "--data", self._data(data), "--seq-len", str(_int(seq_len, "sequence length")),
                     "--max-tokens", str(_int(max_tokens, "max tokens"))] + (["--force"] if force else [])
        except EdgesmithError as e:
            return "", views.refused(e)  # no job: the poll leaves this line shown
        rel = self.ws.rel(out_p)
        job = self.jobs.start("compress", [argv], title=f"compress {self.ws.rel(ckpt)} → {rel}",
                              outputs={"out": rel}, result_file=f"{rel}/compress_report.json")
        return job.id, views.job_markdown(job)

    def compress_poll(self, job_id: str, shown: str = ""):
        """(status, progress, table, heatmap, log, shown-key). Table and heatmap are rebuilt only when
        the job or its state changed (`shown` is the key of what the page shows)."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        job = self._job(job_id)
        key = f"{job_id}:{job.status if job else ''}"
        if key == shown:
            return status, bar, SKIP, SKIP, log, key
        report = self.jobs.result(job_id) if job else None
        return (status, bar, views.compress_table(report),
                views.sqnr_heatmap(report.get("layer_sqnr_db", {})) if report else None, log, key)

    # ------------------------------------------------------------------------- export

    def export_start(self, checkpoint: str, formats: list[str], precision: str, max_seq_len, target: str,
                     out: str, force: bool = False, job_id: str = "") -> tuple[str, str]:
        """Start one `edgesmith export` per format, in order, into `<out>/<format>`."""
        try:
            ckpt = self.ws.resolve(checkpoint, "checkpoint", must_exist=True)
            out_p = self.ws.resolve(out or f"artifacts/{ckpt.name}", "output directory")
            if not formats:
                raise EdgesmithError("formats: choose at least one")
            seq = ["--max-seq-len", str(_int(max_seq_len, "max sequence length"))] if max_seq_len else []
            commands, dirs = [], {}
            for fmt in formats:
                dirs[fmt] = self.ws.rel(out_p / fmt)
                commands.append(["export", str(ckpt), "--format", fmt, "--out", str(out_p / fmt), "--precision",
                                 precision or "fp32", *seq] + (["--force"] if force else []))
        except EdgesmithError as e:
            return "", views.refused(e)  # no job: the poll leaves this line shown
        title = f"export {self.ws.rel(ckpt)} → {', '.join(formats)}" + (f" for {target}" if target else "")
        job = self.jobs.start("export", commands, title=title, outputs={"dirs": dirs, "target": target or ""})
        return job.id, views.job_markdown(job)

    def export_poll(self, job_id: str, shown: str = ""):
        """(status, progress, parity table, files table, device verdict, log, shown-key)."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        job = self._job(job_id)
        manifests = self._manifests(job)
        key = f"{job_id}:{job.status if job else ''}:{len(manifests)}"
        if key == shown:
            return status, bar, SKIP, SKIP, SKIP, log, key
        dirs = job.outputs.get("dirs", {}) if job else {}
        target = job.outputs.get("target", "") if job else ""
        return (status, bar, views.parity_table(manifests), views.files_table(manifests, dirs),
                self._target_verdict(target, dirs, manifests), log, key)

    def _manifests(self, job: Job | None) -> dict[str, dict]:
        found = {}
        for fmt, rel in ((job.outputs.get("dirs", {}) if job else {}) or {}).items():
            try:
                manifest = json.loads((self.ws.root / rel / "manifest.json").read_text())
            except (OSError, ValueError):  # not written yet, or not a manifest: not shown
                continue
            if isinstance(manifest, dict):
                found[fmt] = manifest
        return found

    def _target_verdict(self, target: str, dirs: dict, manifests: dict) -> str:
        if not target or not manifests:
            return ""
        from gui.devices_tab import plan_artifact

        return "\n".join(plan_artifact(target, self.ws.root / dirs[fmt]) for fmt in manifests)
