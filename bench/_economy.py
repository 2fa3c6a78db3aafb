"""Upstream economy: how many token requests the broker makes for how many consumers.

* A herd: 1,000 consumers ask at once at a cold start; the emulator answers the first token
  request only after a delay, so every consumer arrives while it is in flight. Goal: one
  upstream request, and every consumer served that one token.
* Continuous load across short token lifetimes: Python consumers that check every token they
  are served (against the JWT's own ``exp``), plus uds_load for pressure. Goal: upstream
  requests as the refresh schedule needs them (+-20%), no failed request, no token served
  with less than ``min_valid`` left.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from _gen import parse_uds
from _servers import Broker, http_get, upstream
from _sys import LOAD_CPU, pinned

T = TypeVar("T")
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_REQUEST = b"GET /v1/token HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=_event_loop) as runner:
        return runner.run(main())


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes]:
    """One GET /v1/token on a kept-alive connection: (status, body)."""
    writer.write(_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    match = _LENGTH.search(head)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return int(head[9:12]), body


def jwt_exp(token: str) -> float:
    """The ``exp`` claim of a JWT, unverified (the emulator's tokens carry it)."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


# --- the herd -------------------------------------------------------------------------------


@dataclass
class Herd:
    consumers: int
    served: int
    distinct_tokens: int
    upstream_requests: int
    seconds: float  # from the first consumer's request to the last answer

    @property
    def met(self) -> bool:
        return (
            self.upstream_requests == 1
            and self.served == self.consumers
            and (self.distinct_tokens == 1)
        )


async def _herd_member(path: str, gate: asyncio.Event) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await gate.wait()
        return await _ask(reader, writer)
    finally:
        writer.close()


async def _herd(path: str, consumers: int) -> tuple[list[tuple[int, bytes]], float]:
    gate = asyncio.Event()
    tasks = [asyncio.ensure_future(_herd_member(path, gate)) for _ in range(consumers)]
    await asyncio.sleep(0.2)  # let every connection be made before anyone asks
    started = time.perf_counter()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    done = time.perf_counter() - started
    return [r if isinstance(r, tuple) else (0, b"") for r in results], done


def herd(workdir: Path, port: int, consumers: int = 1000, delay: float = 1.0) -> Herd:
    """``consumers`` at once against a broker that has just started with no token."""
    with upstream() as up:
        up.delay_next(delay)
        broker = Broker(workdir, up.token_url, port)
        broker.start()
        try:
            answers, seconds = run_async(lambda: _herd(broker.unix_path, consumers))
        finally:
            broker.stop()
        tokens = {json.loads(body)["access_token"] for status, body in answers if status == 200}
        return Herd(
            consumers=consumers,
            served=sum(1 for status, _ in answers if status == 200),
            distinct_tokens=len(tokens),
            upstream_requests=up.count(),
            seconds=seconds,
        )


# --- continuous load across lifetimes -------------------------------------------------------


@dataclass
class Continuous:
    lifetime: float
    lifetimes: int
    expected_requests: float  # what the refresh schedule needs over the window
    upstream_requests: int = 0
    checked: int = 0  # responses the Python consumers checked
    pressure: int = 0  # responses served to uds_load meanwhile
    failed: int = 0
    short: int = 0  # tokens served with less than min_valid left
    least_left: float = float("inf")  # the least validity seen on a served token, seconds
    # Hashes, not tokens: this object is printed, and a whole token must never be.
    distinct_tokens: set[str] = field(default_factory=set, repr=False)

    @property
    def met(self) -> bool:
        within = abs(self.upstream_requests - self.expected_requests) <= (
            0.2 * self.expected_requests
        )
        return within and self.failed == 0 and self.short == 0


def refresh_period(lifetime: float, min_valid: float, ahead: float, jitter: float) -> float:
    """The mean time between refreshes under the broker's rule (broker/_lifecycle.py)."""
    lead = max((ahead + jitter / 2) * lifetime, min(min_valid + 0.1 * lifetime, 0.9 * lifetime))
    return lifetime - lead


async def _checker(path: str, until: float, min_valid: float, tally: Continuous) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        while time.monotonic() < until:
            asked = time.time()
            try:
                status, body = await _ask(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                tally.failed += 1
                reader, writer = await asyncio.open_unix_connection(path)
                continue
            _check(status, body, asked, min_valid, tally)
    finally:
        writer.close()


def _check(status: int, body: bytes, asked: float, min_valid: float, tally: Continuous) -> None:
    tally.checked += 1
    if status != 200:
        tally.failed += 1
        return
    token = json.loads(body)["access_token"]
    left = jwt_exp(token) - asked  # asked before it was served: errs toward "short"
    tally.least_left = min(tally.least_left, left)
    tally.short += left < min_valid
    tally.distinct_tokens.add(hashlib.sha256(token.encode()).hexdigest())


async def _checkers(path: str, seconds: float, min_valid: float, tally: Continuous) -> None:
    until = time.monotonic() + seconds
    await asyncio.gather(*(_checker(path, until, min_valid, tally) for _ in range(8)))


def continuous(workdir: Path, port: int, gen: Path, lifetime: float, lifetimes: int) -> Continuous:
    """Load across ``lifetimes`` token lifetimes of ``lifetime`` seconds each."""
    min_valid, ahead, jitter = lifetime / 20, 0.1, 0.02
    defaults = {
        "min_valid": min_valid,
        "refresh_ahead": ahead,
        "refresh_jitter": jitter,
        "max_requests_per_minute": 600,
        "max_requests_per_day": 100000,
    }
    window = lifetime * lifetimes
    period = refresh_period(lifetime, min_valid, ahead, jitter)
    tally = Continuous(lifetime, lifetimes, expected_requests=window / period)
    with upstream(lifetime) as up:
        broker = Broker(workdir, up.token_url, port, defaults)
        broker.start()
        try:
            assert http_get(broker.unix_path)[0] == 200, "the broker served no first token"
            first = up.count()
            argv = [str(gen), "-u", broker.unix_path, "-c", "16", "-d", str(window)]
            pressure = subprocess.Popen(pinned(LOAD_CPU, argv), stdout=subprocess.PIPE)
            run_async(lambda: _checkers(broker.unix_path, window, min_valid, tally))
            out, _ = pressure.communicate(timeout=window + 30)
            tally.upstream_requests = up.count() - first
        finally:
            broker.stop()
    loaded = parse_uds(out.decode())
    tally.pressure, tally.failed = loaded.requests, tally.failed + loaded.failed
    return tally
