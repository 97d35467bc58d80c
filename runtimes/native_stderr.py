"""Hold back what a native library prints to the process's stderr while it loads a file.

ExecuTorch's C++ loader writes its own diagnostic (`[program.cpp:...] ...`) before raising: to file
descriptor 2, or through Python's `sys.stderr` when its pybindings route the log there.
`captured()` points both at temporary buffers for the length of the block; the text goes back to
stderr when the block succeeds (less ExecuTorch's own start-up log lines) and is handed to the caller when it fails, so the error can carry
its last line in our one line. With EDGESMITH_DEBUG=1 nothing is held back.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading

_lock = threading.Lock()
# ExecuTorch's own log lines (`[cpuinfo_utils.cpp:87] Reading file ...`): diagnostics of the runtime's
# start-up, not the user's business once the load succeeded (shown with EDGESMITH_DEBUG=1).
NATIVE_LOG = re.compile(r"^\[[A-Za-z0-9_]+\.(cpp|cc|c|h):[0-9]+\] ")  # descriptor 2 is one per process: one capture at a time


class Captured:
    text = ""

    def line(self, limit: int = 200) -> str:
        """The last line captured (the most specific diagnostic), at most `limit` characters."""
        lines = [line for line in self.text.splitlines() if line.strip()]
        text = " ".join(lines[-1].split()) if lines else ""
        return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def captured():
    out = Captured()
    if os.environ.get("EDGESMITH_DEBUG", "").lower() in ("1", "true", "yes", "on"):
        yield out
        return
    with _lock, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved, python_stderr = os.dup(2), sys.stderr
        os.dup2(tmp.fileno(), 2)
        sys.stderr = io.StringIO()
        failed = True
        try:
            yield out
            failed = False
        finally:
            python_text = sys.stderr.getvalue()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read().decode("utf-8", "replace") + python_text
            kept = "".join(line for line in out.text.splitlines(keepends=True) if not NATIVE_LOG.match(line))
            if not failed and kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
