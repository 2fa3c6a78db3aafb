"""sd_notify and socket activation: real datagram sockets, and the real
``systemd-socket-activate`` passing real listeners to a child Python process."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from broker._systemd import Notifier, listen_fds, notify, under_systemd

REPO = Path(__file__).resolve().parent.parent
WAIT = 10.0  # seconds: generous bound for a loaded 2-core machine; never slept


class Receiver:
    """A NOTIFY_SOCKET of our own: what PID 1 would receive."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.environ = {"NOTIFY_SOCKET": notify_socket}

    def recv(self) -> bytes:
        self.sock.settimeout(WAIT)
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no datagram on {self.environ['NOTIFY_SOCKET']} within {WAIT}s")

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(4096)


def _bound_dgram(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    """A datagram socket bound to a path in tmp_path, or in the abstract namespace."""
    if request.param == "path":
        path = tmp_path / "notify.sock"
        sock, name = _bound_dgram(str(path)), str(path)
    else:
        name = f"@colt-test-{secrets.token_hex(8)}"
        sock = _bound_dgram(b"\0" + name[1:].encode())
    with sock:
        yield Receiver(sock, name)


# --- notify -------------------------------------------------------------------------


def test_notify_sends_the_state_as_one_datagram(receiver: Receiver) -> None:
    """notify() delivers its state verbatim, to a path or an abstract NOTIFY_SOCKET."""
    assert notify("READY=1\nSTATUS=2 profiles", environ=receiver.environ) is True
    assert receiver.recv() == b"READY=1\nSTATUS=2 profiles"


def test_notify_without_notify_socket_is_a_silent_no_op() -> None:
    """Outside systemd notify() sends nothing and returns False."""
    assert notify("READY=1", environ={}) is False


@pytest.mark.parametrize("value", ["relative/notify.sock", "vsock:2:1234"])
def test_notify_ignores_addresses_it_cannot_use(value: str) -> None:
    """A NOTIFY_SOCKET that is neither a path nor abstract is ignored, not an error."""
    assert notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_notify_swallows_send_errors(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False, not raise."""
    environ = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert notify("READY=1", environ=environ) is False
    Notifier(environ).watchdog()  # and the daemon's notifier does not raise either


def test_notify_reads_os_environ_by_default(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an environ argument notify() uses the process environment."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.environ["NOTIFY_SOCKET"])
    assert notify("WATCHDOG=1") is True
    assert receiver.recv() == b"WATCHDOG=1"


# --- Notifier -----------------------------------------------------------------------


def test_notifier_sends_exact_datagrams(receiver: Receiver) -> None:
    """ready, reloading, status, watchdog and stopping each send their exact assignments."""
    notifier = Notifier(receiver.environ, monotonic_usec=lambda: 123456789)
    assert notifier.enabled
    notifier.ready("1 of 1 profiles hold a token")
    notifier.reloading()
    notifier.status("reloading configuration")
    notifier.watchdog()
    notifier.stopping()
    assert [receiver.recv() for _ in range(5)] == [
        b"READY=1\nSTATUS=1 of 1 profiles hold a token",
        b"RELOADING=1\nMONOTONIC_USEC=123456789",
        b"STATUS=reloading configuration",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_reloading_stamps_clock_monotonic(receiver: Receiver) -> None:
    """By default MONOTONIC_USEC= is CLOCK_MONOTONIC in microseconds, read at the call."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(receiver.environ).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = receiver.recv().decode().split("\n")
    assert reloading == "RELOADING=1"
    assert before <= int(stamp.removeprefix("MONOTONIC_USEC=")) <= after


def test_status_text_cannot_inject_assignments(receiver: Receiver) -> None:
    """Newlines in a status become spaces, so the text cannot add e.g. STOPPING=1."""
    Notifier(receiver.environ).ready("ok\nSTOPPING=1\r\nMAINPID=1")
    assert receiver.recv() == b"READY=1\nSTATUS=ok STOPPING=1 MAINPID=1"


def test_notifier_reads_the_environment_once(receiver: Receiver) -> None:
    """Changing the mapping after construction does not redirect the notifier."""
    environ = dict(receiver.environ)
    notifier = Notifier(environ)
    environ.clear()
    notifier.stopping()
    assert receiver.recv() == b"STOPPING=1"


def test_notifier_outside_systemd_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET the notifier is disabled and every method does nothing."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.reloading()
    notifier.status("x")
    notifier.watchdog()
    notifier.stopping()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["usec", "our-pid", "short", "other-pid", "bad-pid", "zero", "negative", "bad", "unset"],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    """Half of WATCHDOG_USEC, in seconds, unless WATCHDOG_PID names another process."""
    assert Notifier(environ).watchdog_interval == interval


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"INVOCATION_ID": "0123456789abcdef0123456789abcdef"}, True),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, True),
        ({"INVOCATION_ID": ""}, False),
        ({"HOME": "/root"}, False),
    ],
)
def test_under_systemd(environ: dict[str, str], expected: bool) -> None:
    """A service manager is recognised by INVOCATION_ID or NOTIFY_SOCKET."""
    assert under_systemd(environ) is expected


# --- listen_fds in this process (never with our own pid: fds 3+ here are pytest's) --


def test_listen_fds_ignores_another_processes_sockets() -> None:
    """LISTEN_PID naming another process yields no sockets (and touches no fd)."""
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert listen_fds(environ=environ) == []


@pytest.mark.parametrize(
    "environ",
    [{}, {"LISTEN_FDS": "2"}, {"LISTEN_PID": "x", "LISTEN_FDS": "2"}],
    ids=["unset", "no-pid", "bad-pid"],
)
def test_listen_fds_without_activation_is_empty(environ: dict[str, str]) -> None:
    """No LISTEN_PID for this process: no sockets."""
    assert listen_fds(environ=environ) == []


def test_listen_fds_with_zero_or_bad_count_is_empty() -> None:
    """LISTEN_FDS of 0 or garbage for this very process yields no sockets (and no fd)."""
    for count in ("0", "-1", "many"):
        environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": count}
        assert listen_fds(environ=environ) == []


def _set_listen_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # never ours: no fd is touched
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "unix:tcp")


def test_listen_fds_unsets_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES leave os.environ, so children
    cannot mistake them for their own."""
    _set_listen_env(monkeypatch)
    listen_fds()
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & os.environ.keys()


def test_listen_fds_keeps_the_variables_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """unset=False, or an explicit environ, leaves os.environ alone."""
    _set_listen_env(monkeypatch)
    listen_fds(unset=False)
    listen_fds(environ={"LISTEN_PID": "1"})
    assert os.environ["LISTEN_FDNAMES"] == "unix:tcp"


# --- listen_fds under the real systemd-socket-activate ------------------------------

CHILD = """
import json, os, socket
from broker._systemd import listen_fds

found = listen_fds()
print(json.dumps({
    "sockets": [
        {
            "name": s.name, "family": s.family, "type": s.type, "path": s.path,
            "address": None if s.family == socket.AF_UNIX else list(s.sock.getsockname()[:2]),
            "fd": s.sock.fileno(), "inheritable": os.get_inheritable(s.sock.fileno()),
        }
        for s in found
    ],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}), flush=True)
"""

needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed",
)


def _free_port(host: str, family: socket.AddressFamily) -> int:
    """A port free a moment ago (systemd-socket-activate refuses port 0; the race with
    another process taking it in between is accepted)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _wait_for(proc: subprocess.Popen[bytes], stream: IO[bytes], marker: bytes) -> None:
    """Read ``stream`` (unbuffered) until ``marker`` appears; fail after WAIT seconds."""
    seen, deadline = b"", time.monotonic() + WAIT
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while marker not in seen and time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(stream.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
    if marker not in seen:
        proc.kill()
        pytest.fail(f"no {marker!r} within {WAIT}s; saw {seen!r}")


def _activate(listen: list[str], trigger: str, *, fdnames: str | None = None) -> dict[str, Any]:
    """Run CHILD under systemd-socket-activate with ``listen`` addresses, connect to the
    Unix socket ``trigger`` to make it exec the child, and return the child's report."""
    command = ["systemd-socket-activate", *(f"--listen={a}" for a in listen)]
    command += [f"--fdname={fdnames}"] if fdnames else []
    command += [f"--setenv=PYTHONPATH={REPO}", sys.executable, "-c", CHILD]
    env = {**os.environ, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "info"}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        _wait_for(proc, proc.stderr, f"Listening on {listen[-1]} ".encode())
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(trigger)  # the first connection makes it exec the child
            try:
                out, err = proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail(f"the activated child did not finish within {WAIT}s")
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out))


@needs_activate
def test_listen_fds_under_socket_activation(tmp_path: Path) -> None:
    """The child gets a path Unix socket, an abstract one and a TCP one, in order, with
    their names, families and addresses, close-on-exec, and no LISTEN_* left behind."""
    path = str(tmp_path / "broker.sock")
    abstract = f"@colt-test-{secrets.token_hex(8)}"
    port = _free_port("127.0.0.1", socket.AF_INET)
    report = _activate([path, abstract, f"127.0.0.1:{port}"], path, fdnames="unix:spare:tcp")
    unix, inet, stream = int(socket.AF_UNIX), int(socket.AF_INET), int(socket.SOCK_STREAM)
    sockets = report["sockets"]
    assert [(s["fd"], s["name"], s["family"], s["type"]) for s in sockets] == [
        (3, "unix", unix, stream),
        (4, "spare", unix, stream),
        (5, "tcp", inet, stream),
    ]
    assert [(s["path"], s["address"]) for s in sockets] == [
        (path, None),
        (abstract, None),
        (None, ["127.0.0.1", port]),
    ]
    assert [s["inheritable"] for s in sockets] == [False, False, False]
    assert report["env"] == []


@needs_activate
def test_listen_fds_unnamed_ipv6_socket(tmp_path: Path) -> None:
    """Without LISTEN_FDNAMES the names are "unknown"; an AF_INET6 listener is reported
    as such, with no path."""
    try:
        port = _free_port("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    path = str(tmp_path / "b.sock")
    report = _activate([path, f"[::1]:{port}"], path)
    assert [(s["name"], s["family"], s["path"]) for s in report["sockets"]] == [
        ("unknown", int(socket.AF_UNIX), path),
        ("unknown", int(socket.AF_INET6), None),
    ]
    assert report["sockets"][1]["address"] == ["::1", port]
