"""Finding the daemon: candidate order, untrusted directories, and a loopback-only URL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker._locate import call
from broker._paths import client_socket_candidates, untrusted_dir
from broker._wire import Endpoint, WireError
from broker.exceptions import BrokerUnavailable


def test_candidates_are_the_users_own_daemon_then_the_system_service() -> None:
    """Without COLT_BROKER_SOCKET: $XDG_RUNTIME_DIR's socket, then /run/colt-broker's."""
    found = client_socket_candidates({"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert found == ["/run/user/1000/colt-broker/broker.sock", "/run/colt-broker/broker.sock"]
    assert client_socket_candidates({"COLT_BROKER_SOCKET": "/x.sock"}) == ["/x.sock"]


def test_a_directory_owned_by_another_user_in_a_shared_dir_is_untrusted(tmp_path: Path) -> None:
    """A socket directory someone else made in a world-writable place (a /tmp squat) is not
    trusted; our own, or one created where only root writes, is."""
    shared = tmp_path / "tmp"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    squat = shared / "colt-broker-1000"
    squat.mkdir()
    if os.geteuid() == 0:
        os.chown(squat, 4242, 4242)
        assert "uid 4242" in (untrusted_dir(str(squat)) or "")
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    assert "writable by other users" in (untrusted_dir(str(open_to_all)) or "")
    assert untrusted_dir(str(tmp_path / "missing")) is None
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    assert untrusted_dir(str(mine)) is None


def test_an_untrusted_socket_is_skipped_and_named(tmp_path: Path) -> None:
    """The client does not connect to a socket in an untrusted directory, and says why."""
    runtime = tmp_path / "runtime"
    (runtime / "colt-broker").mkdir(parents=True)
    (runtime / "colt-broker").chmod(0o777)
    env = {"XDG_RUNTIME_DIR": str(runtime), "COLT_BROKER_URL": "http://127.0.0.1:1"}
    with pytest.raises(BrokerUnavailable, match=r"skipped: .* writable by other users"):
        call("GET", "/v1/token", environ=env, timeout=2)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8787", "http://localhost:1", "http://[::1]:9", "http://127.1.2.3"]
)
def test_loopback_urls_are_accepted(url: str) -> None:
    """The TCP fallback may be any loopback address."""
    assert Endpoint.from_url(url).port > 0


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com:8787",
        "http://10.0.0.1:8787",
        "http://127.0.0.1.nip.io",
        "https://127.0.0.1",
    ],
)
def test_other_urls_are_refused(url: str) -> None:
    """The key travels in clear text, so COLT_BROKER_URL may not leave the machine."""
    with pytest.raises(WireError):
        Endpoint.from_url(url)


_IMPOSTOR = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
os.setuid(65534)  # listen() as another user: what SO_PEERCRED will report
sock.listen(1)
print("ready", flush=True)
conn, _ = sock.accept()
conn.recv(65536)
conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nFAKE\\n")
conn.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another user")
def test_a_daemon_run_by_a_stranger_is_not_trusted(tmp_path: Path) -> None:
    """Even in a trusted directory, a socket served by a user who is neither us, root, nor the
    directory's owner is refused after connecting: the directory check alone is a race."""
    runtime = tmp_path / "runtime"
    directory = runtime / "colt-broker"
    directory.mkdir(parents=True, mode=0o755)
    impostor = subprocess.Popen(
        [sys.executable, "-c", _IMPOSTOR, str(directory / "broker.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "ready"
        env = {"XDG_RUNTIME_DIR": str(runtime), "COLT_BROKER_URL": "http://127.0.0.1:1"}
        with pytest.raises(BrokerUnavailable, match="served by uid 65534"):
            call("GET", "/v1/token", environ=env, timeout=5)
    finally:
        impostor.kill()
        impostor.wait(5)
