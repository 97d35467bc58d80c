"""The Playground: stream a completion from one or two artifacts (or checkpoints) on the same prompt.

Sessions come from `runtimes.load` through a bounded pool (gui/sessions.py): each stream borrows
its own session for as long as it runs, so concurrent requests never share a KV cache, and gives it
back when it ends, finished or cancelled (the generator's `finally`, which Gradio runs when it
closes a cancelled stream). Generation is `Session.generate` with the sampler's
`GenerationConfig`, decoded with the CLI's `stream_text`. With two models the two streams advance
one token each in turn, so both appear to write side by side, and each shows its own decode rate
from its session's statistics (time in the runtime and sampler only). A base model has no chat
template: the conversation so far is the text it continues, cut from the left to fit the KV cache.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from gui.sessions import SessionPool
from gui.workspace import Workspace
from models.errors import EdgesmithError

MAX_SESSIONS = 4  # sessions kept loaded; idle ones beyond it are closed, least recently used model first
COPIES = 2  # sessions of one model at once: two streams of it (side by side, or gui/app.py PLAY_CONCURRENCY)


class Playground:
    def __init__(self, ws: Workspace, keep: int = MAX_SESSIONS, copies: int = COPIES):
        self.ws = ws
        self.pool = SessionPool(keep=keep, copies=copies)

    def _load(self, real: Path):
        import runtimes

        s = runtimes.load(real)
        if s.tokenizer is None:
            s.close()
            raise EdgesmithError(f"{real}: no tokenizer.json with the <|bos|>/<|endoftext|> tokens")
        return s

    def generate(self, message: str, model_a: str, model_b: str, max_new_tokens, temperature, seed,
                 history_a: list | None = None, history_b: list | None = None):
        """Yield (chat A, chat B, stats A, stats B) after every token of either model."""
        from runtimes.sampling import GenerationConfig

        history_a, history_b = _plain(history_a), _plain(history_b)
        sides = [(model_a, history_a)] + ([(model_b, history_b)] if model_b and model_b != "none" else [])
        stats = ["", ""]
        lent, streams = [], []
        try:
            try:
                if not (message or "").strip():
                    raise EdgesmithError("prompt: empty")
                cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                       seed=None if seed in (None, "") or float(seed) < 0 else int(float(seed)))
                paths = [self.ws.resolve(path, "model", must_exist=True) for path, _ in sides]
                lent = self.pool.borrow(paths, self._load)
                streams = [_start(session, history, message, cfg) for (_, session), (_, history) in zip(lent, sides)]
            except (EdgesmithError, OSError) as e:  # bad input or a bad file: one line naming it
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
        finally:  # finished, failed, or closed by Gradio (a cancelled stream): the sessions go back
            for _, pieces, _ in streams:
                pieces.close()
            self.pool.give_back(lent)


def _start(session, history: list, message: str, cfg):
    from runtimes.text import stream_text

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
