"""The contenders (the broker, nginx, uvicorn) and the emulator, started and stopped.

Each server runs pinned to the server core. The broker is started the way systemd would:
with a ``$NOTIFY_SOCKET`` of ours, so READY=1 tells when its listeners are up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from anyio.from_thread import BlockingPortal, start_blocking_portal

from _gen import Target
from _sys import SERVER_CPU, pinned, stop, wait_for
from broker.emulator import Emulator, Fault

BENCH = Path(__file__).resolve().parent
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret-made-up"  # noqa: S105  # made up: the emulator's only client
SECRET_ENV = "COLT_BENCH_CLIENT_SECRET"  # noqa: S105  # the name of a variable, not a secret
START_TIMEOUT = 30.0


# --- a tiny HTTP client (one request per connection) ---------------------------------------


def http_get(
    where: str | int, target: str = "/v1/token", headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """GET over a Unix socket (a path) or loopback TCP (a port): (status, body)."""
    family = socket.AF_UNIX if isinstance(where, str) else socket.AF_INET
    address = where if isinstance(where, str) else ("127.0.0.1", where)
    lines = [f"GET {target} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(address)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return _read_response(sock)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response framed by Content-Length (or by the end of the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed before a whole response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    while chunk and (match is None or len(body) < int(match.group(1))):
        chunk = sock.recv(65536)
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def answers(where: str | int, headers: Mapping[str, str] | None = None) -> bool:
    """Whether a server answers 200 there yet."""
    try:
        return http_get(where, headers=headers)[0] == 200
    except (OSError, IndexError, ValueError):
        return False


# --- the emulator, in a thread of this process (so its counts can be read) -----------------


@dataclass
class Upstream:
    """A running emulator: its URL, and what it counted."""

    emulator: Emulator
    portal: BlockingPortal

    @property
    def token_url(self) -> str:
        return self.emulator.token_url

    def count(self) -> int:
        """Successful token requests answered so far."""
        return self.portal.call(lambda: self.emulator.count(status=200))

    def delay_next(self, seconds: float) -> None:
        """The next token request waits ``seconds`` before it is answered."""
        self.portal.call(self.emulator.inject, Fault(delay=seconds))


@contextlib.contextmanager
def upstream(lifetime: float = 1800.0) -> Iterator[Upstream]:
    """An emulator issuing tokens of ``lifetime`` seconds to the bench's made-up client."""
    emulator = Emulator({CLIENT_ID: CLIENT_SECRET}, token_lifetime=lifetime)
    with start_blocking_portal("asyncio", backend_options={"use_uvloop": True}) as portal:
        future, _ = portal.start_task(emulator.run)
        try:
            yield Upstream(emulator, portal)
        finally:
            future.cancel()


# --- the broker -----------------------------------------------------------------------------


def _toml(tables: Mapping[str, Mapping[str, object]]) -> str:
    """Flat TOML tables; JSON's string and number syntax is TOML's too."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


class Broker:
    """``colt-broker serve`` with a configuration of ours, against an emulator."""

    def __init__(
        self,
        workdir: Path,
        token_url: str,
        port: int,
        defaults: Mapping[str, object] | None = None,
    ) -> None:
        self.dir = workdir
        self.unix_path = str(workdir / "run" / "broker.sock")
        self.port = port
        self.config = workdir / "broker.toml"
        self.log = workdir / "broker.log"
        self.state_dir = workdir / "state"
        broker = {
            "socket_path": self.unix_path,
            "http_port": port,
            "state_dir": str(self.state_dir),
            "log_format": "json",
        }
        profile = {"client_id": CLIENT_ID, "client_secret_env": SECRET_ENV, "token_url": token_url}
        tables: dict[str, Mapping[str, object]] = {
            "broker": broker,
            "defaults": dict(defaults or {}),
            "profiles.default": profile,
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(_toml(tables))
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the broker is not running"
        return self.proc.pid

    def target(self) -> Target:
        return Target("broker", self.pid, self.unix_path, self.port, self.tcp_headers())

    def tcp_headers(self) -> tuple[str, ...]:
        return (f"X-Colt-Broker: {self.key}",)

    def start(self) -> float:
        """Start and wait for READY=1; the seconds from spawn to READY."""
        notify_path = self.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), **{SECRET_ENV: CLIENT_SECRET})
            argv = [str(Path(sys.executable).with_name("colt-broker")), "serve"]
            started = time.perf_counter()
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    pinned(SERVER_CPU, [*argv, "--config", str(self.config)]),
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            ready = self._await_ready(notify, started)
        # The socket is gone now: later notifications (STATUS=, every 10 s) fail at once
        # instead of filling a queue nobody reads.
        notify_path.unlink()
        self.key = (Path(self.unix_path).parent / "http-key").read_text().strip()
        return ready

    def _await_ready(self, notify: socket.socket, started: float) -> float:
        notify.settimeout(0.05)
        while time.perf_counter() - started < START_TIMEOUT:
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    break  # it exited: the log says why
                continue
            if "READY=1" in message.split("\n"):
                return time.perf_counter() - started
        self.stop()
        raise RuntimeError(f"the broker sent no READY=1: see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


# --- the baselines --------------------------------------------------------------------------


class Baseline:
    """A server answering a fixed body on a Unix socket and TCP: nginx or uvicorn."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int) -> None:
        self.name = name
        self.argv = argv
        self.unix_path = str(workdir / f"{name}.sock")
        self.port = port
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def target(self, headers: tuple[str, ...]) -> Target:
        assert self.proc is not None, f"{self.name} is not running"
        return Target(self.name, self.proc.pid, self.unix_path, self.port, headers)

    def start(self, env: Mapping[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                pinned(SERVER_CPU, self.argv), stdout=log, stderr=log, env=env
            )
        wait_for(
            lambda: answers(self.unix_path) and answers(self.port),
            START_TIMEOUT,
            f"{self.name} answering (see {self.log})",
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def nginx(nginx_bin: str, workdir: Path, port: int, body: bytes) -> Baseline:
    """Debian's nginx, one worker process, ``body`` from memory (bench/nginx.conf.tmpl)."""
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / temp).mkdir(parents=True, exist_ok=True)
    fields = {
        "dir": str(workdir),
        "unix_path": str(workdir / "nginx.sock"),
        "port": str(port),
        "body": body.decode(),
    }
    text = (BENCH / "nginx.conf.tmpl").read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    (workdir / "nginx.sock").unlink(missing_ok=True)
    argv = [nginx_bin, "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(conf)]
    return Baseline("nginx", argv, workdir, port)


def uvicorn(workdir: Path, port: int, body: bytes) -> tuple[Baseline, dict[str, str]]:
    """The raw-ASGI app of bench/baseline_uvicorn.py; returns it with the environment it needs."""
    body_file = workdir / "body.json"
    body_file.write_bytes(body)
    argv = [sys.executable, str(BENCH / "baseline_uvicorn.py"), str(workdir / "uvicorn.sock")]
    env = dict(os.environ, BENCH_BODY_FILE=str(body_file))
    return Baseline("uvicorn", [*argv, str(port)], workdir, port), env


def same_size_body(real: bytes) -> bytes:
    """A JSON body as long as the broker's token response, with no token in it."""
    doc = json.loads(real)
    doc["access_token"] = "x" * len(doc["access_token"])
    body = json.dumps(doc).encode()
    return body + b" " * (len(real) - len(body))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
