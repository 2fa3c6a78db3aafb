"""HTTP/1.1 mechanics and hostile input: keep-alive, pipelining, limits, timeouts, garbage."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest
from _clocks import FakeClock
from _fake_source import FakeSource
from _http_harness import Client, Harness, default_profiles, running, wait_until
from anyio.abc import TaskStatus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker._http import HttpService, Limits, open_unix_listener
from broker._http._deadline import Deadline
from broker._http._request import split_target
from broker._metrics import NO_PROFILE, Metrics
from broker._token import Token

pytestmark = pytest.mark.anyio


def _statuses(raw: bytes) -> list[int]:
    """Status codes of every response in ``raw`` (a test-side scan of status lines)."""
    return [
        int(line.split(b" ")[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")
    ]


# --- connection management -------------------------------------------------------------------


async def test_keep_alive_serves_many_requests(h: Harness) -> None:
    """One connection serves request after request."""
    async with h.unix() as c:
        for _ in range(5):
            assert (await c.get("/v1/token")).status == 200


async def test_pipelined_requests_answered_in_order(h: Harness) -> None:
    """Requests sent back to back in one write are answered in order."""
    async with h.unix() as c:
        await c.send(
            c.build("GET", "/v1/token/other")
            + c.build("GET", "/healthz")
            + c.build("GET", "/v1/token")
        )
        first, second, third = [await c.read_response() for _ in range(3)]
    assert first.json()["profile"] == "other"
    assert second.json() == {"status": "ok"}
    assert third.json()["profile"] == "default"


async def test_pipelining_keeps_order_behind_a_waiting_request(h: Harness) -> None:
    """A quick answer queued behind a waiting one is not sent before it."""
    release = h.hold_refreshes()
    async with h.unix() as c:
        await c.send(c.build("GET", "/v1/token?min_valid=1801") + c.build("GET", "/v1/token/other"))
        await anyio.wait_all_tasks_blocked()
        release.set()
        first, second = await c.read_response(), await c.read_response()
    assert first.json()["access_token"] == "token-default-2"
    assert second.json()["access_token"] == "token-other-1"


async def test_connection_close_is_honoured(h: Harness) -> None:
    """A request with Connection: close is answered with Connection: close, then EOF."""
    async with h.unix() as c:
        await c.send(
            c.build("GET", "/v1/token", headers=[("Connection", "close")])
            + c.build("GET", "/healthz")
        )
        r = await c.read_response()
        assert r.headers["connection"] == "close"
        assert await c.read_to_eof() == b""  # the second request is not answered


async def test_http10_closes_by_default(h: Harness) -> None:
    """An HTTP/1.0 request without keep-alive is answered and the connection closed."""
    async with h.unix() as c:
        r = await c.get("/v1/token", version="1.0")
        assert r.status == 200 and r.headers["connection"] == "close"
        assert await c.read_to_eof() == b""


async def test_http10_keep_alive(h: Harness) -> None:
    """An HTTP/1.0 request asking for keep-alive is told keep-alive and may continue."""
    async with h.unix() as c:
        r = await c.get("/v1/token", version="1.0", headers=[("Connection", "keep-alive")])
        assert r.headers["connection"] == "keep-alive"
        assert (
            await c.get("/v1/token", version="1.0", headers=[("Connection", "keep-alive")])
        ).status == 200


async def test_absolute_form_target(h: Harness) -> None:
    """An absolute-form request target is routed by its path."""
    async with h.unix() as c:
        assert (await c.get("http://localhost/v1/token/other")).json()["profile"] == "other"


def test_split_target() -> None:
    """Request targets split into path and query in every form."""
    assert split_target(b"/v1/token?min_valid=5") == (b"/v1/token", b"min_valid=5")
    assert split_target(b"http://h:1/x?y") == (b"/x", b"y")
    assert split_target(b"*") == (b"/", b"")


async def test_half_closed_client_still_gets_its_answer(h: Harness) -> None:
    """A client that sends its request then shuts its writing side still gets the response."""
    async with h.unix() as c:
        await c.send(c.build("GET", "/v1/token"))
        await c.stream.send_eof()
        raw = await c.read_to_eof()
    assert _statuses(raw) == [200]


# --- malformed and oversized input -----------------------------------------------------------


_REFRESH = b"POST /v1/token/default/refresh HTTP/1.1\r\nHost: x\r\n"


async def _refused(c: Client, data: bytes) -> tuple[int, bytes]:
    await c.send(data)
    r = await c.read_response()
    assert r.headers["connection"] == "close"
    assert await c.read_to_eof() == b""
    return r.status, r.body


async def test_garbage_is_400_and_close(h: Harness) -> None:
    """Bytes that are not HTTP get a 400 problem and a close."""
    async with h.unix() as c:
        status, body = await _refused(c, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert status == 400 and b"Malformed HTTP request" in body


async def test_oversized_request_line_is_414(h: Harness) -> None:
    """A request line over max_request_line is 414 and a close."""
    async with h.unix() as c:
        status, _ = await _refused(c, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert status == 414


async def test_oversized_header_is_431(h: Harness) -> None:
    """A header block over max_header_bytes is 431, even before it ends."""
    async with h.unix() as c:
        status, _ = await _refused(c, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000)
    assert status == 431


async def test_too_many_headers_is_431(h: Harness) -> None:
    """More than max_headers headers is 431."""
    headers = b"".join(b"X-%d: 1\r\n" % i for i in range(70))
    async with h.unix() as c:
        status, _ = await _refused(c, b"GET /v1/token HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status == 431


async def test_huge_content_length_is_413(h: Harness) -> None:
    """A declared body over max_body is refused 413 before it is read."""
    async with h.unix() as c:
        data = _REFRESH + b"Content-Length: 99999999999\r\n\r\n"
        status, _ = await _refused(c, data)
    assert status == 413


@pytest.mark.parametrize(
    "head",
    [
        _REFRESH + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        _REFRESH + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        b"GET /v1/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
async def test_smuggling_shapes_are_400(h: Harness, head: bytes) -> None:
    """TE with CL, TE on a GET, or conflicting lengths: 400 and a close."""
    async with h.unix() as c:
        status, _ = await _refused(c, head)
    assert status == 400


async def test_duplicate_host_is_400(h: Harness) -> None:
    """Two Host headers are a 400."""
    async with h.unix() as c:
        status, _ = await _refused(c, b"GET /v1/token HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400


async def test_chunked_refresh_body_is_accepted(h: Harness) -> None:
    """A chunked refresh body within max_body is read like any other."""
    body = b'{"access_token": "token-default-1"}'
    data = (
        b"POST /v1/token/default/refresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )
    async with h.unix() as c:
        await c.send(data)
        assert (await c.read_response()).json()["access_token"] == "token-default-1-renewed"


async def test_expect_continue(h: Harness) -> None:
    """A client that sends Expect: 100-continue is told to continue, then answered."""
    body = b'{"access_token": "token-default-1"}'
    async with h.unix() as c:
        await c.send(
            c.build(
                "POST",
                "/v1/token/default/refresh",
                headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
            )
        )
        while b"\r\n\r\n" not in c.buffer:
            await c._fill()
        assert c.buffer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await c.send(body)
        assert (await c.read_response()).status == 200


# --- slow, idle, too many, not reading --------------------------------------------------------


async def test_stalled_half_requests_do_not_block_a_normal_one(sockdir: Path) -> None:
    """300 connections that stall mid-request do not delay a normal request."""
    async with running(sockdir) as h, AsyncExitStack() as stack:
        for _ in range(300):
            c = await stack.enter_async_context(h.unix())
            await c.send(b"GET /v1/token HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        with anyio.fail_after(2):
            async with h.unix() as c:
                assert (await c.get("/v1/token")).status == 200
        assert h.service.open_connections >= 300  # the stalled ones are still open


async def test_slow_request_times_out_with_408(sockdir: Path) -> None:
    """A request not complete within header_timeout is answered 408 and closed."""
    async with running(sockdir, limits=Limits(header_timeout=0.2)) as h, h.unix() as c:
        await c.send(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n")
        r = await c.read_response()
        assert r.status == 408
        assert await c.read_to_eof() == b""


async def test_silent_connection_is_closed(sockdir: Path) -> None:
    """A connection that sends nothing is closed after header_timeout."""
    async with running(sockdir, limits=Limits(header_timeout=0.2)) as h, h.unix() as c:
        assert await c.read_to_eof() == b""


async def test_idle_keep_alive_is_closed(sockdir: Path) -> None:
    """A keep-alive connection idle past idle_timeout is closed."""
    async with running(sockdir, limits=Limits(idle_timeout=0.2)) as h, h.unix() as c:
        assert (await c.get("/v1/token")).status == 200
        assert await c.read_to_eof() == b""


async def test_max_connections(sockdir: Path) -> None:
    """Past max_connections a new connection gets 503 and a close; the others carry on."""
    async with running(sockdir, limits=Limits(max_connections=3)) as h, AsyncExitStack() as stack:
        admitted = [await stack.enter_async_context(h.unix()) for _ in range(3)]
        for c in admitted:
            assert (await c.get("/healthz")).status == 200
        async with h.unix() as extra:
            raw = await extra.read_to_eof()
        assert _statuses(raw) == [503] and b"Retry-After: 1" in raw
        for c in admitted:
            assert (await c.get("/v1/token")).status == 200


async def test_tcp_flood_leaves_the_unix_socket_served(sockdir: Path) -> None:
    """Idle TCP connections without the key can take only 3/4 of max_connections: past
    that TCP gets 503 and a close, while the Unix socket still serves its reserve."""
    limits = Limits(max_connections=8)
    assert limits.tcp_connections == 6
    async with running(sockdir, limits=limits) as h, AsyncExitStack() as stack:
        for _ in range(10):  # idle connections, held open to the end
            await stack.enter_async_context(h.tcp())
        await wait_until(
            "4 TCP connections refused",
            lambda: h.metrics.requests.get((NO_PROFILE, "tcp", 503)) == 4,
        )
        assert h.service.open_connections == 6
        socket_users = [await stack.enter_async_context(h.unix()) for _ in range(2)]
        for c in socket_users:
            assert (await c.get("/v1/token")).status == 200
        async with h.unix() as one_too_many:  # the total cap still holds
            assert _statuses(await one_too_many.read_to_eof()) == [503]


async def test_overloaded_answer_is_closed_at_once(sockdir: Path) -> None:
    """A connection past the cap gets its 503 and is closed without the usual linger,
    so refused connections do not hold descriptors while the client dawdles."""
    async with running(sockdir, limits=Limits(max_connections=1)) as h, h.unix() as first:
        assert (await first.get("/healthz")).status == 200
        async with h.unix() as extra:
            r = await extra.read_response()
            assert (r.status, r.headers["connection"]) == (503, "close")
            assert await extra.read_to_eof() == b""
            # Fully closed, not half-closed to linger: on a Unix socket, sending now fails.
            with pytest.raises(anyio.BrokenResourceError):
                await extra.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")


async def test_client_that_does_not_read_is_paused(h: Harness) -> None:
    """A client that pipelines without reading stops being read; memory stays bounded."""
    count = 20_000
    request = b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n"
    sent = 0
    async with h.unix() as c:

        async def writer() -> None:
            nonlocal sent
            for _ in range(count // 100):
                await c.send(request * 100)
                sent += 100

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await anyio.wait_all_tasks_blocked()
            (protocol,) = h.service._pool.open  # white box: the server side's write buffer
            assert protocol._transport.get_write_buffer_size() < 1_000_000
            assert sent < count, "the server kept reading from a client that does not read"
            for _ in range(count):
                assert (await c.read_response()).status == 200


# --- anything at all ------------------------------------------------------------------------

_PREFIXES = [
    b"",
    b"GET /v1/token HTTP/1.1\r\n",
    b"GET /v1/token HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/token/default/refresh HTTP/1.1\r\nContent-Length: 8\r\n\r\n",
]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=st.sampled_from(_PREFIXES), noise=st.binary(max_size=300))
async def test_random_bytes_never_break_the_server(h: Harness, prefix: bytes, noise: bytes) -> None:
    """Whatever bytes arrive, the server answers well-formed 2xx/4xx responses or closes, and
    the next client is served."""
    async with h.unix() as c:
        await c.send(prefix + noise)
        await c.stream.send_eof()
        raw = await c.read_to_eof()
    assert raw == b"" or raw.startswith(b"HTTP/1.1 ")
    assert all(status < 500 for status in _statuses(raw))
    async with h.unix() as c:
        assert (await c.get("/v1/token")).status == 200


# --- shutdown -------------------------------------------------------------------------------


async def test_shutdown_closes_connections_and_cancels_waits(sockdir: Path) -> None:
    """Cancelling serve() closes its listener and connections and cancels pending waits."""
    clock = FakeClock()
    source = FakeSource(clock, ["default"])
    source.issue("default", "token-default-1")
    wait_cancelled = anyio.Event()

    async def never(profile: str, min_valid: float | None, timeout: float) -> Token:
        try:
            await anyio.sleep_forever()
        finally:
            wait_cancelled.set()
        raise AssertionError

    source.on_get = never
    service = HttpService(
        source, default_profiles(), default_profile="default", http_auth="key", http_key="k",
        metrics=Metrics(), clock=clock,
    )  # fmt: skip
    path = sockdir / "broker.sock"
    serving = anyio.CancelScope()

    async def serve(*, task_status: TaskStatus[None]) -> None:
        with serving:
            await service.serve(open_unix_listener(path), "unix", task_status=task_status)

    async with anyio.create_task_group() as tg:
        await tg.start(serve)
        stream = await anyio.connect_unix(path)
        async with stream:
            c = Client(stream, "localhost", ())
            await c.send(c.build("GET", "/v1/token?min_valid=1801"))
            await anyio.wait_all_tasks_blocked()
            serving.cancel()
            assert await c.read_to_eof() == b""
    assert wait_cancelled.is_set()
    assert service.open_connections == 0
    with pytest.raises(ConnectionRefusedError):
        await anyio.connect_unix(path)


async def test_deadline_can_move_later_and_earlier() -> None:
    """The lazy timer fires at the latest deadline set, or sooner when moved earlier."""
    loop = asyncio.get_running_loop()
    later, sooner = anyio.Event(), anyio.Event()
    start = loop.time()
    moved_later = Deadline(loop, later.set)
    moved_later.set(start + 0.02)
    moved_later.set(start + 0.1)
    moved_sooner = Deadline(loop, sooner.set)
    moved_sooner.set(start + 100)
    moved_sooner.set(start + 0.01)
    with anyio.fail_after(2):
        await sooner.wait()
        await later.wait()
    assert loop.time() >= start + 0.1 - 0.002
