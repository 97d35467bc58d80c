"""The Playground: stream a completion from one or two artifacts (or checkpoints) on the same prompt.

Sessions come from `runtimes.load` and are kept (a few, most recent first) so that a second message
does not reload the model; generation is `Session.generate` with the sampler's `GenerationConfig`,
decoded with the CLI's `stream_text`. With two models the two streams advance one token each in
turn, so both appear to write side by side, and each shows its own decode rate from its session's
statistics (time in the runtime and sampler only). A base model has no chat template: the
conversation so far is the text it continues, cut from the left to fit the KV cache.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict

from gui.workspace import Workspace
from models.errors import EdgesmithError

MAX_SESSIONS = 4


class Playground:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self._sessions: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, path: str):
        import runtimes

        real = str(self.ws.resolve(path, "model", must_exist=True))
        with self._lock:
            if real in self._sessions:
                self._sessions.move_to_end(real)
                return self._sessions[real]
            s = runtimes.load(real)
            if s.tokenizer is None:
                raise EdgesmithError(f"{path}: no tokenizer.json with the <|bos|>/<|endoftext|> tokens")
            self._sessions[real] = s
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)[1].close()
            return s

    def generate(self, message: str, model_a: str, model_b: str, max_new_tokens, temperature, seed,
                 history_a: list | None = None, history_b: list | None = None):
        """Yield (chat A, chat B, stats A, stats B) after every token of either model."""
        from runtimes.sampling import GenerationConfig

        history_a, history_b = _plain(history_a), _plain(history_b)
        sides = [(model_a, history_a)] + ([(model_b, history_b)] if model_b and model_b != "none" else [])
        stats = ["", ""]
        try:
            if not (message or "").strip():
                raise EdgesmithError("prompt: empty")
            cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                   seed=None if seed in (None, "") or float(seed) < 0 else int(float(seed)))
            streams = [self._start(path, history, message, cfg) for path, history in sides]
        except EdgesmithError as e:
            yield history_a, history_b, f"**Refused:** {e}", ""
            return
        active = list(range(len(streams)))
        while active:
            for i in list(active):
                session, pieces, history = streams[i]
                piece = next(pieces, None)
                if piece is None:
                    active.remove(i)
                else:
                    history[-1]["content"] += piece
                stats[i] = _stats_line(session)
                # copies: Gradio streams the difference to the previous output, which must not change under it
                yield copy.deepcopy(history_a), copy.deepcopy(history_b), stats[0], stats[1]

    def _start(self, path: str, history: list, message: str, cfg):
        from toolchain.cli import stream_text

        session = self.session(path)
        tok = session.tokenizer
        context = "".join(m["content"] for m in history) + message
        budget = session.max_seq_len - 1
        n_new = min(cfg.max_new_tokens, max(1, budget // 2))
        ids = tok.encode(context)[-(budget - n_new):]
        cfg = dataclasses.replace(cfg, max_new_tokens=n_new, stop_tokens=(tok.eos_id,))
        stream = session.generate([tok.bos_id, *ids], cfg)
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        return session, stream_text(tok, (t for t in stream if t != tok.eos_id)), history


def _text(content) -> str:
    """A message's text: Gradio 6 hands messages back with content as a list of {"type", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def _plain(history) -> list[dict]:
    return [{"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in history or []
            if isinstance(m, dict)]


def _stats_line(session) -> str:
    s = session.stats
    return (f"`{session.backend}` · {s.new_tokens} tokens · **{s.decode_tokens_per_s:,.1f} tok/s** decode · "
            f"time to first token {s.ttft_s * 1e3:.1f} ms")
