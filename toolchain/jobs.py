"""Background jobs: `edgesmith` commands run as detached process groups, with their state on disk.

A job is one or more `edgesmith` command lines (argument lists, never shell strings) run in order by
a small runner process (`python -m toolchain.jobs DIR`). The runner leads its own session and
process group, so cancelling a job kills everything it started (torchrun ranks included), and it
outlives the process that started it. Everything about a job lives under `<root>/<id>/`:

    job.json    id, kind, title, commands, working directory, outputs, result file (written once)
    pid.json    the runner's pid and kernel start time (a reused pid is not mistaken for the runner)
    step.json   index of the command running now
    log.txt     stdout and stderr of every command, in order
    exit.json   written by the runner at the end: status, return code, finish time
    cancel      marker written by `cancel`

so a page reload, a second GUI, or a restarted one finds every job again with `JobManager.get` /
`JobManager.list`. Progress is read back from the log: the last stage line of a recipe run
(toolchain/pipeline.py prints `[stage i/n name] j/m step: what  (elapsed m:ss, ETA m:ss)`) and the
last tqdm counter `n/total` after it. This module knows nothing about Gradio; it does not parse what
the commands print beyond those two lines.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.atomic import write_text_atomic
from models.errors import EdgesmithError

STATUSES = ("running", "done", "failed", "cancelled", "lost")
FINISHED = ("done", "failed", "cancelled", "lost")
ID_RE = re.compile(r"^\d{8}-\d{6}-[a-z0-9][a-z0-9-]*-[0-9a-f]{4}$")
KIND_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# tqdm's counter: "12/600 [", or a unit-scaled one such as tokenization's "1.20MB/3.55MB [" (bytes read)
TQDM_RE = re.compile(r"(?:([^\r\n:|]{1,60}):\s*)?(?:\d+%\|[^|]*\|\s*)?([\d.]+[kMGT]?)[A-Za-z]{0,2}/([\d.]+[kMGT]?)"
                     r"[A-Za-z]{0,2}\s*\[")
_SCALE = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _count(text: str) -> int:
    """A tqdm counter as an integer: "35" -> 35, "1.2k" -> 1200 (unit_scale=True)."""
    return round(float(text[:-1]) * _SCALE[text[-1]]) if text[-1] in _SCALE else round(float(text))
# toolchain.pipeline.Progress.start: "[2/4 compress] 1/1 01-quantize-rtn: quantize ...  (elapsed 0:12, ETA 1:40)"
STAGE_TAIL = 1 << 18  # bytes of log searched for the stage line (a training stage's counters follow it)
STAGE_RE = re.compile(r"(?:^|\r)\[(\d+)/(\d+) ([a-z]+)\] (\d+)/(\d+) ([^:\n]+): (.*?)\s+\(elapsed (\d+):(\d\d), "
                      r"ETA (\d+):(\d\d)\)\s*$", re.M)
# Environment variables a job never inherits (the GUI's credentials).
SECRET_ENV = ("EDGESMITH_GUI_AUTH",)


def project_root() -> Path:
    """The directory holding the `toolchain` package: put on the jobs' PYTHONPATH so that
    `python -m edgesmith` works from any working directory."""
    return Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    """A snapshot of one job, read from its directory."""
    id: str
    kind: str
    title: str
    status: str
    commands: list = field(default_factory=list)
    cwd: str = ""
    created: float = 0.0
    finished: float | None = None
    returncode: int | None = None
    step: int = 0  # index of the command running (or the last one run)
    progress: dict = field(default_factory=dict)  # {"label", "n", "total", "fraction"} of the running command
    outputs: dict = field(default_factory=dict)  # caller's names for what the job writes (paths)
    result_file: str | None = None
    dir: str = ""

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    def command_lines(self) -> list[str]:
        return ["edgesmith " + shlex.join(c) for c in self.commands]

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _proc_start_time(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a live pid from /proc, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _alive(pid: int, start_time: int | None) -> bool:
    if not Path("/proc").is_dir():  # not Linux: no start time to compare, fall back on signal 0
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    info = _proc_start_time(pid)
    if info is None:
        return False
    state, started = info
    if state == "Z":  # exited; reap it if it is our child (a GUI that started it and keeps running)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return start_time is None or started == start_time


def read_progress(log: Path, tail_bytes: int = 8192, started: float | None = None) -> dict:
    """Progress from the end of `log`: {"label", "n", "total", "fraction"} of the last tqdm counter, or {}.

    A recipe run's log also gives its stage: then "stage" is {"index", "count", "name", "step",
    "steps", "what", "eta_s"} of the last stage line, the counter is only one printed after that line
    (the stage's own work), and "fraction" is of the whole run. `started` (when the command began,
    epoch seconds) turns the ETA printed at the stage's start into the time left now."""
    try:
        stage_text = _read_tail(log, max(tail_bytes, STAGE_TAIL))
    except FileNotFoundError:
        return {}
    text = stage_text[-tail_bytes:]
    stages = list(STAGE_RE.finditer(stage_text))
    stage = stages[-1] if stages else None
    if stage is not None:  # only what the stage printed after its line counts as its counter
        text = stage_text[stage.end():][-tail_bytes:]
    matches = list(TQDM_RE.finditer(text))
    counter = {}
    if matches:
        m = matches[-1]
        n, total = _count(m.group(2)), _count(m.group(3))
        counter = {"label": (m.group(1) or "").strip(), "n": n, "total": total,
                   "fraction": min(1.0, n / total) if total else 0.0}
    if stage is None:
        return counter
    i, count, j, steps = (int(stage.group(k)) for k in (1, 2, 4, 5))
    elapsed = int(stage.group(8)) * 60 + int(stage.group(9))
    eta = int(stage.group(10)) * 60 + int(stage.group(11))
    if started is not None:  # the line was printed `elapsed` after the run began (imports not counted)
        eta -= max(0.0, time.time() - started - elapsed)
    within = ((j - 1) + counter.get("fraction", 0.0)) / max(steps, 1)
    return {"label": counter.get("label") or stage.group(3), "n": counter.get("n", j),
            "total": counter.get("total", steps), "fraction": min(1.0, ((i - 1) + within) / max(count, 1)),
            "stage": {"index": i, "count": count, "name": stage.group(3), "step": stage.group(6).strip(),
                      "steps": f"{j}/{steps}", "what": stage.group(7).strip(), "eta_s": round(eta)}}


def _read_tail(log: Path, tail_bytes: int) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
        return f.read().decode("utf-8", "replace")


def log_tail(log: Path, max_lines: int = 40, tail_bytes: int = 65536) -> str:
    """The last lines of a log as a terminal would show them: a carriage return overwrites its line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(lines[-max_lines:]).strip("\n")


class JobManager:
    """Start, list, read and cancel jobs kept under `root` (e.g. `<workspace>/jobs`)."""

    def __init__(self, root: str | Path, cwd: str | Path | None = None):
        self.root = Path(root)
        self.cwd = Path(cwd) if cwd is not None else self.root.parent
        self._children: dict[str, subprocess.Popen] = {}  # runners this process started (reaped on read)

    # ------------------------------------------------------------------------- starting

    def start(self, kind: str, commands: list[list[str]], title: str = "", outputs: dict | None = None,
              result_file: str | None = None) -> Job:
        """Run `commands` (each the arguments of one `edgesmith` command) in order, in the background."""
        if not KIND_RE.match(kind):
            raise EdgesmithError(f"job kind {kind!r}: lowercase letters, digits and '-' only")
        if not commands or not all(isinstance(c, list) and c and all(isinstance(a, str) for a in c) for c in commands):
            raise EdgesmithError("job commands: a non-empty list of argument lists (strings), one per command")
        self.root.mkdir(parents=True, exist_ok=True)
        for old_id, old in list(self._children.items()):  # reap runners that ended unread (no zombies kept)
            if old.poll() is not None:
                self._children.pop(old_id, None)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(2)}"
        d = self.root / job_id
        d.mkdir()
        spec = {"id": job_id, "kind": kind, "title": title or kind, "commands": commands, "cwd": str(self.cwd),
                "created": time.time(), "outputs": outputs or {}, "result_file": result_file}
        write_text_atomic(d / "job.json", json.dumps(spec, indent=2) + "\n")
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_root()), env.get("PYTHONPATH")]))
        with open(d / "runner.log", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "toolchain.jobs", str(d)], cwd=self.cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        self._children[job_id] = proc
        info = _proc_start_time(proc.pid)
        write_text_atomic(d / "pid.json", json.dumps({"pid": proc.pid, "start_time": info and info[1]}) + "\n")
        return self.get(job_id)

    # ------------------------------------------------------------------------- reading

    def _dir(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not ID_RE.match(job_id):
            raise EdgesmithError(f"job {job_id!r}: not a job id")
        d = self.root / job_id
        if not (d / "job.json").is_file():
            raise EdgesmithError(f"job {job_id}: no such job under {self.root}")
        return d

    def get(self, job_id: str) -> Job:
        d = self._dir(job_id)
        spec = _read_json(d / "job.json") or {}
        proc = self._children.get(job_id)
        if proc is not None and proc.poll() is not None:
            self._children.pop(job_id, None)
        end = _read_json(d / "exit.json")
        step = (_read_json(d / "step.json") or {}).get("step", 0)
        if end is not None:
            status, rc, finished = end["status"], end.get("returncode"), end.get("finished")
        else:
            pid = _read_json(d / "pid.json")
            rc, finished = None, None
            if pid is None or _alive(pid["pid"], pid.get("start_time")):
                status = "running"  # (pid.json not yet written: the runner is being started)
            else:
                status = "cancelled" if (d / "cancel").exists() else "lost"
        return Job(id=spec["id"], kind=spec["kind"], title=spec.get("title", spec["kind"]), status=status,
                   commands=spec["commands"], cwd=spec.get("cwd", ""), created=spec.get("created", 0.0),
                   finished=finished, returncode=rc, step=step,
                   progress=read_progress(d / "log.txt", started=_mtime(d / "step.json"))
                   if status == "running" else {},
                   outputs=spec.get("outputs", {}), result_file=spec.get("result_file"), dir=str(d))

    def list(self, kind: str | None = None, limit: int | None = None) -> list[Job]:
        """Jobs (of `kind`), newest first, at most `limit`: only those are read (the kind is in the id)."""
        if not self.root.is_dir():
            return []
        ids = sorted((p.name for p in self.root.iterdir() if ID_RE.match(p.name) and (p / "job.json").is_file()
                      and (kind is None or p.name[16:-5] == kind)), reverse=True)
        return [self.get(i) for i in ids[:limit]]

    def state_key(self) -> str:
        """Changes whenever a job starts or finishes: `jobs:finished:newest finished`. Cheap (one directory
        listing), for a page that refreshes its lists when a job starts or ends."""
        if not self.root.is_dir():
            return "0:0:"
        ids = [p for p in self.root.iterdir() if ID_RE.match(p.name)]
        ended = sorted(p.name for p in ids if (p / "exit.json").is_file())
        return f"{len(ids)}:{len(ended)}:{ended[-1] if ended else ''}"

    def latest(self, kind: str) -> Job | None:
        jobs = self.list(kind, limit=1)
        return jobs[0] if jobs else None

    def log(self, job_id: str, max_lines: int = 40) -> str:
        return log_tail(self._dir(job_id) / "log.txt", max_lines)

    def result(self, job_id: str) -> dict | None:
        """The job's result file (JSON, e.g. a report or a manifest) once it finished successfully."""
        job = self.get(job_id)
        if job.status != "done" or not job.result_file:
            return None
        return _read_json(Path(job.cwd) / job.result_file)

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.2) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job.done:
                return job
            if time.monotonic() > deadline:
                raise EdgesmithError(f"job {job_id}: still {job.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------------- cancelling

    def cancel(self, job_id: str, grace_s: float = 5.0) -> Job:
        """SIGTERM every process of the job, SIGKILL what is left after `grace_s`; returns the final state.

        "Every process": the runner's process group and every descendant of the runner, also those
        that left the group for a session of their own (torchrun's ranks), found through /proc, and
        their descendants in turn; each is identified by pid and start time, so that a reused pid
        is never signalled. Zombies count as gone (they hold nothing but a pid)."""
        d = self._dir(job_id)
        job = self.get(job_id)
        if job.done:
            return job
        (d / "cancel").touch()
        info = _read_json(d / "pid.json") or {}
        pid = info.get("pid")
        if pid is None:
            return self.get(job_id)
        tracked: dict[int, int | None] = {pid: info.get("start_time")}
        if not _stop(pid, tracked, signal.SIGTERM, grace_s):  # something ignored SIGTERM
            _stop(pid, tracked, signal.SIGKILL, 2.0)
        self._children.pop(job_id, None)
        return self.get(job_id)


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state letter, start time) of every process, from /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        f = stat[stat.rindex(")") + 2:].split()
        found[int(entry.name)] = (int(f[1]), int(f[2]), f[0], int(f[19]))
    return found


def _job_processes(pgid: int, tracked: dict[int, int | None]) -> dict[int, bool]:
    """Live (not zombie) processes of a job: its process group `pgid`, the `tracked` processes still
    running (same start time: the runner to begin with), and the descendants of all of these. What it
    finds is added to `tracked`, so a rank whose parent died first is still found the next time.
    Returns pid -> whether it is in the group (a signal to the group reached it)."""
    procs = _processes()
    roots = {p for p, start in tracked.items() if p in procs and start in (None, procs[p][3])}
    members = {p for p, (_, group, _, _) in procs.items() if group == pgid} | roots
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in members:
                members.add(child)
                todo.append(child)
    live = {p for p in members if p in procs and procs[p][2] != "Z"}
    tracked.update((p, procs[p][3]) for p in live)
    return {p: procs[p][1] == pgid for p in live}


def _stop(pgid: int, tracked: dict[int, int | None], sig: int, timeout_s: float) -> bool:
    """Send `sig` to the job's processes (and to any that appear meanwhile) until none is left or
    `timeout_s` passes; reaps the leader if it is our child. True when none is left."""
    if not Path("/proc").is_dir():  # not Linux: the process group is all we can reach
        _signal_group(pgid, sig)
        return _wait_group(pgid, timeout_s)
    deadline = time.monotonic() + timeout_s
    before = _job_processes(pgid, tracked)  # before any signal: a parent that dies first hides its children
    _signal_group(pgid, sig)
    signalled = {p for p, in_group in before.items() if in_group}  # once is enough (torchrun shuts down on one)
    while True:
        try:
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        live = _job_processes(pgid, tracked)
        if not live:
            return True
        for p in set(live) - signalled:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
            signalled.add(p)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _wait_group(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of group `pgid` is left (reaping the leader if it is our child)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- the runner process


def run_job(d: Path) -> int:
    """Run the job in `d` (its runner process): every command in order, then exit.json."""
    spec = json.loads((d / "job.json").read_text())
    cancelled = False

    def on_signal(signum, frame):  # the commands get the same signal (one process group); note it, go on
        nonlocal cancelled
        cancelled = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rc, step = 0, 0
    with open(d / "log.txt", "ab", buffering=0) as log:
        for step, argv in enumerate(spec["commands"]):
            if cancelled or (d / "cancel").exists():
                cancelled = True
                break
            write_text_atomic(d / "step.json", json.dumps({"step": step}) + "\n")
            log.write(f"$ edgesmith {shlex.join(argv)}\n".encode())
            proc = subprocess.Popen([sys.executable, "-m", "edgesmith", *argv], cwd=spec["cwd"],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            rc = proc.wait()
            if rc != 0:
                break
        cancelled = cancelled or (d / "cancel").exists()
        status = "cancelled" if cancelled else "done" if rc == 0 else "failed"
        log.write(f"[job {status}: exit status {rc}]\n".encode())
    write_text_atomic(d / "exit.json", json.dumps({"status": status, "returncode": rc, "step": step,
                                                   "finished": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
