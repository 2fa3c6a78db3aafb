"""A running HttpService on a real Unix socket and a real loopback TCP port, and a raw client.

The client speaks HTTP/1.1 by hand so tests control every byte (pipelining, garbage,
half-sent requests) and see exactly what the server wrote.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from _clocks import FakeClock
from _fake_source import FakeSource, profile_config
from anyio.abc import ByteStream

from broker._http import HttpService, Limits, open_tcp_listener, open_unix_listener
from broker._metrics import Metrics
from broker._profile import ProfileConfig
from broker._token import Token

KEY = "test-key-0123456789"
READ_TIMEOUT = 5.0


async def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) from the real curl binary."""
    with anyio.fail_after(10):
        result = await anyio.run_process(["curl", "-sS", "-w", "|%{http_code}", *args], check=False)
    assert result.returncode == 0, result.stderr.decode()
    body, _, status = result.stdout.decode().rpartition("|")
    return int(status), body


async def wait_until(what: str, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the event loop until ``condition()`` holds (the server has caught up with
    what the kernel already delivered); fail naming ``what`` after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not condition():
                await anyio.lowlevel.checkpoint()
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One connection; requests and responses as raw bytes."""

    def __init__(self, stream: ByteStream, host: str, extra: Sequence[tuple[str, str]]) -> None:
        self.stream = stream
        self.host = host
        self.extra = list(extra)
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    def build(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "1.1",
        host: str | None = None,
        auth: bool = True,
    ) -> bytes:
        """The bytes of one request (Host and, on TCP, the key header unless ``auth`` False)."""
        lines = [f"{method} {path} HTTP/{version}", f"Host: {host or self.host}"]
        lines += [f"{k}: {v}" for k, v in (self.extra if auth else [])]
        lines += [f"{k}: {v}" for k, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def request(self, method: str, path: str, **kwargs: Any) -> Response:
        await self.send(self.build(method, path, **kwargs))
        return await self.read_response(head=method == "HEAD")

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.request("GET", path, **kwargs)

    async def _fill(self) -> None:
        with anyio.fail_after(READ_TIMEOUT):
            self.buffer += await self.stream.receive()

    async def read_response(self, *, head: bool = False) -> Response:
        """The next response (a 100 Continue is skipped)."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *header_lines = raw.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            if status != 100:
                break
        headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        length = 0 if head else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            await self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)

    async def read_to_eof(self) -> bytes:
        """Everything until the server closes (bounded by READ_TIMEOUT)."""
        with anyio.fail_after(READ_TIMEOUT):
            while True:
                try:
                    self.buffer += await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data, self.buffer = self.buffer, b""
                    return data

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class Harness:
    service: HttpService
    source: FakeSource
    clock: FakeClock
    metrics: Metrics
    socket_path: Path
    port: int

    @asynccontextmanager
    async def unix(self) -> AsyncIterator[Client]:
        stream = await anyio.connect_unix(self.socket_path)
        async with stream:
            yield Client(stream, "localhost", ())

    @asynccontextmanager
    async def tcp(self, *, key: str = KEY) -> AsyncIterator[Client]:
        stream = await anyio.connect_tcp("127.0.0.1", self.port)
        async with stream:
            yield Client(stream, f"127.0.0.1:{self.port}", [("X-Colt-Broker", key)])

    def hold_refreshes(self) -> anyio.Event:
        """Make every wait for a refresh block until the returned event is set; then it gets
        a new token, ``token-<profile>-2``."""
        release = anyio.Event()

        async def refreshed(profile: str, min_valid: float | None, timeout: float) -> Token:
            await release.wait()
            return self.source.issue(profile, f"token-{profile}-2")

        self.source.on_get = refreshed
        return release


def default_profiles() -> dict[str, ProfileConfig]:
    return {name: profile_config(name) for name in ("default", "other")}


@asynccontextmanager
async def running(
    directory: Path,
    *,
    profiles: Mapping[str, ProfileConfig] | None = None,
    default_profile: str | None = "default",
    http_auth: str = "key",
    limits: Limits = Limits(),  # noqa: B008  # frozen: a safe default
    wait_timeout: float = 2.0,
    issue: bool = True,
) -> AsyncIterator[Harness]:
    """A service on ``directory``/broker.sock and an ephemeral loopback port; the source
    holds a fresh token for every profile unless ``issue`` is False."""
    profiles = default_profiles() if profiles is None else profiles
    clock = FakeClock()
    source = FakeSource(clock, list(profiles))
    if issue:
        for name in profiles:
            source.issue(name, f"token-{name}-1")
    metrics = Metrics()
    metrics.bind_status(source.status)
    service = HttpService(
        source,
        profiles,
        default_profile=default_profile,
        http_auth=http_auth,  # type: ignore[arg-type]  # a str from the parameter
        http_key=KEY,
        metrics=metrics,
        clock=clock,
        limits=limits,
        wait_timeout=wait_timeout,
    )
    unix_sock = open_unix_listener(directory / "broker.sock")
    tcp_sock = open_tcp_listener("127.0.0.1", 0)
    port = tcp_sock.getsockname()[1]
    async with anyio.create_task_group() as tg:
        await tg.start(service.serve, unix_sock, "unix")
        await tg.start(service.serve, tcp_sock, "tcp")
        yield Harness(service, source, clock, metrics, directory / "broker.sock", port)
        tg.cancel_scope.cancel()
