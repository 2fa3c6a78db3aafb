"""broker.client against a real daemon (in this process, on its own loop thread) and emulator."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from _daemon import InProcessDaemon, closed_tcp_port, in_process_daemon

import broker._client_tokens
import broker.client
from broker.client import (
    BrokerUnavailable,
    ColtAuth,
    ProfileState,
    TokenUnavailable,
    aget_token,
    clear_cache,
    get_token,
    status,
)
from broker.emulator import RESOURCE_PREFIX, Fault

NUMBERS = RESOURCE_PREFIX + "v1/numbers"


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def _use(daemon: InProcessDaemon, monkeypatch: pytest.MonkeyPatch) -> InProcessDaemon:
    for name, value in daemon.environ.items():
        monkeypatch.setenv(name, value)
    return daemon


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessDaemon]:
    with in_process_daemon() as running:
        yield _use(running, monkeypatch)


@pytest.fixture
def restarted(monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessDaemon]:
    """A daemon that restored its token from disk (no refresh of its own in progress)."""
    with in_process_daemon(restored=True) as running:
        yield _use(running, monkeypatch)


# --- the public surface ----------------------------------------------------------------------


def test_public_names_are_exactly_the_documented_ones() -> None:
    """broker.client exports the documented API and nothing else."""
    assert sorted(broker.client.__all__) == sorted(
        [
            "BrokerUnavailable",
            "ColtAuth",
            "ProfileState",
            "TokenUnavailable",
            "aget_token",
            "clear_cache",
            "get_token",
            "status",
        ]
    )
    assert all(getattr(broker.client, name) is not None for name in broker.client.__all__)
    assert issubclass(ColtAuth, httpx.Auth)


def test_importing_the_client_pulls_in_neither_httpx_anyio_nor_ipython() -> None:
    """`import broker.client` (and broker.jupyter) stay light: no httpx, anyio or IPython."""
    code = (
        "import sys, json, broker.client, broker.jupyter; "
        "print(json.dumps([m for m in ('httpx', 'anyio', 'IPython') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(out.stdout) == []


# --- get_token / aget_token --------------------------------------------------------------------


def test_get_token_returns_a_token_the_api_accepts(daemon: InProcessDaemon) -> None:
    """get_token() hands out the daemon's current token, which the emulator verifies."""
    token = get_token()
    assert daemon.emulator.verify(token)["sub"] == "demo-client"


def test_cached_calls_make_no_second_request_to_the_daemon(daemon: InProcessDaemon) -> None:
    """Repeated calls within the token's validity are served in-process: one daemon request."""
    first = get_token()
    assert [get_token() for _ in range(100)] == [first] * 100
    assert get_token(min_valid=600) == first
    assert daemon.served() == 1


def test_threads_share_one_request(daemon: InProcessDaemon) -> None:
    """Eight threads missing the cache at once make one daemon request and get one token."""
    barrier = threading.Barrier(8)
    tokens: list[str] = []

    def worker() -> None:
        barrier.wait(timeout=5)
        tokens.append(get_token())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert daemon.served() == 1


@pytest.mark.anyio
async def test_get_token_works_inside_a_running_event_loop(daemon: InProcessDaemon) -> None:
    """The blocking get_token() works from a coroutine (no asyncio.run); aget_token shares it."""
    token = get_token()
    assert await aget_token() == token
    assert daemon.served() == 1


@pytest.mark.anyio
async def test_aget_token_fetches_on_a_miss(daemon: InProcessDaemon) -> None:
    """aget_token() asks the daemon from a worker thread on a miss, then serves from cache."""
    token = await aget_token()
    assert await aget_token() == token == get_token()
    assert daemon.served() == 1


@pytest.mark.anyio
async def test_a_cancelled_aget_token_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling aget_token() while the daemon is silent does not wait out the request."""
    with (
        tempfile.TemporaryDirectory(prefix="cb-") as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent,
        closed_tcp_port() as port,
    ):
        silent.bind(f"{tmp}/silent.sock")
        silent.listen(1)  # connects succeed; nothing is ever answered
        monkeypatch.setenv("COLT_BROKER_SOCKET", f"{tmp}/silent.sock")
        monkeypatch.setenv("COLT_BROKER_URL", f"http://127.0.0.1:{port}")
        started = time.monotonic()
        with anyio.move_on_after(0.2) as scope:
            await aget_token()
        assert scope.cancelled_caught
        assert time.monotonic() - started < 5  # the request itself would block for 30 s


def test_aget_token_in_a_plain_asyncio_program(daemon: InProcessDaemon) -> None:
    """aget_token() works on an event loop that anyio did not start (asyncio.run)."""
    token = asyncio.run(aget_token())
    assert daemon.emulator.verify(token)


def test_a_long_lived_client_rolls_over_to_the_next_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With 2 s tokens, a client that keeps asking gets a new token, never an expired one."""
    settings: dict[str, Any] = {
        "min_valid": 0.2,
        "refresh_ahead": 0.5,
        "refresh_jitter": 0.0,
        "max_requests_per_minute": 60,
    }
    with in_process_daemon(token_lifetime=2.0, **settings) as running:
        daemon = _use(running, monkeypatch)
        first = get_token(min_valid=0.2)
        token, give_up, calls = first, time.monotonic() + 6, 1  # the token lives 2 s
        while token == first:
            assert time.monotonic() < give_up, "no new token within 6 s"
            calls += 1
            time.sleep(0.05)  # real time must pass: that is the behaviour under test
            token = get_token(min_valid=0.2)
            claims = daemon.emulator.verify(token)  # raises once expired
            assert claims["exp"] - time.time() >= 0.2
        # Most calls were cached. (Not all but two: the daemon floors expires_in to whole
        # seconds, so with 2 s tokens the client's deadline is up to half the lifetime early.)
        assert 2 <= daemon.served() <= calls // 2, (daemon.served(), calls)


def test_min_valid_must_not_be_negative(daemon: InProcessDaemon) -> None:
    """A negative min_valid is refused even when a token is cached (it could be expired)."""
    get_token()
    with pytest.raises(ValueError, match="min_valid"):
        get_token(min_valid=-5)


# --- errors ------------------------------------------------------------------------------------


def test_broker_unavailable_names_every_place_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """With no daemon, the error names the socket and URL tried and how to start one."""
    with closed_tcp_port() as port:
        monkeypatch.setenv("COLT_BROKER_SOCKET", str(tmp_path / "nowhere.sock"))
        monkeypatch.setenv("COLT_BROKER_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(BrokerUnavailable) as caught:
            get_token()
        with pytest.raises(BrokerUnavailable):
            asyncio.run(aget_token())
    message = str(caught.value)
    assert f"unix socket {tmp_path / 'nowhere.sock'} (no such socket)" in message
    assert f"http://127.0.0.1:{port} (connection refused)" in message
    assert "colt-broker serve" in message


def test_token_unavailable_carries_the_brokers_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """When upstream throttles, TokenUnavailable has the problem's status, detail, Retry-After."""
    throttled = Fault(status=429, headers={"Retry-After": "120"})
    with in_process_daemon(faults=(throttled,)) as running:
        _use(running, monkeypatch)
        with pytest.raises(TokenUnavailable) as caught:
            get_token()
    exc = caught.value
    assert exc.profile == "default"
    assert exc.problem["status"] == 503
    upstream = exc.problem["upstream"]
    assert isinstance(upstream, dict)
    assert upstream["status"] == 429 and upstream["tracking_id"]
    assert exc.retry_after is not None and 100 < exc.retry_after <= 120
    assert str(exc.problem["detail"]) in str(exc)
    assert f"retry after {exc.retry_after:g} s" in str(exc)


def test_an_unknown_profile_is_a_token_unavailable_with_404(daemon: InProcessDaemon) -> None:
    """Asking for a profile the daemon lacks says which profiles it has."""
    with pytest.raises(TokenUnavailable, match="Configured profiles: default") as caught:
        get_token("nope")
    assert caught.value.problem["status"] == 404


def test_status_returns_profile_states(daemon: InProcessDaemon) -> None:
    """status() gives one ProfileState per profile, with no token in it."""
    token = get_token()
    (state,) = status()
    assert isinstance(state, ProfileState)
    assert (state.profile, state.valid, state.last_error) == ("default", True, None)
    assert token not in repr(state)


# --- ColtAuth ----------------------------------------------------------------------------------


def test_colt_auth_retries_once_with_a_fresh_token_after_a_401(restarted: InProcessDaemon) -> None:
    """A revoked token's 401 is reported; the retry carries the new token and succeeds."""
    old = get_token()
    restarted.revoke(old)
    with httpx.Client(base_url=restarted.emulator.base_url, auth=ColtAuth(), timeout=10) as api:
        response = api.get(NUMBERS)
    assert response.status_code == 200, response.text
    assert [r.status_code for r in response.history] == [401]
    assert restarted.emulator.resource_requests == 2
    assert restarted.reports() == 1
    assert get_token() != old  # the cache holds the new token
    assert restarted.served() == 2  # the first GET and the refresh; get_token() above was cached
    assert restarted.emulator.count() == 1  # the restored token cost none, the refresh one


@pytest.mark.anyio
async def test_async_colt_auth_retries_once_after_a_401(restarted: InProcessDaemon) -> None:
    """The same with httpx.AsyncClient."""
    old = await aget_token()
    restarted.revoke(old)
    async with httpx.AsyncClient(
        base_url=restarted.emulator.base_url, auth=ColtAuth(), timeout=10
    ) as api:
        response = await api.get(NUMBERS)
    assert response.status_code == 200, response.text
    assert [r.status_code for r in response.history] == [401]
    assert restarted.reports() == 1


class RejectingApi:
    """An API that answers every request with ``status`` and records what it was sent."""

    def __init__(self, status: int = 401) -> None:
        self.status = status
        self.seen: list[tuple[str, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.headers["authorization"], request.read()))
        return httpx.Response(self.status)


def test_colt_auth_retries_only_once(restarted: InProcessDaemon) -> None:
    """If the refreshed token is rejected too, that 401 goes back to the caller."""
    api = RejectingApi()
    with httpx.Client(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        response = client.post("http://api.test/x", json={"n": 1})
    assert response.status_code == 401
    assert len(api.seen) == 2
    (first_auth, first_body), (second_auth, second_body) = api.seen
    assert first_auth != second_auth and first_body == second_body == b'{"n":1}'
    assert restarted.reports() == 1


@pytest.mark.anyio
async def test_async_colt_auth_retries_only_once(restarted: InProcessDaemon) -> None:
    """With httpx.AsyncClient too, a 401 to the refreshed token goes back to the caller."""
    api = RejectingApi()
    async with httpx.AsyncClient(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        response = await client.post("http://api.test/x", json={"n": 1})
    assert response.status_code == 401
    assert len(api.seen) == 2
    assert api.seen[0][0] != api.seen[1][0]
    assert restarted.reports() == 1


def _refresh_finds_nothing_newer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker answers a report with the very token reported (its refresh failed)."""
    monkeypatch.setattr(
        broker._client_tokens, "report_rejected", lambda profile, token, min_valid: token
    )


def test_colt_auth_does_not_resend_the_token_that_was_refused(
    restarted: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker has nothing newer than the refused token, the 401 is not retried."""
    _refresh_finds_nothing_newer(monkeypatch)
    api = RejectingApi()
    with httpx.Client(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        assert client.get("http://api.test/x").status_code == 401
    assert len(api.seen) == 1


@pytest.mark.anyio
async def test_async_colt_auth_does_not_resend_the_token_that_was_refused(
    restarted: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with httpx.AsyncClient."""
    _refresh_finds_nothing_newer(monkeypatch)
    api = RejectingApi()
    async with httpx.AsyncClient(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        assert (await client.get("http://api.test/x")).status_code == 401
    assert len(api.seen) == 1


def test_colt_auth_does_not_replay_a_streaming_body(restarted: InProcessDaemon) -> None:
    """A streaming request is sent once and its 401 returned; the token is still reported."""
    old = get_token()
    api = RejectingApi()
    with httpx.Client(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        response = client.post("http://api.test/x", content=iter([b"chunk"]))
    assert response.status_code == 401
    assert len(api.seen) == 1
    assert restarted.reports() == 1
    assert get_token() != old  # the caller's own retry gets the new token


def test_colt_auth_leaves_other_refusals_alone(restarted: InProcessDaemon) -> None:
    """Only a 401 means a bad token: a 403 is neither reported nor retried."""
    api = RejectingApi(403)
    with httpx.Client(transport=httpx.MockTransport(api), auth=ColtAuth()) as client:
        assert client.get("http://api.test/x").status_code == 403
    assert len(api.seen) == 1
    assert restarted.reports() == 0
