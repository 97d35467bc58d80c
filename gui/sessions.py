"""The Playground's loaded models: a bounded pool of `runtimes` sessions, each lent to one stream at a time.

A Session holds one KV cache, so two streams must never share one: a stream borrows its sessions
with `borrow(paths)` and gives them back with `give_back` when it ends (finished, failed or
cancelled). `borrow` takes every session a request needs at once, or waits until it can (never one
now and one later: two side-by-side requests then cannot each hold half of what the other needs).
A model has at most `copies` sessions (two streams of one model at a time, e.g. the same model on
both sides); idle sessions are kept, most recently used last, and closed beyond `keep` in all.
Sessions are keyed by the model's real path, the modification time of its manifest.json /
edgesmith.json, so a model re-exported in place is loaded again rather than served stale, and the
runtime options it was loaded with (a session at accuracy level 0 is not one at level 4).
Nothing here generates text (gui/playground.py).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from pathlib import Path

from models.errors import EdgesmithError

MARKERS = ("manifest.json", "edgesmith.json", "config.json")


def model_key(path: Path) -> tuple[str, int]:
    """(real path, mtime of its first marker file): what identifies one loaded model."""
    for name in MARKERS:
        try:
            return str(path), (path / name).stat().st_mtime_ns
        except OSError:
            continue
    return str(path), 0


class SessionPool:
    def __init__(self, keep: int = 4, copies: int = 2, wait_s: float = 600.0):
        if copies < 2:
            raise ValueError("copies: at least 2 (a request may show one model on both sides)")
        self.keep, self.copies, self.wait_s = keep, copies, wait_s
        self._idle: OrderedDict[tuple, list] = OrderedDict()  # key -> idle sessions (LRU order of keys)
        self._total: Counter = Counter()  # key -> sessions of that model, lent, idle or being loaded
        self._cond = threading.Condition()
        self._loading = threading.Lock()  # one load at a time (backends initialise global state)

    def loaded(self) -> int:
        with self._cond:
            return sum(self._total.values())

    def borrow(self, paths: list[Path], load, options: list[dict] | None = None) -> list:
        """One session per entry of `paths` (a path twice: two sessions), loaded with `load(path, **options[i])`
        where none with the same options is idle. Waits while other streams hold the copies it needs."""
        options = options or [{} for _ in paths]
        keys = [(*model_key(p), tuple(sorted(o.items()))) for p, o in zip(paths, options)]
        need = Counter(keys)
        with self._cond:
            ok = self._cond.wait_for(lambda: all(len(self._idle.get(k, ())) + self.copies - self._total[k] >= n
                                                 for k, n in need.items()), timeout=self.wait_s)
            if not ok:
                raise EdgesmithError(f"playground: every copy of {paths[0]} stayed busy for {self.wait_s:.0f} s")
            taken, to_load = [], []
            for i, k in enumerate(keys):
                idle = self._idle.get(k)
                if idle:
                    taken.append(idle.pop())
                    if not idle:
                        del self._idle[k]
                else:
                    self._total[k] += 1  # reserved: loaded below, outside the lock
                    taken.append(None)
                    to_load.append(i)
        try:
            for i in to_load:
                with self._loading:
                    taken[i] = load(paths[i], **options[i])
        except BaseException:
            with self._cond:
                for i in to_load:
                    if taken[i] is None:
                        self._total[keys[i]] -= 1
                self._cond.notify_all()
            self.give_back([(k, s) for k, s in zip(keys, taken) if s is not None])
            raise
        return list(zip(keys, taken))

    def give_back(self, lent: list) -> None:
        """Return what `borrow` lent ((key, session) pairs); close idle sessions beyond `keep`."""
        closing = []
        with self._cond:
            for key, session in lent:
                self._idle.setdefault(key, []).append(session)
                self._idle.move_to_end(key)
            while sum(self._total.values()) > self.keep and self._idle:
                key, idle = next(iter(self._idle.items()))  # least recently used model first
                closing.append(idle.pop(0))
                self._total[key] -= 1
                if not self._total[key]:
                    del self._total[key]
                if not idle:
                    del self._idle[key]
            self._cond.notify_all()
        for session in closing:
            session.close()
