"""Run `edgesmith` as a user does, SIGKILL it at a chosen point, and look at what it left behind.

`launch(args)` starts `python -m edgesmith ARGS` in a session of its own (so the whole process
group -- torchrun, its ranks, bench agents that stay in the group -- can be killed the way a
terminal or a job manager does), with one CPU thread and a tag in its environment that every
descendant inherits. `Proc.kill_when(...)` waits for a condition plus a delay, then
`os.killpg(SIGKILL)`. `survivors(tag)` lists the tagged processes still alive: a process that left
the group (a new session) and did not die with it is an orphan. `temporaries(root)` lists what a
writer leaves while it works (`.NAME.tmp-*`, `.NAME.old-*` and older spellings). The kill points
are drawn from a seeded RNG (`crash_rng`): EDGESMITH_CRASH_SEED picks the seed, 0 by default.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEED_ENV = "EDGESMITH_CRASH_SEED"
TAG_ENV = "EDGESMITH_CRASH_TAG"


def crash_seed() -> int:
    text = os.environ.get(SEED_ENV, "").strip()
    return int(text) if text else 0


def crash_rng(stage: str) -> random.Random:
    """One RNG per stage, so a stage's kill points do not depend on which other tests ran."""
    return random.Random(f"{crash_seed()}:{stage}")


def is_temporary(name: str) -> bool:
    return (name.startswith(".") and (".tmp" in name or ".old-" in name)) or name.endswith(".partial")


def temporaries(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found += [Path(dirpath) / n for n in dirnames + filenames if is_temporary(n)]
    return sorted(found)


class Proc:
    """A running `edgesmith` command: output collected as it comes (never a full pipe), killable."""

    def __init__(self, args: list, env: dict | None = None, watch: tuple[Path, ...] = ()):
        self.args = [str(a) for a in args]
        self.tag = uuid.uuid4().hex
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", TAG_ENV: self.tag,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    **(env or {})}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgesmith", *self.args], env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.chunks: list[bytes] = []
        self.lines: list[tuple[float, str]] = []  # (seconds since start, line); tqdm's \r updates count too
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        atexit.register(self._stop)  # an interrupted test session leaves no command of its own running
        self.watch, self.first_temp_s, self.temps_seen = watch, None, set()
        self.kill_s: float | None = None

    def _read(self) -> None:
        pending = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            self.chunks.append(chunk)
            pending += chunk.replace(b"\r", b"\n")
            *done, pending = pending.split(b"\n")
            now = time.monotonic() - self.t0
            self.lines += [(now, line.decode(errors="replace")) for line in done]

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _poll_temps(self) -> None:
        found = temporaries(*self.watch) if self.watch else []
        if found and self.first_temp_s is None:
            self.first_temp_s = self.elapsed()
        self.temps_seen.update(found)

    def wait(self, timeout: float = 600, events: dict[str, Callable[[Proc], bool]] | None = None) -> int:
        """Run to the end; the exit status. Notes when a temporary path first appeared under `watch`
        (`first_temp_s`), the temporary paths seen (`temps_seen`, polled every 5 ms: a write quicker
        than that goes unseen) and when each of `events` first held (`event_s`)."""
        deadline = time.monotonic() + timeout
        self.event_s: dict[str, float] = {}
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"edgesmith {' '.join(self.args)}: still running after {timeout} s\n"
                                     f"{self.output[-3000:]}")
            self._poll_temps()
            for name, condition in (events or {}).items():
                if name not in self.event_s and condition(self):
                    self.event_s[name] = self.elapsed()
            time.sleep(0.005)
        self._reader.join(timeout=10)
        return self.proc.returncode

    def kill_when(self, condition: Callable[[Proc], bool], delay: float, timeout: float = 600) -> bool:
        """Once `condition(self)` holds, wait `delay` s more, then SIGKILL the process group.
        False when the command had finished before that point (nothing to kill)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and not condition(self):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        end = time.monotonic() + delay
        while self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
            return False
        self.kill()
        return True

    def _stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.kill_s = self.elapsed()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reader.join(timeout=10)


def after_seconds(s: float) -> Callable[[Proc], bool]:
    return lambda p: p.elapsed() >= s


def after_lines(k: int, pattern: str) -> Callable[[Proc], bool]:
    """True once `k` output lines matching `pattern` (at their start) were printed."""
    regex = re.compile(pattern)
    return lambda p: sum(bool(regex.match(line)) for _, line in p.lines) >= k


def after_temporaries(k: int, *roots: Path) -> Callable[[Proc], bool]:
    """True once the `k`-th distinct temporary path appeared under `roots`: the command is writing."""
    seen: set[Path] = set()

    def ready(_p) -> bool:
        seen.update(temporaries(*roots))
        return len(seen) >= k
    return ready


def child_running(module: str) -> Callable[[Proc], bool]:
    """True once a process of the command (a descendant: it carries the tag) runs `python -m module`."""
    return lambda p: any(f" -m {module} " in cmd for cmd in tagged(p.tag).values())


def after_file_lines(path: Path, k: int) -> Callable[[Proc], bool]:
    def ready(_p) -> bool:
        try:
            return path.read_bytes().count(b"\n") >= k
        except OSError:
            return False
    return ready


# ----------------------------------------------------------------------------- orphans


def tagged(tag: str) -> dict[int, str]:
    """Live (not zombie) processes whose environment carries `tag`: pid -> command line."""
    found = {}
    needle = f"{TAG_ENV}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found[int(entry.name)] = cmd.strip()[:200]
    return found


def survivors(tag: str, grace: float = 0.5) -> dict[int, str]:
    """Tagged processes still alive `grace` s after the kill (then killed, so no test leaves them).

    What the kill reaches (the group; the ranks and agents that die with their parent) is gone in
    milliseconds. An orphan lives on until its work is done, or until it first writes to the pipe
    of its dead parent: with the tiny runs here, often only a second or two."""
    deadline = time.monotonic() + grace
    left = tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged(tag)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
