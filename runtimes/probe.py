"""Run an ExecuTorch program once in a child process before this process loads it.

ExecuTorch's runtime kills the whole process (SIGABRT, SIGSEGV) on some programs that pass its own full
flatbuffer verification: a kernel argument of the wrong type (evalue.h aborts), an operator index out of
range (logged at load, executed anyway), an XNNPACK blob identifier pybind11 cannot decode
(tests/reliability/test_fuzz_regressions.py). Short of running the program, nothing tells them from a good
one. So a program this machine has not seen run is loaded and run once, a 2-token prefill and a 1-token
decode, in a child forked from a server that has imported torch and ExecuTorch's bindings and nothing else
(`python -m runtimes.probe`: the imports are paid once per process, each probe costs a fork). A crash
there is a one-line refusal here, with the signal and ExecuTorch's last line.

A program that ran is remembered by its sha256 under `$EDGESMITH_CACHE/executorch-probed/`, and so is one
edgesmith's exporter has just written (it loads it in its own process next, for the parity check); those
load at once. The sha256 is the manifest's, already checked against the file.

What this does not do: prove a program safe for every input (the probe runs its instructions once, with
1- and 2-token inputs), or probe other formats (ONNX Runtime and llama.cpp fail their loads with errors;
runtimes/headers.py bounds their headers, runtimes/backends/llamacpp.py check_gguf what llama.cpp asserts on).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from models.errors import EdgesmithError

PROBE_TIMEOUT_S = 120.0
ERROR_MARK = "edgesmith-probe-error: "
_server_lock = threading.Lock()


def probed_dir() -> Path:
    return Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith")) / "executorch-probed"


def is_probed(sha256: str) -> bool:
    return len(sha256) == 64 and (probed_dir() / sha256).is_file()


def remember(sha256: str, source: str) -> None:
    """Record that the program with this sha256 loads and runs here (`source`: "probe" or "export")."""
    d = probed_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump({"source": source, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
    os.replace(tmp, d / sha256)


class _Server:
    """`python -m runtimes.probe` in its own session: it imports torch and ExecuTorch's bindings once, then for
    each request line forks a child that probes one program, and answers with the child's wait status. Not
    multiprocessing: its spawn and forkserver methods run the caller's main script again in the child."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True, text=True, bufsize=1)

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The server's answer, or None when it gave none within `timeout` (the server and its child are killed)."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            died = self.proc.poll()
            self.close()
            return None if died is None else {"server_exit": died}
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


_server: _Server | None = None


def _ask(request: dict, timeout: float) -> dict | None:
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        answer = _server.ask(request, timeout)
        if answer is None or "server_exit" in answer:
            _server = None
        return answer


LIBRARIES = {"llama": ("executorch.extension.llm.custom_ops", "custom_ops_aot_lib",
                        "`llama::update_cache` / `llama::custom_sdpa`"),
             "quantized": ("executorch.kernels.quantized", "quantized_ops_aot_lib",
                           "`quantized_decomposed::embedding_4bit` / `embedding_byte`")}


def load_custom_ops(names) -> None:
    """Register the ExecuTorch kernels of the op libraries a program names (manifest `options.custom_ops`; "llama":
    ExecuTorch's LLM ops, "quantized": its quantized kernels) in this process, before the program loads. Loading
    a library twice is harmless."""
    import importlib.util

    import torch

    for name in names:
        if name not in LIBRARIES:
            raise EdgesmithError(f"custom_ops: unknown library {name!r}; known: {', '.join(LIBRARIES)}")
        package, stem, ops = LIBRARIES[name]
        spec = importlib.util.find_spec(package)
        libs = sorted(Path(next(iter(spec.submodule_search_locations))).glob(f"*{stem}.*")) if spec else []
        if not libs:
            raise EdgesmithError(f"this ExecuTorch install has no {name} ops library ({package.replace('.', '/')}/"
                                 f"lib{stem}), which the program calls ({ops})")
        torch.ops.load_library(str(libs[0]))


def positions(start: int, n: int, convention: str):
    """The `input_pos` tensor of a call of `n` tokens from `start`: "start" -> `(1,)` (ExecuTorch's Llama runner
    convention), "positions" -> `(n,)` (every position)."""
    import torch

    if convention == "start":
        return torch.tensor([start], dtype=torch.long)
    return torch.arange(start, start + n, dtype=torch.long)


def _child(program: str, method: str, log: str, custom_ops=(), input_pos: str = "positions") -> int:
    """In the forked child: ExecuTorch's output to `log`, load with full verification, prefill 2, decode 1;
    a Python exception's line is appended to the log with the marker, exit 2."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        import torch
        from executorch.extension.pybindings import _C

        load_custom_ops(custom_ops)
        loaded = _C._load_program(program, program_verification=_C.Verification.InternalConsistency)
        if method not in {loaded.get_method_name(i) for i in range(loaded.num_methods())}:
            raise KeyError(f"the program has no method {method!r}")
        m = loaded.load_method(method)
        m.call((torch.zeros(1, 2, dtype=torch.long), positions(0, 2, input_pos)))
        m.call((torch.zeros(1, 1, dtype=torch.long), positions(2, 1, input_pos)))
        return 0
    except Exception as e:  # a load or run error ExecuTorch reports (RuntimeError, ValueError, KeyError, ...)
        os.write(fd, f"\n{ERROR_MARK}{type(e).__name__}: {' '.join(str(e).split())[:200]}\n".encode())
        return 2


def serve() -> None:
    """The server's loop: one JSON request per line in, one JSON answer per line out."""
    import torch  # noqa: F401  (paid once, inherited by every child)
    from executorch.extension.pybindings import _C  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                code = _child(req["program"], req["method"], req["log"], req.get("custom_ops", ()),
                              req.get("input_pos", "positions"))
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _last_line(text: str) -> str:
    """ExecuTorch's last line in the child's log, less its start-up lines (cpuinfo's thread count query)."""
    lines = [line for line in text.splitlines()
             if line.strip() and not line.startswith(("[cpuinfo_utils.cpp", ERROR_MARK))]
    return " ".join(lines[-1].split())[:200] if lines else ""


def probe(program: Path, sha256: str, method: str = "forward", timeout: float = PROBE_TIMEOUT_S,
          custom_ops=(), input_pos: str = "positions") -> None:
    """Return when `program` (sha256 `sha256`) is known to load and run here; refuse it in one line when the
    probe crashes, hangs, or reports an error. `custom_ops` and `input_pos` as the manifest's options say."""
    if is_probed(sha256):
        return
    with tempfile.NamedTemporaryFile(prefix="edgesmith-probe-", suffix=".log") as log:
        answer = _ask({"program": str(program), "method": str(method), "log": log.name,
                       "custom_ops": list(custom_ops), "input_pos": input_pos}, timeout)
        text = Path(log.name).read_text("utf-8", "replace")
    error = next((line[len(ERROR_MARK):] for line in text.splitlines() if line.startswith(ERROR_MARK)), None)
    native = _last_line(text)
    if answer is None:
        raise EdgesmithError(f"{program}: ExecuTorch did not load and run the program within {timeout:.0f} s "
                             "(refused)")
    if "server_exit" in answer:
        raise EdgesmithError(f"{program}: the ExecuTorch probe (python -m runtimes.probe) exited with code "
                             f"{answer['server_exit']} before it answered; is executorch installed?")
    if "signal" in answer:
        name = signal.Signals(answer["signal"]).name
        raise EdgesmithError(f"{program}: ExecuTorch crashed ({name}) loading or running the program, refused"
                             + (f": {native}" if native else ""))
    if answer["exit"] != 0:
        raise EdgesmithError(f"{program}: ExecuTorch could not load or run the program "
                             f"({error or 'exit code ' + str(answer['exit'])})" + (f": {native}" if native else ""))
    remember(sha256, "probe")


if __name__ == "__main__":
    serve()
