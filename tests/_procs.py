"""Subprocess helpers for end-to-end tests of the daemon: start a process with its own
environment, follow its JSON log on stderr, listen on a NOTIFY_SOCKET as PID 1 would, and
stop it with SIGTERM and a bounded wait (killing it in teardown whatever happened).

Nothing here sleeps to wait for readiness: every wait reads a pipe or a socket with a
deadline and fails with what it saw so far.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

WAIT = 10.0  # seconds: a generous bound on a loaded 2-core machine; never slept
COLT_BROKER = str(Path(sys.executable).parent / "colt-broker")

# What a parent shell, systemd or another test may have set that would change the daemon.
_FOREIGN_PREFIXES = ("COLT_BROKER_", "LISTEN_", "WATCHDOG_", "XDG_")
_FOREIGN = {"NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM", "RUNTIME_DIRECTORY"}
_FOREIGN |= {"STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"}

Event = dict[str, Any]


def clean_environ(**extra: str) -> dict[str, str]:
    """``os.environ`` without anything that would steer the daemon, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _FOREIGN and not k.startswith(_FOREIGN_PREFIXES)
    }
    return env | extra


def free_port() -> int:
    """A loopback port free a moment ago (systemd-socket-activate refuses port 0; the race
    with another process taking it in between is accepted)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LogLines:
    """A process's stderr, one JSON object a line, read by a thread that keeps the pipe
    drained. Lines that are not JSON (systemd-socket-activate's own) are kept as
    ``{"event": "unparsed", "line": ...}``; the end of the stream is ``{"event": "eof"}``."""

    def __init__(self, stream: Any) -> None:
        self.seen: list[Event] = []
        self._queue: queue.Queue[Event] = queue.Queue()
        self._cursor = 0
        thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.rstrip()}
            self._queue.put(event if isinstance(event, dict) else {"event": "unparsed"})
        self._queue.put({"event": "eof"})

    def _next(self, deadline: float) -> Event | None:
        if self._cursor == len(self.seen):
            try:
                self.seen.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0)))
            except queue.Empty:
                return None
        self._cursor += 1
        return self.seen[self._cursor - 1]

    def wait_for(self, name: str, timeout: float = WAIT) -> Event:
        """The next line (after those already waited past) whose event is ``name``."""
        deadline = time.monotonic() + timeout
        while (event := self._next(deadline)) is not None:
            if event.get("event") == name:
                return event
            if event.get("event") == "eof":
                pytest.fail(f"the process ended before logging {name!r}; log:\n{self.dump()}")
        pytest.fail(f"no {name!r} log line within {timeout} s; log:\n{self.dump()}")

    def events(self, name: str) -> list[Event]:
        """Every line read so far whose event is ``name``."""
        self._drain()
        return [e for e in self.seen if e.get("event") == name]

    def _drain(self) -> None:
        while True:
            try:
                self.seen.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def dump(self) -> str:
        """What the process said so far, one line each, for failure messages."""
        self._drain()
        return "\n".join(json.dumps(e) for e in self.seen[-40:])


class Proc:
    """A started process and its log."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.log = LogLines(popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum``, failing clearly if the process already ended."""
        if self.popen.poll() is not None:
            pytest.fail(f"the process exited ({self.popen.returncode}); log:\n{self.log.dump()}")
        self.popen.send_signal(signum)

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM (unless it already exited), then its exit code within ``timeout``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.exit_code(timeout)

    def exit_code(self, timeout: float = WAIT) -> int:
        """Its exit code within ``timeout`` seconds, sending nothing (or the test fails)."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"still running after {timeout} s; log:\n{self.log.dump()}")


@contextmanager
def running(argv: Sequence[str], env: Mapping[str, str]) -> Iterator[Proc]:
    """Start ``argv`` with exactly ``env``; in teardown SIGTERM it, and kill it if it lingers."""
    popen = subprocess.Popen(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield Proc(popen)
    finally:
        reap(popen)


def reap(popen: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within WAIT seconds."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=WAIT)


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A fresh directory with a short path under /tmp (Unix socket paths are limited to 107
    bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))  # short on purpose
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- a NOTIFY_SOCKET of our own ---------------------------------------------------------

Datagram = dict[str, str]
_PINGS = ({"WATCHDOG"}, {"STATUS"})  # periodic datagrams, not state changes
_SLICE = 0.05  # seconds


def parse_datagram(data: bytes) -> Datagram:
    """``KEY=VALUE`` lines (sd_notify's format) as a dict."""
    pairs = (line.partition("=") for line in data.decode().split("\n") if line)
    return {key: value for key, _, value in pairs}


class NotifyListener:
    """What systemd would receive on ``$NOTIFY_SOCKET``: every datagram, in order, with
    the periodic WATCHDOG=1 and STATUS= pings told apart from state changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[Datagram] = []
        self.sender: Proc | None = None  # when set, a wait ends as soon as it exits

    def close(self) -> None:
        """Close and remove the socket, so that the path can be bound again."""
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def recv(self, deadline: float, waiting_for: str) -> Datagram:
        """The next datagram, or fail naming what was awaited and everything seen."""
        while (data := self._recv_slice(deadline)) is None:
            exited = self.sender is not None and self.sender.popen.poll() is not None
            if exited or time.monotonic() >= deadline:
                self._fail(waiting_for)
        datagram = parse_datagram(data)
        self.seen.append(datagram)
        return datagram

    def _recv_slice(self, deadline: float) -> bytes | None:
        # Short slices only to notice that the sender died; a datagram ends the wait at once.
        self.sock.settimeout(min(max(deadline - time.monotonic(), 0.001), _SLICE))
        try:
            return self.sock.recv(4096)
        except TimeoutError:
            return None

    def _fail(self, waiting_for: str) -> NoReturn:
        message = f"no {waiting_for} on NOTIFY_SOCKET in time; received: {self.seen}"
        if self.sender is not None:
            code = self.sender.popen.returncode
            exited = "" if code is None else f"the sender exited ({code}); "
            message += f"\n{exited}its log:\n{self.sender.log.dump()}"
        pytest.fail(message)

    def next_state(self, timeout: float = WAIT) -> Datagram:
        """The next datagram that is not a WATCHDOG=1 or STATUS= ping."""
        deadline = time.monotonic() + timeout
        while True:
            datagram = self.recv(deadline, "state change")
            if set(datagram) not in _PINGS:
                return datagram

    def watchdog_pings(self, count: int, timeout: float = WAIT) -> None:
        """Wait for ``count`` WATCHDOG=1 pings; fail on a state change in between."""
        deadline, pinged = time.monotonic() + timeout, 0
        while pinged < count:
            datagram = self.recv(deadline, f"WATCHDOG=1 ({pinged}/{count} so far)")
            if set(datagram) not in _PINGS:
                pytest.fail(f"unexpected {datagram} while waiting for watchdog pings")
            pinged += datagram.get("WATCHDOG") == "1"
