"""The fault matrix over real time: what upstream sees while consumers keep asking.

Backoff only shows when time passes, and the table has some sixty rows: one after another,
their windows would take minutes. So each test here runs every row of ``_faults.CASES`` at
once, each row with its own emulator and engine in the same event loop, consumers polling
every 50 ms, and reports every row that broke a rule. The checks are one-sided where timing
is involved (an attempt may come late on a busy machine, never early), so running rows side by
side cannot make them fail; the one lower bound (a transient failure is retried within the
window) leaves most of a second of slack.

* cold: no token; for COLD_WINDOW the fault holds. Attempts must keep the policy's spacing
  (transient: 0.5, 1, 2 s with the jitter drawn at its shortest; rejected: minutes; 429: its
  Retry-After), and no token may be served unless the row's answer is usable.
* held: a token of HELD_LIFETIME is held when the fault starts and a consumer reports it; the
  window runs until that token has expired. It must be served while it has min_valid left, and
  never after; attempts keep the same spacing.

Account caps, and a 429 holding every profile of the account, close the file.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import pytest
from _faults import (
    CASES,
    COLD,
    HELD,
    PROFILE,
    Case,
    Scenario,
    backoff,
    check_secret_free,
    check_valid,
    consume,
    first_delay,
    scenario,
)
from structlog.testing import capture_logs

from broker._engine import Engine
from broker._token import Token
from broker.emulator import Fault
from broker.exceptions import TokenUnavailable

pytestmark = pytest.mark.anyio

COLD_WINDOW = 2.0
HELD_LIFETIME = 2.0
UPSTREAM_TIMEOUT = 0.5  # more room than one fault at a time: sixty rows share the loop
POLL = 0.05
SETUP = anyio.CapacityLimiter(8)  # rows fetch their first token a few at a time


@dataclass
class Seen:
    """What consumers got, each with the moments the call began and returned."""

    served: list[tuple[float, float, Token]] = field(default_factory=list)
    refused: list[tuple[float, float, TokenUnavailable]] = field(default_factory=list)


Row = Callable[[Case], Awaitable[list[str]]]


async def test_every_fault_from_a_cold_start_over_a_window() -> None:
    """With no token, every fault keeps attempts to the policy's pace and serves nothing bad."""
    await _every_row(COLD, _cold_row)


async def test_every_fault_with_a_token_held_through_its_expiry() -> None:
    """A held token is served through every fault while valid, never after; attempts back off."""
    await _every_row(HELD, _held_row)


async def _every_row(situation: str, row: Row) -> None:
    """Run ``row`` for every case at once; fail listing each case that broke a rule."""
    problems: dict[str, list[str]] = {}

    async def run(case: Case) -> None:
        try:
            problems[case.id] = await row(case)
        except Exception as error:  # reported per row below, with the rest
            problems[case.id] = [_describe(error)]
        problems[case.id] = _as_expected(case, situation, problems[case.id])

    with capture_logs() as logs, anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for case in CASES:
                if situation in case.where:
                    tg.start_soon(run, case)
    broken = {k: v for k, v in problems.items() if v}
    assert not broken, "\n".join(f"{k}: {'; '.join(v)}" for k, v in sorted(broken.items()))
    check_secret_free(str(e) for e in logs)


def _describe(error: BaseException) -> str:
    """The innermost error's type and first line (task groups wrap what a row raised)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _as_expected(case: Case, situation: str, problems: list[str]) -> list[str]:
    """A known engine bug (the table's ``xfail``) must still show; anything else must not."""
    if situation not in case.xfail:
        return problems
    return [] if problems else [f"XPASS: {case.xfail[situation]} no longer shows"]


# -- the two situations ------------------------------------------------------------------------


async def _cold_row(case: Case) -> list[str]:
    async with scenario(case, upstream_timeout=UPSTREAM_TIMEOUT) as s:
        await s.start_fault()
        start = time.monotonic()
        await s.start_engine()
        seen = await _poll(s, until=start + COLD_WINDOW)
        return _judge_consumers(s, seen, held=None) + _judge_attempts(s, start, start + COLD_WINDOW)


async def _held_row(case: Case) -> list[str]:
    async with scenario(case, lifetime=HELD_LIFETIME, upstream_timeout=UPSTREAM_TIMEOUT) as s:
        async with SETUP:
            await s.start_engine()
            s.held = held = await consume(s, s.engine.get(PROFILE, min_valid=None, timeout=5))
        await s.start_fault()
        start = time.monotonic()
        await consume(s, s.engine.report_rejected(PROFILE, held.sha256, timeout=5))
        until = held.expires_at + 0.1  # past expiry: nothing may be served by then
        seen = await _poll(s, until=until)
        return _judge_consumers(s, seen, held=held) + _judge_attempts(s, start, until)


async def _poll(s: Scenario, until: float) -> Seen:
    """A consumer asking every POLL seconds until ``until``; each token checked as served."""
    seen = Seen()
    while time.monotonic() < until:
        before = time.monotonic()
        try:
            token = await s.engine.get(PROFILE, min_valid=None, timeout=POLL)
        except TokenUnavailable as refusal:
            seen.refused.append((before, time.monotonic(), refusal))
        else:
            check_valid(s, token, before)  # valid for min_valid, and the issuer agrees
            seen.served.append((before, time.monotonic(), token))
        await anyio.sleep(POLL)  # a consumer's pace, not a wait for readiness
    return seen


# -- judging -----------------------------------------------------------------------------------


def _judge_consumers(s: Scenario, seen: Seen, held: Token | None) -> list[str]:
    """Failures serve nothing new; a held token serves until min_valid; refusals say why."""
    problems, case = [], s.case
    if case.kind is None:
        first = min((b for b, _, _ in seen.served), default=None)
        late = [r for b, _, r in seen.refused if first is None or b > first]
        return [f"refused after a usable token arrived: {late[0]}"] if late else []
    wrong = [t for _, _, t in seen.served if held is None or t.access_token != held.access_token]
    if wrong:
        problems.append(f"served a token other than the held one ({len(wrong)} times)")
    for _, after, refusal in seen.refused:
        if held is not None and held.remaining(after) >= s.config.min_valid:
            problems.append(f"refused with the held token still valid: {refusal}")
            break
        if refusal.cause is not None and refusal.cause.kind != case.kind:
            problems.append(f"refusal names {refusal.cause.kind}, not {case.kind}")
            break
    if held is not None and not seen.refused:
        problems.append("the expired held token was never refused")
    return problems


def _judge_attempts(s: Scenario, start: float, until: float) -> list[str]:
    """Attempts since the fault: spaced as the policy says, so at most what it allows."""
    times = [t for t in s.attempts if start <= t < until]
    if s.case.kind is None:
        lifetime = s.case.lifetime or s.lifetime
        most = 1 + int((until - start) / (0.7 * lifetime))  # one per refresh point
        return [f"{len(times)} attempts for a usable token"] if len(times) > most else []
    wait = backoff(s.case)
    problems = [
        f"attempt {n + 1} came {b - a:.3f} s after attempt {n}; the policy waits {wait(n):.3f} s"
        for n, (a, b) in enumerate(itertools.pairwise(times), start=1)
        if b - a < wait(n) - 0.001
    ]
    # One early "last chance" attempt before a held token stops serving is the rule too.
    extra = 1 if s.case.kind == "no_progress" else 0
    if extra and len(problems) == 1:
        problems = []
    fewest = 2 if s.case.kind == "upstream_unavailable" else 1  # a transient fault is retried
    if not fewest <= len(times) <= _most_attempts(wait, until - start) + extra:
        problems.append(f"{len(times)} attempts in {until - start:.1f} s")
    return problems


def _most_attempts(wait: Callable[[int], float], span: float) -> int:
    """How many attempts fit in ``span`` seconds if each failed at once and waited ``wait``."""
    count, at = 1, 0.0
    while (at := at + wait(count)) < span:
        count += 1
    return count


# -- account caps and the shared throttle ------------------------------------------------------


async def _storm(s: Scenario) -> None:
    s.emu.set_rule(lambda _request: Fault(status=503))


async def _nothing(s: Scenario) -> None:
    """The test switches its fault on itself."""


STORM = Case("503 storm", _storm, "upstream_unavailable", 503)
QUIET = Case("no fault yet", _nothing, None)


async def test_the_per_minute_cap_holds_under_a_storm() -> None:
    """Two requests a minute allowed: the third failure's retry waits for the minute, not 1 s."""
    case = replace(STORM, profile={"max_requests_per_minute": 2})
    async with scenario(case) as s:
        await s.start_fault()
        await s.start_engine()
        with anyio.fail_after(5):
            while len(s.attempts) < 2 or s.status().counters["failures"] < 2:
                await anyio.sleep(0.02)  # the backoff after the first failure: 0.5 s
        minute_ends = s.attempts[0] + 60 - time.monotonic()
        with pytest.raises(TokenUnavailable) as caught:
            await s.engine.get(PROFILE, min_valid=None, timeout=1)
        assert caught.value.retry_after == pytest.approx(minute_ends, abs=0.2)
        assert s.status().next_refresh_in == pytest.approx(minute_ends, abs=0.2)
        assert len(s.attempts) == s.emu.count() == 2


async def test_the_daily_cap_holds() -> None:
    """One request a day allowed: after a failure, the next waits for the day to turn."""
    case = replace(STORM, profile={"max_requests_per_day": 1})
    async with scenario(case) as s:
        await s.start_fault()
        await s.start_engine()
        with pytest.raises(TokenUnavailable) as caught:
            await s.engine.get(PROFILE, min_valid=None, timeout=1)
        assert caught.value.retry_after == pytest.approx(86_400, abs=1)
        assert len(s.attempts) == 1


async def test_caps_are_shared_by_the_profiles_of_an_account() -> None:
    """Two profiles of one account with a cap of 2 a minute: the third request waits."""
    async with _two_profiles(max_requests_per_minute=2) as (s, engine):
        a = await engine.get("a", min_valid=None, timeout=5)
        b = await engine.get("b", min_valid=None, timeout=5)
        again = await engine.report_rejected("b", b.sha256, timeout=0.5)
        assert again.access_token == b.access_token  # nothing newer could be had
        assert (await engine.report_rejected("a", a.sha256, timeout=0.5)) == a
        assert len(s.attempts) == s.emu.count() == 2
        waits = {st.profile: st.next_refresh_in for st in engine.status()}
        assert waits["b"] == pytest.approx(60, abs=1) and waits["a"] == pytest.approx(60, abs=1)


# Rows whose throttle outlasts the test by far (a 1 s one would end while it runs).
THROTTLES = [c for c in CASES if c.kind == "throttled" and COLD in c.where and first_delay(c) >= 30]


@pytest.mark.parametrize("case", THROTTLES, ids=str)
async def test_a_429_holds_every_profile_of_the_account(case: Case) -> None:
    """After one profile's 429, its sibling asks nothing until the wait is over."""
    async with _two_profiles() as (s, engine):
        b = await engine.get("b", min_valid=None, timeout=5)
        a = await engine.get("a", min_valid=None, timeout=5)
        await case.start(s)
        await engine.report_rejected("a", a.sha256, timeout=5)
        assert (await engine.report_rejected("b", b.sha256, timeout=0.2)) == b
        with pytest.raises(TokenUnavailable) as caught:
            await engine.get("b", min_valid=b.lifetime, timeout=0.2)
        assert len(s.attempts) == s.emu.count() == 3, "profile b asked while throttled"
        wait = first_delay(case) - case.wait_slack
        assert caught.value.retry_after is not None and caught.value.retry_after >= wait - 0.5


async def test_a_sibling_held_back_by_a_429_is_told_why() -> None:
    """The sibling profile's consumer learns that the account is throttled, not just 'no token'."""
    async with _two_profiles() as (s, engine):
        b = await engine.get("b", min_valid=None, timeout=5)
        a = await engine.get("a", min_valid=None, timeout=5)
        s.emu.set_rule(lambda _request: Fault(status=429, headers={"Retry-After": "30"}))
        await engine.report_rejected("a", a.sha256, timeout=5)
        with pytest.raises(TokenUnavailable) as caught:
            await engine.get("b", min_valid=b.lifetime, timeout=0.5)
        assert caught.value.cause is not None and caught.value.cause.kind == "throttled"


@asynccontextmanager
async def _two_profiles(**caps: Any) -> AsyncIterator[tuple[Scenario, Engine]]:
    """Profiles a and b of one account, running, with ``caps`` on the account."""
    async with scenario(replace(QUIET, profile=caps), names=("a", "b")) as s:
        await s.start_engine()
        yield s, s.engine
