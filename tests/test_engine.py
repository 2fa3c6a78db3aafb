"""The engine against the Colt emulator over real loopback HTTP."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from broker._engine import Engine, TokenSink
from broker._persist import TokenStore
from broker._profile import ProfileConfig, Secret
from broker._token import Token
from broker.emulator import Emulator, Fault
from broker.exceptions import TokenUnavailable

pytestmark = pytest.mark.anyio

SECRET = "made-up-secret-for-tests"
CLIENTS = {"cid-a": SECRET, "cid-b": SECRET, "cid-c": SECRET}


def profile(
    emulator: Emulator, name: str = "default", client_id: str = "cid-a", **overrides: object
) -> ProfileConfig:
    """A profile pointing at the emulator, with settings scaled for short test lifetimes."""
    base = ProfileConfig(
        name=name,
        client_id=client_id,
        secret=Secret(SECRET, "test"),
        token_url=emulator.token_url,
        account="acct",
        min_valid=0.5,
        refresh_ahead=0.3,
        refresh_jitter=0.05,
        upstream_timeout=2.0,
        max_requests_per_minute=1000,
        max_requests_per_day=10_000,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]  # test helper: field overrides


@asynccontextmanager
async def running(
    emulator: Emulator,
    profiles: list[ProfileConfig],
    store: TokenSink | None = None,
    rng: Callable[[], float] = lambda: 0.0,
) -> AsyncIterator[Engine]:
    """The emulator and an engine over it, both torn down at the end."""
    async with anyio.create_task_group() as tg, httpx.AsyncClient() as http:
        engine = Engine({p.name: p for p in profiles}, http=http, store=store, rng=rng)
        await tg.start(engine.run)
        yield engine
        tg.cancel_scope.cancel()


@asynccontextmanager
async def emulated(**kwargs: object) -> AsyncIterator[Emulator]:
    emulator = Emulator(CLIENTS, **kwargs)  # type: ignore[arg-type]  # forwarded keywords
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.run)
        yield emulator
        tg.cancel_scope.cancel()


async def test_200_concurrent_waiters_cause_one_upstream_request() -> None:
    """A cold start with 200 consumers asking at once makes exactly one token request."""
    async with emulated() as emu, running(emu, [profile(emu)]) as engine:
        tokens: list[Token] = []

        async def consumer() -> None:
            tokens.append(await engine.get("default", min_valid=None, timeout=5))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(consumer)
        assert len(tokens) == 200
        assert len({t.access_token for t in tokens}) == 1
        assert emu.count() == 1


async def test_rollover_across_short_lifetimes_never_hands_out_expired() -> None:
    """Over several 1.5 s lifetimes, tokens roll over ahead of expiry and none is served late."""
    async with emulated(token_lifetime=1.5) as emu, running(emu, [profile(emu)]) as engine:
        seen: set[str] = set()
        with anyio.fail_after(15):
            while len(seen) < 4:
                token = await engine.get("default", min_valid=None, timeout=5)
                now = anyio.current_time()
                assert token.remaining(now) >= 0.5, "served with less than min_valid left"
                emu.verify(token.access_token)  # the emulator agrees it is unexpired
                seen.add(token.access_token)
                await anyio.sleep(0.05)  # a consumer's pace, not a readiness wait
        assert emu.count() <= len(seen) + 1  # one request per lifetime (one may be in flight)


async def test_a_503_storm_is_served_from_the_cached_token_with_bounded_attempts() -> None:
    """Upstream failing after the first token: the token keeps being served; retries back off."""
    async with emulated(token_lifetime=4.0) as emu, running(emu, [profile(emu)]) as engine:
        first = await engine.get("default", min_valid=None, timeout=5)
        emu.inject(Fault(status=503, body=b'{"code":"001"}', times=1000))
        with anyio.fail_after(10):
            while anyio.current_time() < first.expires_at - 0.6:
                token = engine.current("default", anyio.current_time())
                assert token is not None and token.access_token == first.access_token
                await anyio.sleep(0.1)
        status = engine.status()[0]
        assert status.last_error is not None and status.last_error.kind == "upstream_unavailable"
        # Refresh starts at ~1.4 s left; with 1, 2, 4 s backoff at most a handful of attempts.
        assert 2 <= emu.count() <= 5


async def test_a_429_is_honoured_for_every_profile_of_the_account() -> None:
    """After a 429 with Retry-After, no profile of that account asks until it has passed."""
    async with emulated() as emu:
        a, b = profile(emu, "a", "cid-a"), profile(emu, "b", "cid-b")
        async with running(emu, [a, b]) as engine:
            token_a = await engine.get("a", min_valid=None, timeout=5)
            token_b = await engine.get("b", min_valid=None, timeout=5)
            assert emu.count() == 2
            emu.inject(Fault(status=429, headers={"Retry-After": "30"}, body=b"{}"))
            served = await engine.report_rejected("a", token_a.sha256, timeout=5)
            assert served.access_token == token_a.access_token  # nothing better to give
            assert emu.count() == 3
            # Profile b now wants a token it cannot have without asking upstream: it must wait.
            again = await engine.report_rejected("b", token_b.sha256, timeout=0.5)
            assert again.access_token == token_b.access_token
            await anyio.sleep(0.2)  # so that b's token has less than 1799.8 s left
            with pytest.raises(TokenUnavailable) as caught:
                await engine.get("b", min_valid=1799.95, timeout=1)
            assert emu.count() == 3, "profile b asked although its account is throttled"
            assert caught.value.retry_after is not None and caught.value.retry_after > 25
            status_b = next(s for s in engine.status() if s.profile == "b")
            assert status_b.next_refresh_in is not None and status_b.next_refresh_in > 25


async def test_rejected_credentials_do_not_loop() -> None:
    """A wrong secret gives one request, a clear error for waiters, and no retry for minutes."""
    async with emulated() as emu:
        bad = profile(emu, secret=Secret("wrong-secret-made-up", "test"))
        async with running(emu, [bad]) as engine:
            with capture_logs() as logs, pytest.raises(TokenUnavailable) as caught:
                await engine.get("default", min_valid=None, timeout=5)
            for _ in range(20):
                with pytest.raises(TokenUnavailable):
                    await engine.get("default", min_valid=None, timeout=0.05)
            await anyio.wait_all_tasks_blocked()
        assert emu.count() == 1
        assert "credentials_rejected" in str(caught.value.cause.kind if caught.value.cause else "")
        assert caught.value.retry_after is not None and caught.value.retry_after > 140
        failed = [e for e in logs if e["event"] == "upstream.failed"]
        assert failed and failed[0]["tracking_id"] and failed[0]["status"] == 401
        assert all(SECRET not in str(e) for e in logs)


async def test_a_restart_reuses_the_persisted_token_without_a_request(tmp_path: Path) -> None:
    """The token persists; a second engine (a restart) serves it and asks upstream nothing."""
    store = TokenStore(tmp_path / "state")
    async with emulated() as emu:
        p = profile(emu)
        async with running(emu, [p], store) as engine:
            first = await engine.get("default", min_valid=None, timeout=5)
        assert emu.count() == 1
        async with running(emu, [p], TokenStore(tmp_path / "state")) as engine:
            again = await engine.get("default", min_valid=None, timeout=5)
        assert again.access_token == first.access_token
        assert emu.count() == 1


async def test_a_report_of_the_current_token_refreshes_once() -> None:
    """Twenty concurrent reports of the served token cause one new request and a new token."""
    async with emulated() as emu, running(emu, [profile(emu)]) as engine:
        first = await engine.get("default", min_valid=None, timeout=5)
        answers: list[Token] = []

        async def report() -> None:
            answers.append(await engine.report_rejected("default", first.sha256, timeout=5))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(report)
        assert emu.count() == 2
        assert {a.access_token for a in answers} != {first.access_token}
        assert len({a.access_token for a in answers}) == 1


async def test_a_report_of_an_old_token_asks_upstream_nothing() -> None:
    """Reporting a token that is not the current one answers the current token, no request."""
    async with emulated() as emu, running(emu, [profile(emu)]) as engine:
        first = await engine.get("default", min_valid=None, timeout=5)
        stale = hashlib.sha256(b"a token replaced long ago").hexdigest()
        with anyio.fail_after(5):
            answer = await engine.report_rejected("default", stale, timeout=5)
        await anyio.wait_all_tasks_blocked()
        assert answer.access_token == first.access_token
        (status,) = engine.status()
        assert status.counters["upstream_requests"] == 1, "a report of an old token refreshed"
        assert emu.count() == 1


async def test_a_min_valid_beyond_the_token_lifetime_fails_clearly() -> None:
    """Asking for more than upstream's tokens ever live is refused, not waited on."""
    async with emulated(token_lifetime=60) as emu, running(emu, [profile(emu)]) as engine:
        await engine.get("default", min_valid=None, timeout=5)
        with pytest.raises(TokenUnavailable, match="less than the 120 s asked for"):
            await engine.get("default", min_valid=120, timeout=5)
        assert emu.count() == 1


async def test_a_larger_min_valid_waits_for_a_refresh() -> None:
    """A consumer needing more than the current token has left gets the next one."""
    async with emulated(token_lifetime=3.0) as emu, running(emu, [profile(emu)]) as engine:
        first = await engine.get("default", min_valid=None, timeout=5)
        with anyio.fail_after(5):
            while first.remaining(anyio.current_time()) > 2.5:
                await anyio.sleep(0.05)
        second = await engine.get("default", min_valid=2.8, timeout=5)
        assert second.access_token != first.access_token
        assert emu.count() == 2


async def test_update_keeps_unchanged_profiles_and_starts_new_ones() -> None:
    """A reload keeps tokens of unchanged profiles (and of changed ones with the same
    credentials), fetches for new profiles, and stops removed ones."""
    async with emulated() as emu:
        a, b = profile(emu, "a", "cid-a"), profile(emu, "b", "cid-b")
        async with running(emu, [a, b]) as engine:
            token_a = await engine.get("a", min_valid=None, timeout=5)
            token_b = await engine.get("b", min_valid=None, timeout=5)
            c = profile(emu, "c", "cid-c")
            await engine.update({"a": a, "b": replace(b, min_valid=0.6), "c": c})
            assert (await engine.get("a", min_valid=None, timeout=5)) is token_a
            assert (await engine.get("b", min_valid=None, timeout=5)) is token_b
            await engine.get("c", min_valid=None, timeout=5)
            assert emu.count() == 3
            await engine.update({"c": c})
            assert engine.profiles == ["c"]
            with pytest.raises(KeyError):
                engine.current("a", anyio.current_time())


async def test_the_watchdog_pings_only_while_every_profile_task_is_alive() -> None:
    """Heartbeats flow while the profile tasks decide; a dead task stops them."""
    beats: list[float] = []
    ticked = anyio.Event()

    def heartbeat() -> None:
        beats.append(anyio.current_time())
        if len(beats) >= 3:
            ticked.set()

    async with emulated() as emu, anyio.create_task_group() as tg, httpx.AsyncClient() as http:
        engine = Engine(
            {"default": profile(emu)}, http=http, heartbeat=heartbeat, heartbeat_interval=0.05
        )
        await tg.start(engine.run)
        with anyio.fail_after(5):
            await ticked.wait()
        scope = engine._profiles["default"].scope  # the profile's task, as if it had died
        assert scope is not None
        with capture_logs() as logs:
            scope.cancel()
            count = len(beats)
            with anyio.fail_after(5):
                while not any(e["event"] == "engine.stuck" for e in logs):
                    await anyio.sleep(0.05)
        assert len(beats) <= count + 2  # one may already have been on its way
        tg.cancel_scope.cancel()


class _StuckDisk:
    """A token store whose writes hang until released: a slow or stuck disk."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.saved: list[str] = []

    def load(self, profile: ProfileConfig) -> Token | None:
        return None

    def save(self, profile: ProfileConfig, token: Token) -> None:
        self.release.wait(10)
        self.saved.append(token.access_token)


async def test_consumers_and_reports_do_not_wait_on_the_disk() -> None:
    """A hanging state write delays neither the waiters of a refresh nor a report of its
    token: the report is answered with a new token, not the rejected one."""
    disk = _StuckDisk()
    async with emulated() as emu, running(emu, [profile(emu)], store=disk) as engine:
        with anyio.fail_after(10):
            first = await engine.get("default", min_valid=None, timeout=5)
            second = await engine.report_rejected("default", first.sha256, timeout=5)
        assert second.access_token != first.access_token
        disk.release.set()
    assert disk.saved == [first.access_token, second.access_token]


async def test_min_valid_zero_is_refused_a_token_below_the_profiles_floor() -> None:
    """A held token with less than the profile's min_valid left is not served even to a
    consumer asking for min_valid=0 (here refreshes fail, so no newer token replaces it)."""
    async with emulated(token_lifetime=2.0) as emu:
        p = profile(emu, min_valid=1.5, refresh_ahead=0.1, refresh_jitter=0.0)
        async with running(emu, [p]) as engine:
            first = await engine.get("default", min_valid=0, timeout=5)
            emu.inject(Fault(status=503, body=b'{"code":"001"}', times=1000))
            # Let the token age (no readiness to wait for: time itself is the input).
            await anyio.sleep(first.remaining(anyio.current_time()) - 1.5 + 0.1)
            with pytest.raises(TokenUnavailable):
                await engine.get("default", min_valid=0, timeout=0)


async def test_an_impossible_min_valid_asks_upstream_nothing() -> None:
    """A request for more than a token's whole lifetime is refused without a fetch."""
    async with emulated() as emu, running(emu, [profile(emu)]) as engine:
        await engine.get("default", min_valid=None, timeout=5)
        for _ in range(5):
            with pytest.raises(TokenUnavailable) as caught:
                await engine.get("default", min_valid=5000, timeout=5)
            assert caught.value.client_error
        assert emu.count() == 1


@pytest.mark.parametrize(
    ("cap", "values"),
    [
        ("max_requests_per_minute", (1, 1000)),
        ("max_requests_per_minute", (1000, 1)),
        ("max_requests_per_day", (1, 10_000)),
        ("max_requests_per_day", (10_000, 1)),
    ],
)
async def test_an_accounts_caps_are_the_strictest_of_its_profiles(
    cap: str, values: tuple[int, int]
) -> None:
    """Profiles sharing an account share one gate capped by the lowest cap any of them asks:
    at a cold start with a cap of one, one profile fetches and the other is held back."""
    async with emulated() as emu:
        a = profile(emu, "a", "cid-a", **{cap: values[0]})
        b = profile(emu, "b", "cid-b", **{cap: values[1]})
        async with running(emu, [a, b]) as engine:
            await anyio.wait_all_tasks_blocked()  # both profiles have decided: fetch or wait
            statuses = engine.status()
    sent = sorted(s.counters["upstream_requests"] for s in statuses)
    assert sent == [0, 1], f"{cap}: the account sent {sum(sent)} requests with a cap of 1"
    (held,) = (s for s in statuses if s.counters["upstream_requests"] == 0)
    assert held.next_refresh_in is not None and held.next_refresh_in > 50


async def test_a_reload_releases_consumers_waiting_on_the_old_profile() -> None:
    """A consumer waiting through a backoff when a reload replaces its profile is answered by
    the new profile at once, not left waiting until its timeout."""
    async with emulated() as emu:
        p = profile(emu)
        async with running(emu, [p]) as engine:
            emu.inject(Fault(status=503, body=b'{"code":"001"}'))
            answers: list[Token] = []

            async def consumer() -> None:
                answers.append(await engine.get("default", min_valid=None, timeout=4))

            with anyio.fail_after(3):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consumer)
                    while emu.count() < 1:
                        await anyio.sleep(0.01)
                    await anyio.wait_all_tasks_blocked()
                    await engine.update({"default": replace(p, min_valid=0.6)})
            assert len(answers) == 1


async def test_a_consumer_that_gave_up_leaves_no_need_behind() -> None:
    """A consumer whose wait for a refresh ended without one (a sibling's 429 closed the
    account meanwhile) leaves no need behind: no early refresh once the throttle passes."""
    async with emulated(token_lifetime=30.0) as emu:
        a, b = profile(emu, "a", "cid-a"), profile(emu, "b", "cid-b")
        async with running(emu, [a, b], rng=lambda: 0.999) as engine:
            token_a = await engine.get("a", min_valid=None, timeout=5)
            token_b = await engine.get("b", min_valid=None, timeout=5)
            # b's forced refresh fails: b backs off about a second, still serving its token.
            emu.inject(Fault(status=503, body=b"{}"))
            await engine.report_rejected("b", token_b.sha256, timeout=0.5)
            count = emu.count()
            await anyio.sleep(0.3)  # b's token now has less than 29.9 s left

            async def impatient() -> None:
                with pytest.raises(TokenUnavailable):
                    await engine.get("b", min_valid=29.9, timeout=1.5)

            async with anyio.create_task_group() as tg:
                tg.start_soon(impatient)
                await anyio.wait_all_tasks_blocked()
                # Before b's retry, a's 429 closes the account for 3 s.
                emu.inject(Fault(status=429, headers={"Retry-After": "3"}, body=b"{}"))
                await engine.report_rejected("a", token_a.sha256, timeout=0.5)
            assert emu.count() == count + 1  # a's request; b was held back
            await anyio.sleep(2.5)  # the throttle passes; a leftover need would fetch for b
            await anyio.wait_all_tasks_blocked()
            assert emu.count() == count + 1, "a refresh was made for a consumer that had gone"
