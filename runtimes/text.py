"""Text around a Session: the tokenizer it must have, and a token stream decoded as it arrives.

Shared by `edgesmith generate`, `eval` and the GUI's Playground. Sampling and the KV cache are the
Session's; this module only turns ids into text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from models.errors import EdgesmithError


def session_tokenizer(session, path):
    """The session's tokenizer, or one line saying the artifact at `path` has none we can encode with."""
    if session.tokenizer is None:
        raise EdgesmithError(f"{path}: no tokenizer.json with the <|bos|>/<|endoftext|> tokens (needed to encode text)")
    return session.tokenizer


def stream_text(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Decode a stream of token ids into text pieces, holding back a split UTF-8 character."""
    out, printed = [], ""
    for i in ids:
        out.append(i)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text
    text = tokenizer.decode(out)
    if len(text) > len(printed):
        yield text[len(printed):]
