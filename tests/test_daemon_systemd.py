"""The real ``colt-broker serve`` under systemd's protocols, end to end: socket activation
by the real ``systemd-socket-activate``, sd_notify to a NOTIFY_SOCKET of our own (READY=1,
WATCHDOG=1, RELOADING=1, STOPPING=1), SIGHUP reloads, and restarts that make no upstream
request. The daemon runs as a subprocess; the Colt emulator behind it runs in this process,
so the test can count every token request it answers."""

from __future__ import annotations

import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _procs import (
    COLT_BROKER,
    WAIT,
    Datagram,
    NotifyListener,
    Proc,
    clean_environ,
    free_port,
    running,
)
from anyio.from_thread import BlockingPortal, start_blocking_portal

from broker.emulator import Emulator

# Profile name -> (client id, secret): made up, known to the emulator.
CLIENTS = {"default": ("client-one", "made-up-secret-one"), "second": ("client-two", "made-up-2")}
WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s
STATUS_RE = re.compile(r"(\d+)/(\d+) profiles hold a valid token")


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def root() -> Iterator[Path]:
    """A short scratch directory: a Unix socket path must fit in 108 bytes of sun_path."""
    with tempfile.TemporaryDirectory(prefix="cb-") as tmp:
        yield Path(tmp)


@dataclass
class Upstream:
    """The Colt emulator, running on a portal thread of this process."""

    emulator: Emulator
    portal: BlockingPortal
    token_url: str

    def count(self, profile: str = "default") -> int:
        """Token requests answered for ``profile``'s client id."""
        client_id = CLIENTS[profile][0]
        return self.portal.call(lambda: self.emulator.count(client_id=client_id))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A Colt-compatible token endpoint on loopback that knows both made-up clients."""
    emulator = Emulator(dict(CLIENTS.values()))
    with start_blocking_portal("asyncio") as portal:
        task, _ = portal.start_task(emulator.run, name="emulator")
        try:
            yield Upstream(emulator, portal, emulator.token_url)
        finally:
            task.cancel()


# --- the daemon as a subprocess ----------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where one daemon's files live under the scratch directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "broker.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def environ(self, **extra: str) -> dict[str, str]:
        """A clean environment whose XDG directories are all in the scratch directory."""
        xdg = {f"XDG_{name}": str(self.root / "xdg" / name.lower()) for name in _XDG}
        return clean_environ(**xdg, **extra)


_XDG = ("RUNTIME_DIR", "STATE_HOME", "CONFIG_HOME")


def write_config(
    layout: Layout, token_url: str, *, profiles: tuple[str, ...] = ("default",), defaults: str = ""
) -> None:
    """A real configuration file: JSON logs, no TCP listener, 0600 secret files."""
    lines = [
        "[broker]",
        f'socket_path = "{layout.socket}"',
        "http_port = 0",
        f'state_dir = "{layout.state_dir}"',
        'log_format = "json"',
        "[defaults]",
        defaults,
    ]
    for name in profiles:
        lines += _profile_lines(layout, name, token_url)
    layout.config.write_text("\n".join(lines) + "\n")


def _profile_lines(layout: Layout, name: str, token_url: str) -> list[str]:
    client_id, secret = CLIENTS[name]
    secret_file = layout.root / f"{name}.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    return [
        f"[profiles.{name}]",
        f'client_id = "{client_id}"',
        f'client_secret_file = "{secret_file}"',
        f'token_url = "{token_url}"',
    ]


@contextmanager
def serving(layout: Layout, **env: str) -> Iterator[Proc]:
    """``colt-broker serve --config`` with ``env`` added; killed in teardown."""
    argv = [COLT_BROKER, "serve", "--config", str(layout.config)]
    with running(argv, layout.environ(**env)) as proc:
        yield proc


@contextmanager
def notified(layout: Layout) -> Iterator[tuple[Proc, NotifyListener]]:
    """The daemon with a NOTIFY_SOCKET of ours and a watchdog of WATCHDOG_USEC."""
    with ExitStack() as stack:
        listener = NotifyListener(layout.root / "notify.sock")
        stack.callback(listener.close)
        env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        proc = listener.sender = stack.enter_context(serving(layout, **env))
        yield proc, listener


def get_token(sock: Path, profile: str = "default") -> str:
    """GET /v1/token/PROFILE over the Unix socket; the access token, or a clear failure."""
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, timeout=WAIT) as client:
        reply = client.get(f"http://localhost/v1/token/{profile}")
    assert reply.status_code == 200, f"GET /v1/token/{profile}: {reply.status_code} {reply.text}"
    return str(reply.json()["access_token"])


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def held(datagram: Datagram) -> tuple[int, int]:
    """(profiles holding a token, profiles) from a STATUS= line."""
    match = STATUS_RE.fullmatch(datagram.get("STATUS", ""))
    assert match, f"STATUS= does not say how many profiles hold a token: {datagram}"
    return int(match[1]), int(match[2])


def restarted(proc: Proc) -> list[str]:
    """The profiles the engine (re)started in the reload just done, from its log."""
    return list(proc.log.wait_for("engine.updated")["started"])


def reload(proc: Proc, notify: NotifyListener) -> Datagram:
    """SIGHUP; assert RELOADING=1 (stamped with CLOCK_MONOTONIC) then READY=1; the latter."""
    before = monotonic_usec()
    proc.signal(signal.SIGHUP)
    reloading = notify.next_state()
    assert reloading.get("RELOADING") == "1", f"after SIGHUP: {reloading}, not RELOADING=1"
    assert before <= int(reloading.get("MONOTONIC_USEC", "0")) <= monotonic_usec(), reloading
    ready = notify.next_state()
    assert ready.get("READY") == "1", f"after RELOADING=1: {ready}, not READY=1"
    return ready


# --- 1. socket activation ----------------------------------------------------------------

needs_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None or shutil.which("curl") is None,
    reason="systemd-socket-activate or curl is not installed",
)


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    command = ["curl", "--silent", "--show-error", "--max-time", str(WAIT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=WAIT + 5, check=False)


_PASS_THROUGH = ("PATH", "HOME", "PYTHONPATH")  # PYTHONPATH: run the code under test


def _activate_argv(layout: Layout, port: int) -> list[str]:
    """systemd-socket-activate passes only --setenv variables to the daemon."""
    env = layout.environ(COLT_BROKER_BROKER__LOG_FORMAT="json")
    keep = [k for k in env if k.startswith(("XDG_", "COLT_BROKER_")) or k in _PASS_THROUGH]
    return [
        "systemd-socket-activate",
        f"--listen={layout.socket}",
        f"--listen=127.0.0.1:{port}",
        "--fdname=unix:http",
        *(f"--setenv={k}={env[k]}" for k in keep),
        COLT_BROKER,
        "serve",
        "--demo",
    ]


def _wait_listening(proc: Proc, count: int) -> None:
    """systemd-socket-activate says "Listening on ..." once per socket before any exec."""
    for _ in range(count):
        line = proc.log.wait_for("unparsed")
        assert str(line.get("line", "")).startswith("Listening on "), proc.log.dump()


def _sockets_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode))


@needs_activate
def test_socket_activation_serves_through_both_inherited_listeners(root: Path) -> None:
    """Under systemd-socket-activate the first client wakes the daemon, which serves one
    token through the inherited Unix socket and (with the key written beside it) through
    the inherited TCP socket, says inherited=true, and opens no socket of its own."""
    layout, port = Layout(root), free_port()
    layout.socket.parent.mkdir()
    (root / "xdg").mkdir()
    env = clean_environ(SYSTEMD_LOG_TARGET="console", SYSTEMD_LOG_LEVEL="info")
    with running(_activate_argv(layout, port), env) as proc:
        _wait_listening(proc, 2)
        via_unix = _curl(
            "--unix-socket", str(layout.socket), "http://localhost/v1/token?format=raw"
        )
        assert via_unix.returncode == 0, f"{via_unix.stderr}\nlog:\n{proc.log.dump()}"
        ready = proc.log.wait_for("broker.ready")
        url = f"http://127.0.0.1:{port}/v1/token?format=raw"
        via_tcp = _curl("--fail", "-H", f"@{layout.socket.parent / 'curl-headers'}", url)
        keyless = _curl("--output", "/dev/null", "--write-out", "%{http_code}", url)
        assert proc.stop() == 0, proc.log.dump()
    assert ready["inherited"] is True, ready
    assert ready["listeners"] == [f"unix:{layout.socket}", f"tcp:127.0.0.1:{port}"], ready
    assert via_tcp.returncode == 0, via_tcp.stderr
    assert via_unix.stdout.strip() == via_tcp.stdout.strip() != ""
    assert keyless.stdout == "401", "the inherited TCP listener must demand the key"
    assert _sockets_under(root) == [layout.socket], "the daemon bound a socket of its own"
    assert not (root / "xdg" / "runtime_dir").exists(), "it made its own socket directory"


# --- 2. sd_notify, the watchdog and SIGHUP reloads ----------------------------------------


def test_ready_watchdog_and_stopping(root: Path, upstream: Upstream) -> None:
    """READY=1 with a STATUS= after start, WATCHDOG=1 again and again at the pace
    WATCHDOG_USEC asks for (four within seconds), and on SIGTERM STOPPING=1 and exit 0."""
    layout = Layout(root)
    write_config(layout, upstream.token_url)
    with notified(layout) as (proc, notify):
        ready = notify.next_state()
        assert ready.get("READY") == "1", f"the first state change is {ready}, not READY=1"
        held(ready)
        notify.watchdog_pings(4, timeout=WAIT)
        assert get_token(layout.socket)
        proc.signal(signal.SIGTERM)
        assert notify.next_state() == {"STOPPING": "1"}
        assert proc.exit_code() == 0, proc.log.dump()
    assert proc.log.events("engine.stuck") == []


def test_sighup_reloads_keep_the_token_reject_bad_config_and_add_profiles(
    root: Path, upstream: Upstream
) -> None:
    """Each SIGHUP sends RELOADING=1 then READY=1: an unchanged config keeps the token (one
    upstream request), a bad one is logged naming the key and the old stays in force, and
    a new profile starts serving; the watchdog keeps pinging throughout."""
    layout = Layout(root)
    write_config(layout, upstream.token_url)
    with notified(layout) as (proc, notify):
        assert notify.next_state().get("READY") == "1"
        token = get_token(layout.socket)
        assert held(reload(proc, notify)) == (1, 1)
        assert (get_token(layout.socket), upstream.count()) == (token, 1)
        assert restarted(proc) == [], "an unchanged profile must keep its task and token"

        write_config(layout, upstream.token_url, defaults="refresh_ahead = 2.0")
        reload(proc, notify)
        failed = proc.log.wait_for("config.reload_failed")
        assert "refresh_ahead" in failed["error"], failed
        assert get_token(layout.socket) == token

        write_config(layout, upstream.token_url, profiles=("default", "second"))
        reload(proc, notify)
        assert restarted(proc) == ["second"]
        second = get_token(layout.socket, "second")
        assert second != token
        assert get_token(layout.socket) == token
        assert (upstream.count(), upstream.count("second")) == (1, 1)
        notify.watchdog_pings(2)
        assert proc.stop() == 0, proc.log.dump()
    assert proc.log.events("engine.stuck") == []


def test_sighup_right_after_ready_reloads(root: Path, upstream: Upstream) -> None:
    """A reload asked for the moment READY=1 arrives (what `systemctl reload` does right
    after start) is a reload, not the death of the daemon by SIGHUP's default action."""
    layout = Layout(root)
    write_config(layout, upstream.token_url)
    for _ in range(3):  # the window is short: try a few starts
        with notified(layout) as (proc, notify):
            assert notify.next_state().get("READY") == "1"
            proc.popen.send_signal(signal.SIGHUP)
            try:
                state = notify.next_state(timeout=WAIT)
            finally:
                code = proc.stop()
            assert state.get("RELOADING") == "1" and code == 0, (
                f"SIGHUP just after READY=1: got {state}, exit code {code} "
                "(-1: killed by SIGHUP, no handler installed yet)"
            )


# --- 3. restart safety across processes ------------------------------------------------


def test_restart_serves_the_persisted_token_without_upstream_request(
    root: Path, upstream: Upstream
) -> None:
    """A daemon stopped and started again serves the same token from its 0600 state file;
    the token endpoint is asked once in all."""
    layout = Layout(root)
    write_config(layout, upstream.token_url)
    tokens = []
    for _ in range(2):
        with serving(layout) as proc:
            proc.log.wait_for("broker.ready")
            tokens.append(get_token(layout.socket))
            assert proc.stop() == 0, proc.log.dump()
    assert tokens[0] == tokens[1]
    assert upstream.count() == 1
    saved = layout.state_dir / "default.token.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
