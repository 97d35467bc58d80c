"""Transports against a real OpenSSH server on loopback (started by the sshd fixture) and locally:
push, run with streaming output, pull; unreachable hosts and hung commands hit the timeout."""

import time

import pytest

from devices.transports import LocalTransport, SshTransport, transport_for
from models.errors import EdgesmithError
from tests.devices.conftest import free_port


def test_ssh_push_run_pull(sshd, tmp_path):
    # setup
    t = SshTransport(sshd.uri, sshd.options)
    src = tmp_path / "payload"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("hello device\n")
    lines = []
    # execute
    workdir = t.mkdtemp()
    remote = t.push(src, workdir)
    result = t.run(["sh", "-c", 'cat "$1"; echo "$2" > "$3"', "sh", f"{remote}/sub/a.txt", "it's quoted; $HOME",
                    f"{remote}/out.txt"], timeout=30, on_line=lines.append)
    back = t.pull(f"{remote}/out.txt", tmp_path)
    t.remove(workdir)
    # assert
    assert result.returncode == 0 and lines == ["hello device"]
    assert back.read_text() == "it's quoted; $HOME\n"  # one argument, never re-split by the remote shell
    assert t.run(["test", "-e", workdir], timeout=30).returncode == 1


def test_ssh_hung_command_times_out(sshd):
    t = SshTransport(sshd.uri, sshd.options)
    t0 = time.monotonic()
    with pytest.raises(EdgesmithError, match=r"timed out after 1.5 s"):
        t.run(["sleep", "60"], timeout=1.5)
    assert time.monotonic() - t0 < 10


def test_ssh_dead_host_is_a_clear_error(sshd):
    t = SshTransport(f"ssh://nobody@127.0.0.1:{free_port()}", sshd.options)
    with pytest.raises(EdgesmithError, match=r"unreachable \(.*Connection refused"):
        t.run(["true"], timeout=20)


def test_ssh_unroutable_host_hits_the_timeout(sshd):
    t = SshTransport("ssh://nobody@192.0.2.1:22", sshd.options, connect_timeout=30)  # TEST-NET-1: never answers
    t0 = time.monotonic()
    with pytest.raises(EdgesmithError, match=r"timed out after 1 s|unreachable"):
        t.run(["true"], timeout=1)
    assert time.monotonic() - t0 < 10


def test_ssh_checks_host_keys(sshd, tmp_path):
    # setup: a known_hosts without this server's key
    (tmp_path / "empty_known_hosts").write_text("")
    options = [o if not o.startswith("UserKnownHostsFile") else f"UserKnownHostsFile={tmp_path / 'empty_known_hosts'}"
               for o in sshd.options]
    # execute / assert
    with pytest.raises(EdgesmithError, match="unreachable.*Host key verification failed"):
        SshTransport(sshd.uri, options).run(["true"], timeout=20)
    with pytest.raises(EdgesmithError, match="StrictHostKeyChecking=no is refused"):
        SshTransport(sshd.uri, [*sshd.options, "-o", "StrictHostKeyChecking=no"])


def test_local_transport_round_trip(tmp_path):
    t = LocalTransport()
    (tmp_path / "f.txt").write_text("x")
    wd = t.mkdtemp()
    remote = t.push(tmp_path / "f.txt", wd)
    assert t.run(["cat", remote], timeout=10).output == "x"
    with pytest.raises(EdgesmithError, match="timed out"):
        t.run(["sleep", "30"], timeout=0.5)
    t.remove(wd)


@pytest.mark.parametrize("uri, match", [
    ("ftp://host", "allowed: local, ssh://user@host\\[:port\\], adb://SERIAL"),
    ("ssh://host:notaport", "port is not a number"),
    ("adb://", "expected adb://SERIAL"),
])
def test_bad_uris(uri, match):
    with pytest.raises(EdgesmithError, match=match):
        transport_for(uri)
