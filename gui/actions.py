"""What the GUI's buttons do: turn the form into a recipe (gui/recipes.py), start `edgesmith run` on it as
a background job (toolchain.jobs), and read its state and results back from disk on every poll.

`Actions` holds the workspace and the job manager; its methods are the Gradio event handlers and
take and return plain values (strings, numbers, pandas frames, figures), so tests call them without
a browser. Every path typed in the browser goes through `Workspace.resolve` (refused outside the
workspace); every command is an argument list. Nothing here trains, compresses or exports itself.
"""

from __future__ import annotations

from pathlib import Path

from gui import recipes, views
from gui.devices_tab import plan_artifact
from gui.workspace import Workspace
from models.errors import EdgesmithError
from toolchain.jobs import Job, JobManager

SKIP = object()  # "leave this output as it is" (gr.skip() in the app)


JOB_COLUMNS = ["id", "kind", "status", "progress", "what"]  # the Runs tab's jobs table

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
            rows.append([j.id, j.kind, j.status, views.progress_text(p) if p else "", j.title])
        return pd.DataFrame(rows, columns=JOB_COLUMNS)

    def choices(self) -> tuple[list[str], list[str]]:
        """(checkpoints, artifacts) in the workspace."""
        return self.ws.checkpoints(), self.ws.artifacts()

    def lists_key(self) -> str:
        """Changes when a job starts or finishes: the page then refreshes its lists (runs, checkpoints,
        artifacts, jobs)."""
        return self.jobs.state_key()

    def _start_recipe(self, kind: str, doc: dict, out: Path, title: str, **outputs) -> tuple[str, str]:
        rel = self.ws.rel(out)
        busy = [j for j in self.jobs.list(limit=50) if not j.done and j.outputs.get("out") == rel]
        if busy:  # its recipe file is about to be read by that job: not overwritten under it
            raise EdgesmithError(f"output directory: {rel} is in use by job {busy[0].id} ({busy[0].status}); "
                                 "wait for it, stop it, or choose another")
        recipe, _ = recipes.write(self.ws, doc)
        # absolute paths on the command line: the job's processes (torchrun ranks too) name their run
        argv = recipes.run_argv(str(self.ws.root / recipe), str(out))
        job = self.jobs.start(kind, [argv], title=f"{title} → {rel}",
                              outputs={"out": rel, "recipe": recipe, **outputs}, result_file=f"{rel}/run.json")
        return job.id, views.job_markdown(job)

    def _run(self, job: Job | None) -> Path | None:
        out = job.outputs.get("out") if job else None
        return self.ws.root / out if out else None

    # ------------------------------------------------------------------------- train

    def train_start(self, model: str, data: str, steps, nproc, batch_size, seq_len, out: str,
                    job_id: str = "") -> tuple[str, str]:
        """Run a training recipe ([source.train] alone); returns (job id, status)."""
        try:
            out_p, name = recipes.run_dir(self.ws, out, "runs/train")
            doc = recipes.train_doc(self.ws, name, model, data, steps, nproc, batch_size, seq_len)
            return self._start_recipe("train", doc, out_p, f"train {doc['source']['train']['model']}")
        except EdgesmithError as e:
            return "", views.refused(e)  # no job: the poll leaves this line shown

    def upload_corpus(self, file) -> tuple[str, str]:
        """Copy an uploaded text file into data/; returns (its workspace path, status)."""
        if not file:
            return "", "No file."
        path = self.ws.upload(getattr(file, "name", file), "data")
        return self.ws.rel(path), f"Uploaded to `{self.ws.rel(path)}`."

    def train_poll(self, job_id: str):
        """(status, progress, loss frame, log) of a train job; the loss is read from the trainer's metrics."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        run = self._run(self._job(job_id))
        return status, bar, views.read_metrics(recipes.metrics_file(run) if run else Path("-")), log

    # ------------------------------------------------------------------------- compress

    def compress_start(self, checkpoint: str, method: str, bits, group_size, extra: str, rules: str, data: str,
                       seq_len, max_tokens, out: str, job_id: str = "") -> tuple[str, str]:
        """Run a recipe with the quantize pass from the form, then any extra pass specs (one per line, as
        `--pass` takes them) and rules (REGEX=VALUE, one per line) on a checkpoint."""
        try:
            ckpt = self.ws.resolve(checkpoint, "checkpoint", must_exist=True)
            out_p, name = recipes.run_dir(self.ws, out, f"runs/{recipes.run_stem(ckpt)}-compressed")
            specs = [f"quantize:method={method},bits={recipes.number(bits, 'bits')},"
                     f"group_size={recipes.number(group_size, 'group size')}"] if method and method != "none" else []
            specs += [s.strip() for s in (extra or "").splitlines() if s.strip()]
            doc = recipes.compress_doc(self.ws, name, out_p, checkpoint, specs, rules, data, seq_len, max_tokens)
            return self._start_recipe("compress", doc, out_p, f"compress {doc['source']['checkpoint']}")
        except EdgesmithError as e:
            return "", views.refused(e)

    def compress_poll(self, job_id: str, shown: str = ""):
        """(status, progress, table, heatmap, log, shown-key). Table and heatmap are rebuilt only when
        the job, its state or its finished passes changed (`shown` is the key of what the page shows)."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        job = self._job(job_id)
        run = self._run(job)
        reports = recipes.pass_reports(run) if run else []
        key = f"{job_id}:{job.status if job else ''}:{len(reports)}"
        if key == shown:
            return status, bar, SKIP, SKIP, log, key
        report = recipes.merged_report(reports)
        return (status, bar, views.compress_table(report),
                views.sqnr_heatmap(report.get("layer_sqnr_db", {})) if report else None, log, key)

    # ------------------------------------------------------------------------- export

    def export_start(self, checkpoint: str, formats: list[str], precision: str, max_seq_len, target: str,
                     out: str, job_id: str = "") -> tuple[str, str]:
        """Run a recipe exporting a checkpoint to every chosen format, into `<out>/artifacts/<format>`."""
        try:
            ckpt = self.ws.resolve(checkpoint, "checkpoint", must_exist=True)
            out_p, name = recipes.run_dir(self.ws, out, f"runs/{recipes.run_stem(ckpt)}-export")
            doc = recipes.export_doc(self.ws, name, out_p, checkpoint, formats, precision, max_seq_len, target)
            title = f"export {doc['source']['checkpoint']} to {', '.join(formats)}"
            title += f" for {target}" if target else ""
            return self._start_recipe("export", doc, out_p, title, target=(target or "").strip())
        except EdgesmithError as e:
            return "", views.refused(e)

    def export_poll(self, job_id: str, shown: str = ""):
        """(status, progress, parity table, files table, device verdict, log, shown-key)."""
        if not job_id:
            return SKIP, SKIP, SKIP, SKIP, SKIP, SKIP, SKIP
        status, bar, log = self.job_state(job_id)
        job = self._job(job_id)
        run = self._run(job)
        found = recipes.manifests(run) if run else {}
        key = f"{job_id}:{job.status if job else ''}:{len(found)}"
        if key == shown:
            return status, bar, SKIP, SKIP, SKIP, log, key
        dirs = {fmt: self.ws.rel(run / "artifacts" / fmt) for fmt in found}
        target = job.outputs.get("target", "") if job else ""
        return (status, bar, views.parity_table(found), views.files_table(found, dirs),
                self._target_verdict(target, dirs, found), log, key)

    def _target_verdict(self, target: str, dirs: dict, found: dict) -> str:
        if not target or not found:
            return ""
        return "\n".join(plan_artifact(target, self.ws.root / dirs[fmt], fmt) for fmt in found)
