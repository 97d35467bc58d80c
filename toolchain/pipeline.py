"""Run a recipe: source -> passes -> exports (parity inside) -> bench -> report, each step cached.

Layout of a run directory (DESIGN.md):

    runs/<name>/recipe.toml              the resolved recipe (after --set overrides)
    runs/<name>/checkpoints/00-train/    the trained source (with train_metrics.jsonl, loss.png)
    runs/<name>/checkpoints/NN-<pass>/   one checkpoint per pass (compress_report.json inside)
    runs/<name>/artifacts/<format>/      exported files + manifest.json (parity)
    runs/<name>/bench/<device>.json      measured results (or <device>.plan.json: predicted, not measured)
    runs/<name>/report.html, report.md   toolchain/report.py
    runs/<name>/run.json                 what ran: steps, keys, seconds, skipped formats

Caching. Every step has a key: sha256 over its input's key and its own configuration (a source
checkpoint's key is its weights' sha256 and config; a trained source's is the model config, the
corpus content fingerprint and the TrainConfig). Keys chain, so changing pass 2 changes the keys of
pass 2, 3, ..., the exports and the bench, and nothing before. A step's output is complete when its
final path exists with its marker `.step.json` (inside the directory; beside a bench file) holding
the key; a step writes into a temporary path and renames it into place, so a killed run leaves
either a finished step or debris that the next run deletes. The trainer also saves resumable state
under `.work/train-<key>/`, so a killed training continues from its last state. The cache lives in
the run directory itself: the same recipe run into another directory starts from nothing.

It does not measure (devices.bench), draw (toolchain.report) or define passes (toolchain.compress).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from models.atomic import remove_tree, replace_dir, temp_path, write_text_atomic
from models.checkpoint import read_json
from models.errors import EdgesmithError
from toolchain.compress.driver import compress_checkpoint
from toolchain.pipeline_steps import FILE_STAGES, MARKER, STAGES, Step, plan
from toolchain.recipe import Recipe, pass_table, to_toml
from toolchain.report import console_summary
from toolchain.train.run import TrainJob, run_train
from toolchain.train.trainer import TrainConfig

RUN_JSON = "run.json"

# ----------------------------------------------------------------------------- progress


class Progress:
    """One display for the whole run: `[stage i/n] step j/m name ... elapsed, ETA`, plus events for a GUI."""

    def __init__(self, steps: list[Step], callback=None, echo: bool = True):
        self.steps, self.callback, self.echo = steps, callback, echo
        self.t0 = time.perf_counter()
        self.spent_estimate = 0.0  # estimates of the steps finished (work actually done)

    def eta(self, index: int) -> float:
        remaining = sum(s.estimate_s for s in self.steps[index:] if not s.cached)
        elapsed = time.perf_counter() - self.t0
        ratio = elapsed / self.spent_estimate if self.spent_estimate > 30 else 1.0  # learn the machine's pace
        return remaining * min(max(ratio, 0.25), 4.0)

    def start(self, index: int, step: Step) -> None:
        stage_steps = [s for s in self.steps if s.stage == step.stage]
        j, m = stage_steps.index(step) + 1, len(stage_steps)
        stage_no = [s for s in STAGES if any(x.stage == s for x in self.steps)].index(step.stage) + 1
        n_stages = len({s.stage for s in self.steps})
        eta = self.eta(index)
        msg = (f"[{stage_no}/{n_stages} {step.stage}] {j}/{m} {step.name}: {step.describe or step.stage}  "
               f"(elapsed {_clock(time.perf_counter() - self.t0)}, ETA {_clock(eta)})")
        if self.echo:
            print(msg, flush=True)
        self.emit(step.stage, index + 1, eta, msg)

    def finish(self, index: int, step: Step) -> None:
        if not step.cached:
            self.spent_estimate += step.estimate_s
        if self.echo:
            what = "cached (key matches, nothing to do)" if step.cached else f"done in {step.seconds:.1f} s"
            print(f"    {step.name}: {what}", flush=True)
        self.emit(step.stage, index + 1, self.eta(index + 1), f"{step.name}: {'cached' if step.cached else 'done'}")

    def emit(self, stage: str, step: int, eta: float, message: str) -> None:
        if self.callback is not None:
            self.callback({"stage": stage, "step": step, "total": len(self.steps), "eta_s": round(eta, 1),
                           "message": message})


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


# ----------------------------------------------------------------------------- running


def run_pipeline(recipe: Recipe, out: str | Path | None = None, progress=None, echo: bool = True) -> dict:
    """Run `recipe` into `out` (default runs/<recipe.name>); returns the summary written to run.json."""
    run_dir = Path(out) if out is not None else Path("runs") / recipe.name
    steps, skipped = plan(recipe, run_dir)  # every check that needs no work, before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    with _lock(run_dir):
        _clean_debris(run_dir)
        resolved = to_toml(recipe.document)
        if not (run_dir / "recipe.toml").is_file() or (run_dir / "recipe.toml").read_text() != resolved:
            write_text_atomic(run_dir / "recipe.toml", resolved)
        t0 = time.perf_counter()
        prog = Progress(steps, progress, echo)
        for step in steps:  # keys chain, so a done step stays valid whatever an earlier one does
            step.cached = step.done()
        if echo:
            work = sum(not s.cached for s in steps)
            print(f"edgesmith run {recipe.name} -> {run_dir}: {len(steps)} steps, {work} to run"
                  + "".join(f"; {s['format']} skipped ({s['reason']})" for s in skipped), flush=True)
        for i, step in enumerate(steps):
            prog.start(i, step)
            if step.cached:
                marker = json.loads(step.marker.read_text())
                step.info, step.seconds, step.made_s = marker.get("info", {}), 0.0, marker.get("seconds", 0.0)
            else:
                if step.stage == "report":  # the report reads run.json
                    _write_summary(recipe, run_dir, steps[:i], skipped, t0)
                _execute(step)
            prog.finish(i, step)
        summary = _write_summary(recipe, run_dir, steps, skipped, t0)
        _remove_stale(run_dir, steps)
    summary["console"] = console_summary(run_dir)
    return summary


def _execute(step: Step) -> None:
    t = time.perf_counter()
    tmp = temp_path(step.out)
    step.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        step.info = step.run(tmp) or {}
        step.seconds = step.made_s = round(time.perf_counter() - t, 2)
        record = {"key": step.key, "stage": step.stage, "name": step.name, "seconds": step.seconds,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "info": step.info}
        if step.stage in FILE_STAGES:  # a file: rename it into place (the report writes its own), then the marker
            if tmp.exists():
                tmp.replace(step.out)
            write_text_atomic(step.marker, json.dumps(record, indent=2) + "\n")
        else:
            write_text_atomic(tmp / MARKER, json.dumps(record, indent=2) + "\n")
            replace_dir(tmp, step.out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


class _lock:
    """One run per directory at a time (a flock: released by the kernel if the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise EdgesmithError(f"{self.path.parent}: another edgesmith run is using this run directory") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _clean_debris(run_dir: Path) -> None:
    """Temporary paths a killed run left (`.NAME.tmp-...` half-written, `.NAME.old-...` half-deleted),
    anywhere one level down; the run directory's lock makes them all dead."""
    for parent in (run_dir, *(p for p in run_dir.iterdir() if p.is_dir() and p.name != ".work")):
        for p in (*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _remove_stale(run_dir: Path, steps: list[Step]) -> None:
    """Checkpoints and artifacts of an earlier version of the recipe that this one no longer makes."""
    keep = {s.out for s in steps}
    for sub in ("checkpoints", "artifacts"):
        for p in (run_dir / sub).glob("*") if (run_dir / sub).is_dir() else ():
            if p.is_dir() and not p.name.startswith(".") and p not in keep and (p / MARKER).is_file():
                remove_tree(p)  # at once: a half-deleted step with its marker would pass for a cached one
    work = run_dir / ".work"  # every step is done: training state and job files are no longer needed
    if work.is_dir():
        for p in work.iterdir():
            remove_tree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _write_summary(recipe: Recipe, run_dir: Path, steps: list[Step], skipped: list, t0: float) -> dict:
    summary = _summary(recipe, run_dir, steps, skipped, time.perf_counter() - t0)
    write_text_atomic(run_dir / RUN_JSON, json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(recipe: Recipe, run_dir: Path, steps: list[Step], skipped: list, wall: float) -> dict:
    stage_s = {st: round(sum(s.seconds for s in steps if s.stage == st), 2) for st in STAGES}
    return {
        "recipe": recipe.name, "origin": recipe.origin, "run_dir": str(run_dir),
        "source": {"checkpoint": recipe.source.checkpoint} if recipe.source.checkpoint else {"train": True},
        "target": asdict(recipe.target),
        "steps": [{"stage": s.stage, "name": s.name, "key": s.key, "path": str(s.out.relative_to(run_dir)),
                   "cached": s.cached, "seconds": s.seconds, "made_s": s.made_s, "info": s.info} for s in steps],
        "skipped": skipped, "stage_seconds": stage_s, "wall_s": round(wall, 2),
        "did_work": any(not s.cached for s in steps),
    }


# ----------------------------------------------------------------------------- rank entry


def run_step_job(path: str | Path) -> None:
    """Inside a torchrun rank: run the train or compress job the pipeline wrote to `path`."""
    job = read_json(Path(path))
    if job["kind"] == "train":
        t = job["job"]
        run_train(TrainJob(**{**t, "train": TrainConfig(**t["train"])}), job["argv"])
    elif job["kind"] == "compress":
        c = job["job"]
        cfg = pass_table(c.pop("pass"), "pass")
        compress_checkpoint(c.pop("src"), c.pop("out"), [cfg], argv=job["argv"], **c)
    else:
        raise EdgesmithError(f"{path}: unknown step job kind {job['kind']!r}")
