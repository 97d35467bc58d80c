"""Fixtures for the devices tests: the tiny trained artifacts of tests/runtimes (exported once per
session), and a real OpenSSH server on loopback that the test session starts itself.

The sshd runs as the current user on a free high port with a generated host key, one authorized
client key, `-D -e` and its own config; the client gets a generated known_hosts, so host key
checking stays on. Running as root, OpenSSH needs its privilege-separation directory /run/sshd
(compiled in): it is created when missing. Skipped only when no sshd binary exists.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    found = shutil.which("sshd")
    return found or next((c for c in SSHD_CANDIDATES if os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, root: Path, port: int, user: str):
        self.root, self.port, self.user = root, port, user
        self.uri = f"ssh://{user}@127.0.0.1:{port}"
        self.options = ["-F", "/dev/null", "-i", str(root / "client_key"), "-o",
                        f"UserKnownHostsFile={root / 'known_hosts'}", "-o", "IdentitiesOnly=yes"]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    binary = find_sshd()
    if binary is None:
        pytest.skip("no sshd binary (install openssh-server; .ci/run does)")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([binary, "-f", str(root / "sshd_config"), "-D", "-e"], stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(root / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    import getpass

    yield Sshd(root, port, getpass.getuser())
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
