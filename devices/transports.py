"""Reaching a device: push files, run a command with a timeout while streaming its output, pull
files back. Three transports behind one interface:

- `local`: this machine (a scratch directory, plain copies);
- `ssh://user@host[:port]`: the system OpenSSH client, so `~/.ssh/config` applies and host key
  checking stays on (BatchMode: never a prompt; an unknown host key is an error, not a question).
  Files travel as a tar stream over the same ssh command;
- `adb://SERIAL`: the platform `adb` (`adb -s SERIAL push|shell|pull`).

Commands are argument lists, never shell strings built from user input: a remote command is
quoted word by word with `shlex.quote`. A command past its timeout is killed with its process
group and raises `EdgesmithError`; so does an unreachable device. This module knows nothing about
benchmarks.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from models.checkpoint import sha256_file
from models.errors import EdgesmithError

SHA256_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")
SSH_UNREACHABLE = 255  # ssh's own exit status: connection or authentication failed


@dataclass
class RunResult:
    returncode: int
    output: str


def run_streaming(argv: Sequence[str], timeout: float, on_line: Callable[[str], None] | None = None,
                  what: str = "", env: dict | None = None) -> RunResult:
    """Run `argv`, feed each output line (stdout and stderr merged) to `on_line`, kill the whole
    process group after `timeout` seconds and raise."""
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace", env=env,
                                start_new_session=True, preexec_fn=_dies_with(os.getpid(), _prctl()))
    except FileNotFoundError:
        raise EdgesmithError(f"{argv[0]}: not found on PATH (needed for {what or 'this device'})") from None
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        reader.join(timeout=5)
        raise EdgesmithError(f"{what or argv[0]}: timed out after {timeout:g} s running "
                             f"{shlex.join(argv)[:200]}") from None
    reader.join(timeout=5)
    return RunResult(proc.returncode, "".join(lines))


def _prctl():
    """libc's prctl on Linux (looked up before a fork), else None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _dies_with(parent: int, prctl):
    """preexec_fn: the child (in a session of its own, so a timeout can kill its group) gets SIGKILL
    when this process dies, even by SIGKILL: a killed `edgesmith bench` leaves no agent or ssh behind."""
    def preexec() -> None:
        if prctl is not None and prctl(1, signal.SIGKILL) == 0 and os.getppid() != parent:  # PR_SET_PDEATHSIG
            os._exit(1)
    return preexec


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Transport:
    """push(local, remote_dir) copies a file or directory into `remote_dir`; run(argv, timeout)
    runs a command on the device; pull(remote, local_dir) copies back; mkdtemp/remove manage a
    scratch directory on the device."""

    uri = "local"

    def push(self, local: Path, remote_dir: str, timeout: float = 600) -> str:
        raise NotImplementedError

    def run(self, argv: Sequence[str], timeout: float, on_line=None, cwd: str | None = None) -> RunResult:
        raise NotImplementedError

    def pull(self, remote: str, local_dir: Path, timeout: float = 600) -> Path:
        raise NotImplementedError

    def mkdtemp(self, timeout: float = 60) -> str:
        raise NotImplementedError

    def remove(self, remote: str, timeout: float = 60) -> None:
        self.run(["rm", "-rf", remote], timeout)

    def sha256(self, remote_files: Sequence[str], timeout: float = 120) -> dict[str, str]:
        """{path: sha256 hex} of files on the device, by its `sha256sum` (GNU coreutils, busybox and
        Android's toybox all have it); a file it could not read is missing from the answer."""
        result = self.run(["sha256sum", *remote_files], timeout)
        found = {}
        for line in result.output.splitlines():
            m = SHA256_LINE.match(line.strip())
            if m:
                found[m.group(2)] = m.group(1)
        if not found:
            self.check(result, "sha256sum")  # it ran and printed nothing usable: say what it did print
        return found

    def check(self, result: RunResult, what: str) -> RunResult:
        if result.returncode != 0:
            tail = " | ".join(result.output.strip().splitlines()[-3:]) or "(no output)"
            raise EdgesmithError(f"{self.uri}: {what} failed with exit status {result.returncode}: {tail[:400]}")
        return result


class LocalTransport(Transport):
    uri = "local"

    def push(self, local: Path, remote_dir: str, timeout: float = 600) -> str:
        local, dest = Path(local), Path(remote_dir) / Path(local).name
        if local.is_dir():
            shutil.copytree(local, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(local, dest)
        return str(dest)

    def run(self, argv, timeout, on_line=None, cwd=None) -> RunResult:
        if cwd:
            argv = ["env", "-C", cwd, *argv]
        return run_streaming(argv, timeout, on_line, what="local")

    def pull(self, remote: str, local_dir: Path, timeout: float = 600) -> Path:
        src, dest = Path(remote), Path(local_dir) / Path(remote).name
        (shutil.copytree(src, dest, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, dest))
        return dest

    def mkdtemp(self, timeout: float = 60) -> str:
        return tempfile.mkdtemp(prefix="edgesmith-device-")

    def sha256(self, remote_files: Sequence[str], timeout: float = 120) -> dict[str, str]:
        return {f: sha256_file(Path(f)) for f in remote_files if Path(f).is_file()}


def weakened_host_key_checks(opts: Sequence[str]) -> bool:
    """Whether ssh options turn host key checking off: StrictHostKeyChecking with any value but yes/ask
    (no, off, false, accept-new), or a UserKnownHostsFile of /dev/null, in any spelling ssh accepts
    (`-o K=V`, `-oK=V`, `-o "K V"`, `K = V`; keywords are case-insensitive)."""
    for o in opts:
        o = o[2:] if o.startswith("-o") else o
        m = re.match(r"\s*([A-Za-z]+)\s*(?:=|\s)\s*(.*?)\s*$", o)
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2).strip("\"'").lower()
        if key == "stricthostkeychecking" and value not in ("yes", "ask"):
            return True
        if key == "userknownhostsfile" and value in ("/dev/null", "nul"):
            return True
    return False


class SshTransport(Transport):
    """`ssh://user@host[:port]` through the system `ssh`. `options` are extra ssh arguments
    (e.g. ["-F", "config"] or ["-o", "UserKnownHostsFile=..."]); EDGESMITH_SSH_OPTS adds more
    (shell-style words). StrictHostKeyChecking=no is refused: host keys are always checked."""

    def __init__(self, uri: str, options: Sequence[str] = (), connect_timeout: float = 10):
        parts = urlsplit(uri)
        if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/"):
            raise EdgesmithError(f"device {uri!r}: expected ssh://user@host[:port]")
        try:
            port = parts.port
        except ValueError:
            raise EdgesmithError(f"device {uri!r}: the port is not a number in 1..65535") from None
        self.uri, self.host, self.user, self.port = uri, parts.hostname, parts.username, port
        opts = [*options, *shlex.split(os.environ.get("EDGESMITH_SSH_OPTS", ""))]
        if weakened_host_key_checks(opts):
            raise EdgesmithError(f"{uri}: StrictHostKeyChecking=no is refused (and any other option that turns "
                                 "host key checking off); add the host to known_hosts")
        self.base = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
                     *opts, *(["-p", str(port)] if port else []),
                     f"{self.user}@{self.host}" if self.user else self.host]

    def _remote(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        command = shlex.join(argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return [*self.base, "--", command]

    def _checked(self, result: RunResult) -> RunResult:
        if result.returncode == SSH_UNREACHABLE:
            tail = " | ".join(result.output.strip().splitlines()[-2:]) or "no output"
            raise EdgesmithError(f"{self.uri}: unreachable ({tail[:300]})")
        return result

    def run(self, argv, timeout, on_line=None, cwd=None) -> RunResult:
        return self._checked(run_streaming(self._remote(argv, cwd), timeout, on_line, what=self.uri))

    def mkdtemp(self, timeout: float = 60) -> str:
        r = self.check(self.run(["mktemp", "-d", "/tmp/edgesmith-device-XXXXXX"], timeout), "mktemp")
        return r.output.strip().splitlines()[-1]

    def push(self, local: Path, remote_dir: str, timeout: float = 600) -> str:
        """A tar stream into `tar -x` on the device, through one ssh command."""
        local = Path(local)
        argv = self._remote(["tar", "-x", "-f", "-", "-C", remote_dir])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timer = threading.Timer(timeout, _kill, (proc,))
        timer.start()
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                tar.add(local, arcname=local.name)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the device hung up: its status and output say why
        finally:
            out = proc.stdout.read().decode(errors="replace")
            proc.wait()
            timer.cancel()
        if proc.returncode == -signal.SIGKILL:
            raise EdgesmithError(f"{self.uri}: timed out after {timeout:g} s pushing {local}")
        self.check(self._checked(RunResult(proc.returncode, out)), f"push of {local}")
        return str(PurePosixPath(remote_dir) / local.name)

    def pull(self, remote: str, local_dir: Path, timeout: float = 600) -> Path:
        """`tar -c` on the device, unpacked here with tarfile's data filter (no links out, no devices)."""
        path = PurePosixPath(remote)
        argv = self._remote(["tar", "-c", "-f", "-", "-C", str(path.parent), path.name])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        timer = threading.Timer(timeout, _kill, (proc,))
        timer.start()
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                tar.extractall(local_dir, filter="data")
        except tarfile.TarError:
            pass  # nothing came: the status below says why
        finally:
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
            timer.cancel()
        if proc.returncode == -signal.SIGKILL:
            raise EdgesmithError(f"{self.uri}: timed out after {timeout:g} s pulling {remote}")
        self.check(self._checked(RunResult(proc.returncode, err)), f"pull of {remote}")
        return Path(local_dir) / path.name


class AdbTransport(Transport):
    """`adb://SERIAL` through the platform `adb` on PATH."""

    def __init__(self, uri: str):
        serial = uri[len("adb://"):]
        if not uri.startswith("adb://") or not serial or "/" in serial:
            raise EdgesmithError(f"device {uri!r}: expected adb://SERIAL")
        self.uri, self.serial = uri, serial
        self.base = ["adb", "-s", serial]

    def run(self, argv, timeout, on_line=None, cwd=None) -> RunResult:
        command = shlex.join(argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return run_streaming([*self.base, "shell", command], timeout, on_line, what=self.uri)

    def run_to_file(self, argv: Sequence[str], out: str, timeout: float, cwd: str | None = None) -> RunResult:
        """Run `argv` on the device with its stdout in the device file `out` (pulled afterwards)."""
        command = f"{shlex.join(argv)} > {shlex.quote(out)}"
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return run_streaming([*self.base, "shell", command], timeout, None, what=self.uri)

    def mkdtemp(self, timeout: float = 60) -> str:
        path = "/data/local/tmp/edgesmith"
        self.check(self.run(["mkdir", "-p", path], timeout), "mkdir")
        return path

    def push(self, local: Path, remote_dir: str, timeout: float = 600) -> str:
        self.check(run_streaming([*self.base, "push", str(local), f"{remote_dir}/"], timeout, what=self.uri),
                   f"push of {local}")
        return str(PurePosixPath(remote_dir) / Path(local).name)

    def pull(self, remote: str, local_dir: Path, timeout: float = 600) -> Path:
        self.check(run_streaming([*self.base, "pull", remote, str(local_dir)], timeout, what=self.uri),
                   f"pull of {remote}")
        return Path(local_dir) / PurePosixPath(remote).name


def transport_for(uri: str, ssh_options: Sequence[str] = ()) -> Transport:
    if uri == "local":
        return LocalTransport()
    if uri.startswith("ssh://"):
        return SshTransport(uri, ssh_options)
    if uri.startswith("adb://"):
        return AdbTransport(uri)
    raise EdgesmithError(f"device transport {uri!r}; allowed: local, ssh://user@host[:port], adb://SERIAL")
