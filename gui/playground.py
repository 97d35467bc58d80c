"""The Playground: stream a completion of one prompt from one or two artifacts (or checkpoints).

Sessions come from `runtimes.load` through a bounded pool (gui/sessions.py): each stream borrows
its own session for as long as it runs, so concurrent requests never share a KV cache, and gives it
back when it ends, finished, failed or stopped (the generator's `finally`, which Gradio runs when it
closes a cancelled stream). Stop ends a page's streams between two tokens (`stop(key)`, keyed by the
Gradio session): each ends normally, its text kept and its status "Stopped.". Generation is `Session.generate` with the sampler's
`GenerationConfig` (temperature, top-k, top-p, repetition penalty, seed), decoded with
`runtimes.text.stream_text`. With two models the two streams advance one token each in turn, so both
appear to write side by side, and each shows its own decode rate from its session's statistics.
The page gets at most one update per `update_s` (EDGESMITH_GUI_UPDATE_S, default 0.04 s; tokens that
come faster are sent together): a small model decodes hundreds of tokens a second, more updates than
a browser renders, and a page behind its updates answers no click (Stop included) until it caught up.
A base model has no chat template: the prompt is the text it continues (cut from the left to fit
the KV cache), and each pane shows the prompt followed by the completion, as plain text (code keeps
its indentation). The form's numbers are checked here: a bad one is one line in the status.
Runtime options (threads, accuracy level, KV cache, flash attention; gui/run_options.py) go to
`runtimes.load` for each model whose backend has them, the manifest's verified ones otherwise, and each
stats line says what its session ran with (`Session.run_options`).
Before a model is loaded it passes `edgesmith verify`'s checks (runtimes.verify): a bad or hostile
directory is refused in the status in one line and nothing of it is loaded; `verdict_table` shows the
verdict per file for the models picked, as soon as they are picked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd

import runtimes
from gui.run_options import form_options, per_model
from gui.sessions import SessionPool
from gui.workspace import Workspace
from models.errors import EdgesmithError
from runtimes.options import describe
from runtimes.sampling import GenerationConfig
from runtimes.text import stream_text
from runtimes.verify import require_verified, verify

VERDICT_COLUMNS = ["model", "file", "verdict", "detail"]

MAX_SESSIONS = 4  # sessions kept loaded; idle ones beyond it are closed, least recently used model first
COPIES = 2  # sessions of one model at once: two streams of it (side by side, or gui/app.py PLAY_CONCURRENCY)
UPDATE_S = 0.04  # at most 25 page updates a second (measured: at ~250/s Chromium fell seconds behind)
UPDATE_ENV = "EDGESMITH_GUI_UPDATE_S"


def update_interval() -> float:
    """Seconds between two updates of a stream's page: EDGESMITH_GUI_UPDATE_S (0: every token), default 0.04."""
    text = os.environ.get(UPDATE_ENV, "")
    if not text:
        return UPDATE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10:
        raise EdgesmithError(f"{UPDATE_ENV}: {text!r} must be a number of seconds in [0, 10]")
    return value


def _number(value, what: str, cast=float, low: float | None = None, strict: bool = False, empty=None):
    """A number from a form field (text or number); `empty` when blank; one line naming the field if bad."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if empty is ...:
            raise EdgesmithError(f"{what}: empty; give a number")
        return empty
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise EdgesmithError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise EdgesmithError(f"{what}: {value!r} is not a finite number")
    if cast is int and x != int(x):
        raise EdgesmithError(f"{what}: {value!r} must be a whole number")
    if low is not None and (x <= low if strict else x < low):
        raise EdgesmithError(f"{what}: {value!r} must be {'>' if strict else '>='} {low:g}")
    return cast(x)


def sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed) -> GenerationConfig:
    """The form's sampling fields as a GenerationConfig. Blank top-k / top-p: no filter; blank or
    negative seed: a random one."""
    top_p = _number(top_p, "top-p", low=0, strict=True)
    if top_p is not None and top_p > 1:
        raise EdgesmithError(f"top-p: {top_p:g} must be in (0, 1] (1: no filter)")
    top_k = _number(top_k, "top-k", int, low=0)
    seed = _number(seed, "seed", int)
    return GenerationConfig(max_new_tokens=_number(max_new_tokens, "max new tokens", int, low=1, empty=...),
                            temperature=_number(temperature, "temperature", low=0, empty=...),
                            top_k=top_k or None, top_p=None if top_p in (None, 1.0) else top_p,
                            repetition_penalty=_number(repetition_penalty, "repetition penalty", low=0, strict=True,
                                                       empty=1.0),
                            seed=None if seed is None or seed < 0 else seed)


class Playground:
    def __init__(self, ws: Workspace, keep: int = MAX_SESSIONS, copies: int = COPIES, update_s: float | None = None):
        self.ws = ws
        self.pool = SessionPool(keep=keep, copies=copies)
        self.update_s = update_interval() if update_s is None else update_s
        self._lock = threading.Lock()
        self._running: Counter = Counter()  # stop key -> streams running under it
        self._stopping: set = set()  # stop keys asked to stop

    def stop(self, key) -> str:
        """Ask the streams running under `key` (a page's session) to end after their current token."""
        with self._lock:
            if not self._running[key]:
                return "Nothing to stop."
            self._stopping.add(key)
        return "Stopping…"

    def _stopped(self, key) -> bool:
        with self._lock:
            return key in self._stopping

    def _load(self, real: Path, **options):
        require_verified(real)  # the verdict first: nothing of a directory that fails it is loaded
        s = runtimes.load(real, **options)
        if s.tokenizer is None:
            s.close()
            raise EdgesmithError(f"{real}: no tokenizer.json with the <|bos|>/<|endoftext|> tokens")
        return s

    def generate(self, prompt: str, model_a: str, model_b: str, max_new_tokens, temperature, top_k=None, top_p=None,
                 repetition_penalty=1.0, seed=0, stop_key=None, runtime=()):
        """Yield (text A, text B, stats A, stats B, status) as tokens of either model arrive; `stop(stop_key)`
        ends it after the current token. `runtime`: the option controls' values (threads, accuracy level,
        KV cache, flash attention; gui/run_options.py form_options)."""
        sides = [model_a] + ([model_b] if model_b and model_b != "none" else [])
        texts, stats = ["", ""], ["", ""]
        lent, streams = [], []
        with self._lock:
            self._running[stop_key] += 1
            self._stopping.discard(stop_key)  # a Stop pressed before this Send is not for it
        try:
            try:
                if not (prompt or "").strip():
                    raise EdgesmithError("prompt: empty")
                cfg = sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
                options = form_options(*runtime)
                paths = [self.ws.resolve(path, f"model {'AB'[i]}", must_exist=True) for i, path in enumerate(sides)]
                lent = self.pool.borrow(paths, self._load, per_model(paths, options))
                streams = [_start(session, prompt, cfg) for _, session in lent]
            except (EdgesmithError, OSError) as e:  # bad input or a bad file: one line naming it
                yield "", "", "", "", f"**Refused:** {e}"
                return
            texts = [prompt if i < len(streams) else "" for i in range(2)]
            active, shown = list(range(len(streams))), 0.0
            while active:
                if self._stopped(stop_key):
                    yield texts[0], texts[1], stats[0], stats[1], "Stopped."
                    return
                for i in list(active):
                    session, pieces = streams[i]
                    piece = next(pieces, None)
                    if piece is None:
                        active.remove(i)
                    else:
                        texts[i] += piece
                    stats[i] = _stats_line(session)
                if not active or time.monotonic() - shown >= self.update_s:
                    shown = time.monotonic()
                    yield texts[0], texts[1], stats[0], stats[1], "Generating…" if active else "Done."
        finally:  # finished, stopped, failed, or closed by Gradio (a cancelled stream): the sessions go back
            for _, pieces in streams:
                pieces.close()
            self.pool.give_back(lent)
            with self._lock:
                self._running[stop_key] -= 1
                if not self._running[stop_key]:
                    del self._running[stop_key]
                    self._stopping.discard(stop_key)


def _start(session, prompt: str, cfg: GenerationConfig):
    tok = session.tokenizer
    budget = session.max_seq_len - 1
    n_new = min(cfg.max_new_tokens, max(1, budget // 2))
    ids = tok.encode(prompt)[-(budget - n_new):]
    cfg = dataclasses.replace(cfg, max_new_tokens=n_new, stop_tokens=(tok.eos_id,))
    stream = session.generate([tok.bos_id, *ids], cfg)
    return session, stream_text(tok, (t for t in stream if t != tok.eos_id))


def _stats_line(session) -> str:
    s = session.stats
    return (f"`{session.backend}` · `{describe(session.run_options)}` · {s.new_tokens} tokens · "
            f"**{s.decode_tokens_per_s:,.1f} tok/s** decode · time to first token {s.ttft_s * 1e3:.1f} ms")


def verdict_table(ws: Workspace, *models: str) -> pd.DataFrame:
    """`edgesmith verify`'s verdict per file of each model picked (a path outside the workspace: one row saying so)."""
    rows = []
    for i, model in enumerate(m for m in models if m and m != "none"):
        label = f"{'AB'[i]}: {model}"
        try:
            v = verify(ws.resolve(model, f"model {'AB'[i]}", must_exist=True))
        except EdgesmithError as e:
            rows.append([label, "", "FAILED", str(e)])
            continue
        prefix = f"{v.path}/"
        rows += [[label, c.file, "ok" if c.ok else "FAILED", c.detail.replace(prefix, "")] for c in v.checks]
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def verdict_line(table: pd.DataFrame) -> str:
    """One line per model picked: verified, or the files that failed (the table has the details)."""
    parts = []
    for model, rows in table.groupby("model", sort=True):
        failed = rows[rows["verdict"] == "FAILED"]["file"].tolist()
        parts.append(f"**{model}** — verified ({len(rows)} checks)" if not failed else
                     f"**{model}** — **FAILED**: {', '.join(f or 'path' for f in failed)} (refused: see the table)")
    return "  \n".join(parts)
