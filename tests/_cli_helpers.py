"""Helpers for end-to-end tests of the command line and the real daemon.

Short temporary directories (a Unix socket path holds at most 107 bytes, and pytest's
``tmp_path`` can be longer), loopback ports, an environment cleared of the caller's broker
settings, the ``colt-broker`` console script, and long-running subprocesses whose output is
read by a thread so that every wait for a line has a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

COLT_BROKER = Path(sys.executable).parent / "colt-broker"
START_TIMEOUT = 10.0  # seconds for a subprocess to say it is ready
RUN_TIMEOUT = 20.0  # seconds for one CLI command to finish
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# Kept from the caller's environment: what a process needs to run, nothing of the broker's.
_KEPT = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")

Completed = subprocess.CompletedProcess[str]


def free_tcp_port() -> int:
    """A loopback port that was free a moment ago (bound, read back, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def closed_tcp_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment with HOME and the XDG directories under ``root`` and no ``COLT_BROKER_*``,
    systemd or credential variables of the caller, plus ``extra``."""
    env = {name: os.environ[name] for name in _KEPT if name in os.environ}
    dirs = {
        "HOME": root / "home",
        "XDG_RUNTIME_DIR": root / "run",
        "XDG_STATE_HOME": root / "state",
        "XDG_CONFIG_HOME": root / "config",
    }
    for name, path in dirs.items():
        path.mkdir(mode=0o700, exist_ok=True)
        env[name] = str(path)
    return {**env, **extra}


def run_cli(*args: str, env: dict[str, str], timeout: float = RUN_TIMEOUT) -> Completed:
    """Run ``colt-broker ARGS`` to completion (killed after ``timeout`` seconds)."""
    return subprocess.run(  # noqa: PLW1510  # the exit code is what the tests assert
        [str(COLT_BROKER), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_secret(path: Path, secret: str, mode: int = 0o600) -> Path:
    """A secret file holding ``secret`` and a newline, with ``mode``."""
    path.write_text(secret + "\n")
    path.chmod(mode)
    return path


class Background:
    """A long-running subprocess; a thread per pipe queues its lines, so reads are bounded."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []  # every line taken so far, for failure messages
        for pipe, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=_pump, args=(pipe, lines), daemon=True).start()

    def wait_line(
        self,
        match: Callable[[str], bool],
        *,
        stream: str = "stderr",
        timeout: float = START_TIMEOUT,
    ) -> str:
        """The first line of ``stream`` that ``match``es; AssertionError past ``timeout``."""
        lines = self.stderr if stream == "stderr" else self.stdout
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(self._why(f"no matching line within {timeout} s")) from None
            if line is None:
                raise AssertionError(self._why(f"{stream} closed, exit {self.process.wait(5)}"))
            self.seen.append(line)
            if match(line):
                return line

    def _why(self, what: str) -> str:
        shown = "".join(self.seen[-20:])
        return f"{' '.join(self.argv)}: {what}; output so far:\n{shown}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the process, wait (bounded; then kill), and return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=START_TIMEOUT)
        return self.process.returncode

    def drain(self, stream: str = "stderr") -> str:
        """What is left of ``stream`` once the process has ended (bounded)."""
        lines = self.stderr if stream == "stderr" else self.stdout
        out: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.001))) is not None:
            out.append(line)
        return "".join(out)


def _pump(pipe: IO[str] | None, lines: queue.Queue[str | None]) -> None:
    assert pipe is not None
    with pipe:
        for line in pipe:
            lines.put(line)
    lines.put(None)


def log_event(name: str) -> Callable[[str], bool]:
    """A line matcher: a JSON log line whose ``event`` is ``name``."""

    def match(line: str) -> bool:
        try:
            doc: Any = json.loads(line)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("event") == name

    return match


@contextmanager
def serve_demo(env: dict[str, str]) -> Iterator[Background]:
    """``colt-broker serve --demo`` with JSON logs, ready (``broker.ready`` seen); stopped
    and reaped at the end whatever happens."""
    process = Background([str(COLT_BROKER), "serve", "--demo"], env)
    try:
        process.wait_line(log_event("broker.ready"))
        yield process
    finally:
        process.stop()


@contextmanager
def standalone_emulator(env: dict[str, str], *args: str) -> Iterator[str]:
    """``python -m broker.emulator`` on a free loopback port; yields its token URL."""
    process = Background([sys.executable, "-m", "broker.emulator", *args], env)
    try:
        line = process.wait_line(lambda s: s.startswith("http://"), stream="stdout")
        yield line.strip()
    finally:
        process.stop()
