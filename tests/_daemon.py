"""A real daemon for client tests: in this process on its own event loop thread, or as
``colt-broker serve --demo`` in a subprocess.

The in-process daemon runs in an anyio blocking portal, so a test may call the *blocking*
client (``get_token``) from its own thread, even from inside its own running event loop,
without deadlocking the daemon. It listens only on a Unix socket in a short temporary
directory (``sun_path`` is 108 bytes; pytest's ``tmp_path`` can be longer).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from _procs import reap
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from broker._config import BrokerSettings, Config
from broker._daemon import Daemon, config_for_demo
from broker._persist import TokenStore
from broker._token import Token
from broker.emulator import Emulator, Fault

START_TIMEOUT = 10.0


@dataclass
class InProcessDaemon:
    """A running daemon and the emulator behind it; ``environ`` points clients at it."""

    daemon: Daemon
    emulator: Emulator
    portal: BlockingPortal
    socket_path: Path
    environ: dict[str, str]

    def served(self, profile: str = "default") -> int:
        """Responses the daemon gave for ``profile`` (any status), from its own counters."""
        counts = self.portal.call(lambda: dict(self.daemon.metrics.requests))
        return sum(n for key, n in counts.items() if key[0] == profile)

    def revoke(self, token: str) -> None:
        """Make the emulator's API answer 401 to ``token`` from now on."""
        self.portal.call(self.emulator.revoke, token)

    def reports(self, profile: str = "default") -> int:
        """Rejected tokens reported to the daemon for ``profile``."""
        engine = self.daemon.engine
        assert engine is not None
        statuses = self.portal.call(engine.status)
        return next(s.counters["reports"] for s in statuses if s.profile == profile)


@contextmanager
def in_process_daemon(
    *,
    token_lifetime: float = 1800.0,
    faults: tuple[Fault, ...] = (),
    restored: bool = False,
    **profile_settings: Any,
) -> Iterator[InProcessDaemon]:
    """A demo daemon whose ``default`` profile takes ``profile_settings`` (e.g. min_valid).

    ``restored``: the daemon starts with a token persisted by a "previous run" instead of
    fetching one, so no refresh of its own is still settling when a test reports a token.
    (A report that arrives while the engine persists the token it just fetched is answered
    with that same token: reported to the lead as an engine race.)
    """
    with (
        tempfile.TemporaryDirectory(prefix="cb-") as tmp,
        start_blocking_portal("asyncio", {"use_uvloop": True}) as portal,
        closed_tcp_port() as port,
    ):
        emulator = Emulator.demo(token_lifetime=token_lifetime)
        emulator.inject(*faults)
        broker = BrokerSettings(
            socket_path=Path(tmp) / "run" / "broker.sock",
            state_dir=Path(tmp) / "state",
            http_port=0,
        )
        task, daemon = portal.start_task(
            _run, emulator, broker, profile_settings, restored, name="test daemon"
        )
        try:
            environ = {
                "COLT_BROKER_SOCKET": str(broker.socket_path),
                "COLT_BROKER_URL": f"http://127.0.0.1:{port}",  # refuses: no stray daemon
            }
            yield InProcessDaemon(daemon, emulator, portal, broker.socket_path, environ)
        finally:
            task.cancel()
            concurrent.futures.wait([task], timeout=START_TIMEOUT)


async def _run(
    emulator: Emulator,
    broker: BrokerSettings,
    settings: dict[str, Any],
    restored: bool,
    *,
    task_status: TaskStatus[Daemon],
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.run)
        config = _demo_config(broker, emulator.token_url, settings)
        if restored:
            _seed_token(config, emulator)
        daemon = Daemon(config)
        await tg.start(daemon.run)
        task_status.started(daemon)


def _seed_token(config: Config, emulator: Emulator) -> None:
    """Persist a fresh emulator token, as a previous run of the daemon would have left it."""
    profile = config.profiles["default"]
    lifetime = emulator.verify(token := emulator.issue())["exp"] - time.time()
    now = time.monotonic()
    saved = Token(token, "Bearer", now, now + lifetime, time.time() + lifetime)
    TokenStore(config.broker.state_dir).save(profile, saved)


def _demo_config(broker: BrokerSettings, token_url: str, settings: dict[str, Any]) -> Config:
    demo = config_for_demo(Config(broker=broker), token_url)
    profile = replace(demo.profiles["default"], **settings)
    return replace(demo, profiles={"default": profile})


@contextmanager
def closed_tcp_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- colt-broker serve --demo in a subprocess ----------------------------------------------


@dataclass
class DemoProcess:
    """``colt-broker serve --demo`` as a user starts it, and what its log told us."""

    process: subprocess.Popen[str]
    socket_path: Path
    api_url: str  # the embedded emulator's base URL (its resource API lives there)
    runtime_dir: Path


def _colt_broker() -> str:
    return str(Path(sys.executable).parent / "colt-broker")


@contextmanager
def demo_process() -> Iterator[DemoProcess]:
    """Start the demo daemon, wait (bounded) for ``broker.ready``, stop it with SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="cb-") as tmp:
        env = {
            **os.environ,
            "XDG_RUNTIME_DIR": tmp,
            "XDG_STATE_HOME": tmp,
            "XDG_CONFIG_HOME": tmp,  # no user config file leaks in
            "COLT_BROKER_BROKER__HTTP_PORT": "0",
            "COLT_BROKER_BROKER__LOG_FORMAT": "json",
        }
        process = subprocess.Popen(
            [_colt_broker(), "serve", "--demo"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            events = _log_events(process)
            api_url = _wait_for_ready(events, process)
            yield DemoProcess(
                process, Path(tmp) / "colt-broker" / "broker.sock", api_url, Path(tmp)
            )
        finally:
            reap(process)


def _log_events(process: subprocess.Popen[str]) -> queue.Queue[dict[str, Any]]:
    """The daemon's JSON log lines, read by a thread that also keeps the pipe drained."""
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            try:
                events.put(json.loads(line))
            except ValueError:
                events.put({"event": "unparsed", "line": line.rstrip()})
        events.put({"event": "eof"})

    threading.Thread(target=pump, name="demo stderr", daemon=True).start()
    return events


def _wait_for_ready(events: queue.Queue[dict[str, Any]], process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    token_url: str | None = None
    seen: list[dict[str, Any]] = []
    while True:
        try:
            event = events.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise AssertionError(f"no broker.ready within {START_TIMEOUT} s; log: {seen}") from None
        seen.append(event)
        if event.get("event") == "demo.emulator":
            token_url = str(event["token_url"])
        elif event.get("event") == "broker.ready" and token_url is not None:
            return token_url.split("/authentication/", 1)[0]
        elif event.get("event") == "eof":
            raise AssertionError(f"serve --demo exited ({process.wait()}); log: {seen}")
