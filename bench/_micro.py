"""``--profile``, part two: the Python cost of one request on the broker's HTTP path.

The broker's ``HttpProtocol`` is fed the same request 100,000 times through a transport
that only counts writes: no syscalls, no event loop, no other process, so the figure is
exact and repeatable on a noisy machine. A bare ``asyncio.Protocol`` + httptools answering
a fixed body is measured the same way: the difference is what the broker's own Python
adds per request. This reaches into the HTTP layer's internals, so a change there may
break it: it then reports why instead of a figure.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
from collections.abc import Sequence
from typing import Any, Literal

import httptools

KEY = "bench-key-0123456789"
UNIX_REQUEST = b"GET /v1/token HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n\r\n"
TCP_REQUEST = (
    b"GET /v1/token HTTP/1.1\r\nHost: 127.0.0.1:8787\r\nX-Colt-Broker: " + KEY.encode() + b"\r\n"
    b"User-Agent: bench\r\n\r\n"
)


class _CountingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False


class _Source:
    """A TokenSource holding one token that never expires during the measurement."""

    def __init__(self) -> None:
        from broker._token import Token

        far = time.monotonic() + 3600
        self._token = Token("eyJ" + "x" * 330, "Bearer", far - 1800, far, time.time() + 3600)

    @property
    def profiles(self) -> Sequence[str]:
        return ["default"]

    def current(self, profile: str, now: float) -> Any:
        return self._token

    async def get(self, profile: str, *, min_valid: float | None, timeout: float) -> Any:
        return self._token

    async def report_rejected(self, profile: str, sha256: str, *, timeout: float) -> Any:
        return self._token

    def status(self) -> list[Any]:
        return []


class _Bare(asyncio.Protocol):
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 381\r\n\r\n" + b"x" * 381

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(self.body)


def _broker_protocol(kind: Literal["unix", "tcp"]) -> Any:
    from broker._http import HttpService
    from broker._http._protocol import HttpProtocol
    from broker._metrics import Metrics
    from broker._profile import ProfileConfig, Secret

    profile = ProfileConfig(
        name="default",
        client_id="bench",
        secret=Secret("made-up", "bench"),
        token_url="http://127.0.0.1:9/token",  # noqa: S106  # a URL, never asked
    )
    service = HttpService(
        _Source(),
        {"default": profile},
        default_profile="default",
        http_auth="key",
        http_key=KEY,
        metrics=Metrics(),
    )
    return HttpProtocol(service._app, service._pool, kind, service._limits, object())


def _per_request(protocol: Any, transport: _CountingTransport, request: bytes, n: int) -> float:
    protocol.connection_made(transport)
    for _ in range(1000):  # warm: the token's rendering is cached after the first
        protocol.data_received(request)
    started = time.perf_counter()
    for _ in range(n):
        protocol.data_received(request)
    elapsed = time.perf_counter() - started
    if transport.writes != n + 1000:
        raise RuntimeError(f"{transport.writes} answers to {n + 1000} requests")
    return elapsed / n * 1e6


def _calls_per_request(protocol: Any, request: bytes, n: int = 20_000) -> tuple[float, list[str]]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        protocol.data_received(request)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = stats.stats  # type: ignore[attr-defined]  # pstats keeps its table here
    calls = sum(row[1] for row in rows.values()) / n
    own = sorted(((row[2], key) for key, row in rows.items()), reverse=True)[:8]
    top = [f"`{key[2]}` ({key[0].rsplit('/', 2)[-1]}:{key[1]})" for _, key in own]
    return calls, top


async def _measure(n: int) -> list[str]:
    from broker._logging import configure_logging

    # Per-request lines are debug: filtered out, as in the daemon at its default "info".
    # "warning" also keeps the once-per-connection info lines out of the benchmark's output.
    configure_logging("json", "warning")
    lines = []
    kinds: tuple[tuple[Literal["unix", "tcp"], bytes], ...] = (
        ("unix", UNIX_REQUEST),
        ("tcp", TCP_REQUEST),
    )
    for kind, request in kinds:
        protocol = _broker_protocol(kind)
        us = _per_request(protocol, _CountingTransport(), request, n)
        lines.append(f"- broker, {kind}: {us:.2f} µs of Python per request")
        if kind == "unix":
            calls, top = _calls_per_request(protocol, request)
    bare_transport = _CountingTransport()
    bare = _Bare(bare_transport)
    started = time.perf_counter()
    for _ in range(n):
        bare.data_received(UNIX_REQUEST)
    bare_us = (time.perf_counter() - started) / n * 1e6
    lines.append(f"- bare asyncio.Protocol + httptools: {bare_us:.2f} µs per request")
    lines.append(f"- the broker makes {calls:.0f} Python calls per request; most own time in: ")
    lines[-1] += ", ".join(top)
    return lines


def per_request_cost(n: int = 100_000) -> list[str]:
    """Markdown lines: µs of Python per request, broker against a bare protocol."""
    header = [f"In process, no syscalls ({n:,} identical requests, a counting transport):", ""]
    try:
        return header + asyncio.run(_measure(n))
    except Exception as exc:  # internals moved: say so rather than fail the whole benchmark
        return [f"Per-request cost not measured: {type(exc).__name__}: {exc}"]
