"""The hot lane: prepared answers to repeated token GETs keep every check of the general path."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import anyio
import pytest
import structlog
from _clocks import FakeClock
from _fake_source import FakeSource, profile_config
from _http_harness import KEY, Client, Harness, default_profiles, running

from broker._http import Limits
from broker._http._access import PeerCred, TcpGate
from broker._http._hot import HotTokens, Lane
from broker._http._render import CONN_DEFAULT, CONN_KEEP_ALIVE, Renderer, TokenResponses
from broker._http._request import ConnInfo, Transport
from broker._logging import configure_logging
from broker._metrics import Metrics

pytestmark = pytest.mark.anyio

ME = PeerCred(os.getpid(), os.getuid(), os.getgid())
TCP_HEADERS = {b"host": b"127.0.0.1:8787", b"x-colt-broker": KEY.encode()}


@pytest.fixture(autouse=True)
def info_logging() -> Iterator[None]:
    """Logging at "info", as the daemon runs: at "debug" every token is logged, and the
    hot lane stays shut."""
    configure_logging("json", "info", stream=io.StringIO())
    yield
    structlog.reset_defaults()


# --- the lane on its own: no sockets ---------------------------------------------------------


class _Lanes:
    """A HotTokens over a FakeSource, and lanes of connections that already took a token."""

    def __init__(self, auth: str = "key", **acl: frozenset[int]) -> None:
        self.clock = FakeClock()
        self.source = FakeSource(self.clock)
        self.metrics = Metrics()
        responses = TokenResponses(Renderer(self.clock))
        self.hot = HotTokens(self.source, responses, TcpGate(auth, KEY), self.metrics, self.clock)
        profiles = {"default": profile_config("default"), "other": profile_config("other", **acl)}
        self.hot.update(profiles, "default")
        for name in profiles:
            self.source.issue(name, f"token-{name}-1")

    def lane(self, transport: Transport, peer: PeerCred | None = None) -> Lane:
        conn = ConnInfo(transport, peer, "test", took_token=True)
        return self.hot.lane(conn)


def _get(lane: Lane, url: bytes, headers: Mapping[bytes, bytes] = TCP_HEADERS) -> bytes | None:
    return lane.answer(url, headers, CONN_DEFAULT)


def test_lane_answers_a_plain_token_get() -> None:
    """GET /v1/token over either transport is answered with the general path's bytes."""
    lanes = _Lanes()
    for lane in (lanes.lane("unix", ME), lanes.lane("tcp")):
        data = _get(lane, b"/v1/token")
        assert data is not None and data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b'"access_token": "token-default-1"' in data
        assert b"token-other-1\n" in (_get(lane, b"/v1/token/other?format=raw") or b"")
    assert lanes.metrics.requests[("default", "tcp", 200)] == 1
    assert lanes.metrics.requests[("other", "unix", 200)] == 1


def test_lane_stays_shut_until_the_first_token_was_logged() -> None:
    """A connection's first token goes the general way (it logs peer.first_token)."""
    lanes = _Lanes()
    lane = lanes.hot.lane(ConnInfo("unix", ME, "test"))
    assert _get(lane, b"/v1/token") is None


@pytest.mark.parametrize(
    "headers",
    [
        {b"host": b"127.0.0.1"},
        {b"host": b"127.0.0.1", b"x-colt-broker": b"wrong-key"},
        {b"host": b"127.0.0.1", b"x-colt-broker": KEY.encode()[:-1]},
        {b"host": b"evil.example", b"x-colt-broker": KEY.encode()},
        {b"x-colt-broker": KEY.encode()},
    ],
    ids=["no key", "wrong key", "key prefix", "foreign host", "no host"],
)
def test_lane_leaves_tcp_requests_without_the_key_or_a_loopback_host(
    headers: dict[bytes, bytes],
) -> None:
    """Over TCP only a loopback Host with the right key is answered; the rest go the general way."""
    lane = _Lanes().lane("tcp")
    assert _get(lane, b"/v1/token", TCP_HEADERS) is not None
    assert _get(lane, b"/v1/token", headers) is None


def test_lane_with_http_auth_none_still_needs_the_header() -> None:
    """With http_auth = none any non-empty X-Colt-Broker passes; an empty or missing one not."""
    lane = _Lanes(auth="none").lane("tcp")
    assert _get(lane, b"/v1/token", {b"host": b"localhost", b"x-colt-broker": b"1"}) is not None
    assert _get(lane, b"/v1/token", {b"host": b"localhost", b"x-colt-broker": b""}) is None
    assert _get(lane, b"/v1/token", {b"host": b"localhost"}) is None


def test_lane_leaves_restricted_profiles_to_the_general_path() -> None:
    """A profile with allowed_uids: peers not listed, and TCP, are not answered by the lane."""
    lanes = _Lanes(allowed_uids=frozenset({ME.uid + 1}))
    stranger = lanes.lane("unix", ME)
    assert _get(stranger, b"/v1/token/other") is None
    assert _get(lanes.lane("tcp"), b"/v1/token/other") is None
    listed = lanes.lane("unix", PeerCred(1, ME.uid + 1, ME.gid + 1))
    assert _get(listed, b"/v1/token/other") is not None
    assert _get(stranger, b"/v1/token") is not None  # the unrestricted profile still is


def test_lane_never_serves_a_token_under_min_valid() -> None:
    """Once the token has less than min_valid left, the lane answers None, even from cache."""
    lanes = _Lanes()
    lane = lanes.lane("unix", ME)
    lanes.source.issue("default", "token-short", lifetime=100)
    assert b"token-short" in (_get(lane, b"/v1/token") or b"")
    lanes.clock.advance(40.5)  # 59.5 s left, min_valid is 60
    assert _get(lane, b"/v1/token") is None
    assert lane.serve(lane.chosen) is None


def test_lane_serves_a_new_token_at_once() -> None:
    """A new token replaces the cached bytes on the next request."""
    lanes = _Lanes()
    lane = lanes.lane("unix", ME)
    assert b"token-default-1" in (_get(lane, b"/v1/token") or b"")
    lanes.source.issue("default", "token-default-2")
    data = lane.serve(lane.chosen) or b""
    assert b"token-default-2" in data and b"token-default-1" not in data


def test_lane_rerenders_when_the_second_ticks() -> None:
    """expires_in and Date follow the clock: the cached bytes live at most a second."""
    lanes = _Lanes()
    lane = lanes.lane("unix", ME)
    first = _get(lane, b"/v1/token") or b""
    lanes.clock.advance(1.0)
    second = lane.serve(lane.chosen) or b""
    assert b'"expires_in": 1800' in first and b'"expires_in": 1799' in second
    assert first.split(b"Date: ")[1][:29] != second.split(b"Date: ")[1][:29]


def test_lane_answers_only_exact_targets() -> None:
    """Other queries, encodings, paths and HTTP/1.0 keep-alive: only the listed ones hot."""
    lane = _Lanes().lane("unix", ME)
    for url in (b"/v1/token?min_valid=10", b"/v1/token/%64efault", b"/v1/token/nope", b"/v1/x"):
        assert _get(lane, url) is None, url
    keep_alive = lane.answer(b"/v1/token/", {}, CONN_KEEP_ALIVE) or b""
    assert b"Connection: keep-alive\r\n" in keep_alive


def test_lane_follows_a_reload() -> None:
    """After update() a lane takes the new routes: a profile now restricted is not answered."""
    lanes = _Lanes()
    lane = lanes.lane("unix", ME)
    assert _get(lane, b"/v1/token/other") is not None
    chosen = lane.chosen
    restricted = profile_config("other", allowed_uids=frozenset({ME.uid + 1}))
    lanes.hot.update({"default": profile_config("default"), "other": restricted}, "default")
    assert lane.serve(chosen) is None
    assert _get(lane, b"/v1/token/other") is None


# --- over real sockets: the same bytes again (replayed) keep the rules -----------------------


async def _warm(c: Client, path: str = "/v1/token") -> None:
    """Three identical GETs: the general path, the lane, then the replayed bytes."""
    for _ in range(3):
        r = await c.get(path)
        assert r.status == 200, r.body


@pytest.mark.parametrize(
    ("build", "status"),
    [
        (lambda c: c.build("GET", "/v1/token", auth=False), 401),
        (lambda c: c.build("GET", "/v1/token", auth=False, headers=[("X-Colt-Broker", "x")]), 403),
        (lambda c: c.build("GET", "/v1/token", host="evil.example"), 403),
    ],
    ids=["no key", "wrong key", "foreign host"],
)
async def test_hot_tcp_connection_still_refuses_a_bad_request(
    h: Harness, build: object, status: int
) -> None:
    """After hot answers on a TCP connection, a request without the key or with a foreign Host
    is refused as before (and the connection closed)."""
    async with h.tcp() as c:
        await _warm(c)
        await c.send(build(c))  # type: ignore[operator]  # the parametrized builder
        r = await c.read_response()
        assert r.status == status
        assert await c.read_to_eof() == b""


async def test_peer_not_allowed_is_refused_on_a_hot_connection(sockdir: Path) -> None:
    """A Unix peer not in allowed_uids is refused the restricted profile after hot answers."""
    profiles = default_profiles()
    profiles["other"] = profile_config("other", allowed_uids=frozenset({os.getuid() + 1}))
    async with running(sockdir, profiles=profiles) as h, h.unix() as c:
        await _warm(c)
        for _ in range(2):
            r = await c.get("/v1/token/other")
            assert r.status == 403 and b"token-other" not in r.body


async def test_token_under_min_valid_is_not_replayed(h: Harness) -> None:
    """The same request bytes again, once the token is under min_valid: no token, a 503."""
    h.source.issue("default", "token-short", lifetime=100)
    async with h.unix() as c:
        await _warm(c)
        h.clock.advance(41)
        r = await c.get("/v1/token")
    assert r.status == 503 and b"token-short" not in r.body


async def test_new_token_replaces_the_replayed_answer(h: Harness) -> None:
    """A refreshed token is served to the very next repeated request."""
    async with h.unix() as c:
        await _warm(c)
        h.source.issue("default", "token-default-2")
        assert (await c.get("/v1/token")).json()["access_token"] == "token-default-2"


async def test_pipelined_hot_slow_hot_answered_in_order(h: Harness) -> None:
    """Hot, waiting, hot requests in one write are answered in request order."""
    release = h.hold_refreshes()
    async with h.unix() as c:
        await _warm(c)
        hot = c.build("GET", "/v1/token/other")
        await c.send(hot + c.build("GET", "/v1/token?min_valid=1801") + hot)
        first = await c.read_response()
        await anyio.wait_all_tasks_blocked()
        release.set()
        second, third = await c.read_response(), await c.read_response()
    assert first.json()["access_token"] == "token-other-1"
    assert second.json()["access_token"] == "token-default-2"
    assert third.json()["access_token"] == "token-other-1"


async def test_repeated_request_waits_behind_a_pending_one(h: Harness) -> None:
    """The same bytes again, sent while a waiting request is pending, are answered after it."""
    release = h.hold_refreshes()
    async with h.unix() as c:
        await _warm(c, "/v1/token/other")
        await c.send(c.build("GET", "/v1/token?min_valid=1801"))
        await anyio.wait_all_tasks_blocked()
        await c.send(c.build("GET", "/v1/token/other"))
        await anyio.wait_all_tasks_blocked()
        release.set()
        first, second = await c.read_response(), await c.read_response()
    assert first.json()["access_token"] == "token-default-2"
    assert second.json()["access_token"] == "token-other-1"


async def test_hot_answers_are_counted(h: Harness) -> None:
    """Every hot answer counts in colt_broker_http_requests_total."""
    async with h.unix() as c:
        await _warm(c)
        await _warm(c)
    assert h.metrics.requests[("default", "unix", 200)] == 6


async def test_hot_connection_still_closes_when_idle(sockdir: Path) -> None:
    """A connection that got hot answers is closed once idle (within twice idle_timeout)."""
    async with running(sockdir, limits=Limits(idle_timeout=0.2)) as h, h.unix() as c:
        await _warm(c)
        assert await c.read_to_eof() == b""


async def test_slow_request_after_hot_answers_times_out(sockdir: Path) -> None:
    """After hot answers, a request left half-sent still gets 408 at header_timeout."""
    async with running(sockdir, limits=Limits(header_timeout=0.3)) as h, h.unix() as c:
        await _warm(c)
        await c.send(b"GET /v1/token HTTP/1.1\r\nHost: x\r\n")
        r = await c.read_response()
        assert r.status == 408
        assert await c.read_to_eof() == b""


async def test_request_split_across_writes_is_answered(h: Harness) -> None:
    """A hot request arriving in two pieces is answered once, and the next whole one too."""
    async with h.unix() as c:
        await _warm(c)
        data = c.build("GET", "/v1/token")
        await c.send(data[:10])
        await anyio.wait_all_tasks_blocked()
        await c.send(data[10:])
        assert (await c.read_response()).status == 200
        assert (await c.get("/v1/token")).status == 200


async def test_debug_logging_keeps_the_lane_shut(h: Harness) -> None:
    """At "debug" every served token is logged: the general path answers every request."""
    configure_logging("json", "debug", stream=io.StringIO())
    with structlog.testing.capture_logs() as logs:
        async with h.unix() as c:
            await _warm(c)
    assert [e["event"] for e in logs].count("token.served") == 2


async def test_head_and_close_take_the_general_path(h: Harness) -> None:
    """HEAD gets no body and Connection: close is honoured on a hot connection."""
    async with h.unix() as c:
        await _warm(c)
        head = await c.request("HEAD", "/v1/token")
        assert head.status == 200 and head.body == b""
        r = await c.get("/v1/token", headers=[("Connection", "close")])
        assert r.status == 200 and r.headers["connection"] == "close"
        assert await c.read_to_eof() == b""
