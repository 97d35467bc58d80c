"""Security guarantees, checked over the project's own Python sources and its real entry points.

The AST scanners read code, not text: a pattern in a comment or a string does not count, and each
scanner is shown to flag a snippet with the bad pattern (so the test can fail).
"""

import ast
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices.transports import SshTransport
from gui.server import parse_auth
from models.errors import EdgesmithError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "toolchain", "runtimes", "kernels", "devices", "gui", "scripts")
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str) -> list[str]:
    """`pickle.load(s)` anywhere (also `from pickle import load`), `torch.load` without weights_only=True."""
    tree, found = ast.parse(source), []
    from_pickle = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                   in ("pickle", "cPickle", "_pickle", "dill") for a in n.names if a.name in ("load", "loads")}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill") and name.endswith((".load", ".loads")) \
                or name in from_pickle or name.endswith("Unpickler"):
            found.append(f"{node.lineno}: {name}")
        elif name == "torch.load" and not _kw_true(node, "weights_only"):
            found.append(f"{node.lineno}: {name} without weights_only=True")
    return found


def shell_calls(source: str) -> list[str]:
    """subprocess calls with shell=True (any truthy or non-constant value), and os.system / os.popen."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            found.append(f"{node.lineno}: {name}")
        elif name.split(".")[-1] in SUBPROCESS_CALLS | {"create_subprocess_shell"}:
            for k in node.keywords:
                if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and not k.value.value):
                    found.append(f"{node.lineno}: {name}(shell=...)")
            if name.endswith("create_subprocess_shell"):
                found.append(f"{node.lineno}: {name}")
    return found


@pytest.mark.parametrize("scanner", [unsafe_loads, shell_calls])
def test_sources_are_clean(scanner):
    # setup
    files = sources()
    assert len(files) > 50, "the scan must see the project's sources"
    # execute
    bad = [f"{p.relative_to(ROOT)}:{hit}" for p in files for hit in scanner(p.read_text())]
    # assert
    assert bad == []


def test_scanners_flag_the_bad_patterns():
    # setup / execute / assert: each bad pattern is flagged; comments, strings and the safe forms are not
    assert unsafe_loads("import pickle\npickle.load(f)\n")
    assert unsafe_loads("import pickle\nx = pickle.loads(b)\n")
    assert unsafe_loads("from pickle import loads as l\nl(b)\n")
    assert unsafe_loads("import torch\ntorch.load('m.pt')\n")
    assert unsafe_loads("import torch\ntorch.load('m.pt', weights_only=False)\n")
    assert not unsafe_loads("import torch\ntorch.load('m.pt', weights_only=True)\n")
    assert not unsafe_loads("# pickle.load(f)\ns = 'torch.load(x)'\n")
    assert shell_calls("import subprocess\nsubprocess.run(cmd, shell=True)\n")
    assert shell_calls("import subprocess as sp\nsp.Popen(cmd, shell=flag)\n")
    assert shell_calls("import subprocess\nsubprocess.check_output('ls', shell=True)\n")
    assert shell_calls("import os\nos.system('ls')\n")
    assert shell_calls("import os\nos.popen('ls')\n")
    assert not shell_calls("import subprocess\nsubprocess.run(['ls'], shell=False)\n")
    assert not shell_calls("# os.system('ls')\nx = 'subprocess.run(c, shell=True)'\n")


# ssh host key checking: the full round trip against a real sshd (a server whose key is not in
# known_hosts is refused) is tests/devices/test_transports.py::test_ssh_checks_host_keys. Here: every
# spelling of turning the check off that reaches the transport is refused before ssh runs.
@pytest.mark.parametrize("options", [
    ["-o", "StrictHostKeyChecking=no"],
    ["-oStrictHostKeyChecking=no"],
    ["-o", "stricthostkeychecking = NO"],
    ["-o", "StrictHostKeyChecking no"],
    ["-oStrictHostKeyChecking=off"],
    ["-o", "StrictHostKeyChecking=false"],
    ["-o", "StrictHostKeyChecking=accept-new"],
    ["-o", "UserKnownHostsFile=/dev/null"],
])
def test_ssh_refuses_disabling_host_key_checks(options, monkeypatch):
    monkeypatch.delenv("EDGESMITH_SSH_OPTS", raising=False)
    with pytest.raises(EdgesmithError, match="StrictHostKeyChecking=no is refused"):
        SshTransport("ssh://user@device.example", options)


def test_ssh_refuses_disabling_host_key_checks_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGESMITH_SSH_OPTS", "-o StrictHostKeyChecking=no")
    with pytest.raises(EdgesmithError, match="StrictHostKeyChecking=no is refused"):
        SshTransport("ssh://user@device.example")


def test_ssh_keeps_batch_mode_and_checks_by_default(monkeypatch):
    monkeypatch.delenv("EDGESMITH_SSH_OPTS", raising=False)
    base = SshTransport("ssh://user@device.example:2222").base
    assert "BatchMode=yes" in base and not any("stricthostkeychecking" in o.lower() for o in base)


# ----------------------------------------------------------------------------- --auth secrets

SECRET = "Pw-7f3a9c-never-logged"


def test_auth_errors_never_repeat_the_password():
    for bad in (f":{SECRET}", f"{SECRET}", f"user:"):
        with pytest.raises(EdgesmithError) as e:
            parse_auth(bad)
        assert SECRET not in str(e.value)
    assert parse_auth(f"admin:{SECRET}") == ("admin", SECRET)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gui_auth_secret_reaches_no_output_or_file(tmp_path):
    # setup: the real `edgesmith gui --auth admin:SECRET`
    ws, port = tmp_path / "ws", _free_port()
    argv = [sys.executable, "-m", "edgesmith", "gui", "--workspace", str(ws), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "EDGESMITH_GUI_AUTH"}
    argv += ["--auth", f"admin:{SECRET}"]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # execute: start it, wait until it serves, try a wrong and the right login, stop it
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=o, stderr=e)
        try:
            import urllib.error
            import urllib.parse
            import urllib.request

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.3)
            assert proc.poll() is None, "the gui exited early"
            for password in ("wrong", SECRET):
                body = urllib.parse.urlencode({"username": "admin", "password": password}).encode()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/login", data=body, timeout=10)
                except urllib.error.HTTPError:
                    pass
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    # assert: the server ran with a login, and the password is in no output and no workspace file
    assert "login required (user admin)" in out.read_text()
    for path in [out, err, *(p for p in ws.rglob("*") if p.is_file())]:
        assert SECRET.encode() not in path.read_bytes(), f"{path} holds the --auth password"
