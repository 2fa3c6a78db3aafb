"""The fault matrix, one fault at a time: what consumers, status, problems and logs see.

Every row of ``_faults.CASES`` runs in the situations where it matters:

* cold: no token yet. A consumer is already waiting when the engine makes its first request.
* held: a valid token is held when the fault starts. A consumer reports that token rejected
  (``report_rejected``), which forces the refresh now instead of at its scheduled time.

No backoff is waited out here: each test checks the engine's plan (``status()``, the
consumer's ``retry_after``, the problem's ``Retry-After``) against the lifecycle's policy, and
that consumers arriving meanwhile cause no request. ``test_faults_windows.py`` lets real time
pass and counts what upstream sees.

Backends: every row runs on asyncio; the rows marked ``uvloop`` in the table (one or two per
family of faults) run on uvloop too. The rows differ in what upstream does, not in how the loop
runs the engine, and running all of them twice would double the suite's time for little.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import anyio
import pytest
from _faults import (
    CASES,
    COLD,
    HELD,
    PROFILE,
    TIMEOUT,
    Case,
    Scenario,
    check_secret_free,
    check_valid,
    consume,
    first_delay,
    matrix,
    scenario,
)
from structlog.testing import capture_logs

from broker._http._problem import token_unavailable
from broker._token import Token
from broker.exceptions import TokenUnavailable

pytestmark = pytest.mark.anyio

# A first consumer waits this long past the moment the first attempt should fail (at once, or
# after upstream_timeout when the fault hangs): its outcome arrives well before, and the retry,
# 0.5 s at the soonest after that failure, well after; so it is told to come back, not kept.
WAIT = 0.25
ROUNDING = 0.06  # status rounds to 0.1 s
# Kinds the lifecycle judges from a 200 it received; the engine gives them that 200's status
# and tracking id.
JUDGED = ("no_progress", "too_short_lived")


@pytest.mark.parametrize(("case", "anyio_backend"), matrix(CASES, COLD))
async def test_cold_start(case: Case) -> None:
    """With no token yet, a fault gives waiting consumers a clear error after one request."""
    with capture_logs() as logs:
        async with scenario(case) as s:
            await s.start_fault()
            outcome = await _first_consumer(s)
            if case.kind is None:
                assert isinstance(outcome, Token), f"no token: {outcome}"
                _check_new_token(s, outcome)
                texts = _texts(s, [])
            else:
                assert isinstance(outcome, TokenUnavailable), "a token despite the fault"
                assert len(s.attempts) == 1, "the waiting consumer saw more than one attempt"
                _check_refusal(s, outcome)
                others = await _consumers_during_backoff(s)
                _check_status(s, valid=False, state="failed")
                texts = _texts(s, [outcome, *others])
            _check_upstream_saw(s)
    _check_logs(s, logs, texts)


@pytest.mark.parametrize(("case", "anyio_backend"), matrix(CASES, HELD))
async def test_token_held(case: Case) -> None:
    """With a valid token held, a fault never costs consumers that token, and costs one request."""
    with capture_logs() as logs:
        async with scenario(case) as s:
            await s.start_engine()
            s.held = held = await consume(s, s.engine.get(PROFILE, min_valid=None, timeout=5))
            planned = time.monotonic() + _next_in(s)  # the scheduled refresh, before the fault
            await s.start_fault()
            got = await consume(s, s.engine.report_rejected(PROFILE, held.sha256, timeout=5))
            assert len(s.attempts) == 2, "a report must cause exactly one request"
            if case.kind is None:
                assert got.access_token != held.access_token, "the usable new token was not taken"
                _check_new_token(s, got)
                texts = _texts(s, [])
            else:
                assert got.access_token == held.access_token, "the valid held token was dropped"
                again = await consume(s, s.engine.get(PROFILE, min_valid=None, timeout=0.05))
                assert again.access_token == held.access_token
                _check_status(s, valid=True, state=("fresh", "stale"), floor=planned)
                texts = _texts(s, [await _consumer_needing_more(s, held)])
            _check_upstream_saw(s)
    _check_logs(s, logs, texts)


HANG_CASE = next(case for case in CASES if case.hangs)


async def test_a_consumer_giving_up_during_a_hanging_request_leaves_on_time() -> None:
    """A consumer whose wait ends while upstream hangs leaves on time; nothing more is asked."""
    async with scenario(HANG_CASE) as s:
        await s.start_fault()
        await s.start_engine()
        with anyio.fail_after(TIMEOUT), pytest.raises(TokenUnavailable):
            await s.engine.get(PROFILE, min_valid=None, timeout=0.05)
        assert len(s.attempts) == 1 and s.status().state == "refreshing"


async def test_a_consumer_giving_up_during_a_hanging_request_is_told_why() -> None:
    """That consumer learns a token request is under way, and is not invited to retry at once."""
    async with scenario(HANG_CASE) as s:
        await s.start_fault()
        await s.start_engine()
        with pytest.raises(TokenUnavailable) as caught:
            await s.engine.get(PROFILE, min_valid=None, timeout=0.05)
        assert str(caught.value) != f"profile {PROFILE!r} has no valid token"
        assert caught.value.retry_after is None or caught.value.retry_after > 0


# -- consumers ---------------------------------------------------------------------------------


async def _first_consumer(s: Scenario) -> Token | TokenUnavailable:
    """What a consumer, waiting from before the engine's first request, gets."""
    outcome: list[Token | TokenUnavailable] = []

    async def consumer() -> None:
        before = time.monotonic()
        try:
            wait = WAIT + (TIMEOUT if s.case.hangs else 0.0)
            token = await s.engine.get(PROFILE, min_valid=None, timeout=wait)
        except TokenUnavailable as exc:
            outcome.append(exc)
        else:
            check_valid(s, token, before)
            outcome.append(token)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await anyio.wait_all_tasks_blocked()  # the consumer waits on the engine's outcome
            await s.start_engine()
    return outcome[0]


async def _consumers_during_backoff(s: Scenario) -> list[TokenUnavailable]:
    """Twenty consumers arriving during the backoff are refused at once, without a request."""
    refusals: list[TokenUnavailable] = []

    async def consumer() -> None:
        with pytest.raises(TokenUnavailable) as caught:
            await s.engine.get(PROFILE, min_valid=None, timeout=0.05)
        refusals.append(caught.value)

    before = len(s.attempts)
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(consumer)
    assert len(s.attempts) == before, "consumers during the backoff caused a request"
    assert all(r.cause is refusals[0].cause for r in refusals)
    return refusals


async def _consumer_needing_more(s: Scenario, held: Token) -> TokenUnavailable:
    """A consumer that needs more than the held token has left learns why none is coming."""
    with pytest.raises(TokenUnavailable) as caught:
        await s.engine.get(PROFILE, min_valid=held.lifetime, timeout=0.05)
    _check_refusal(s, caught.value)
    assert len(s.attempts) == 2, "a consumer needing more broke through the backoff"
    return caught.value


# -- checks ------------------------------------------------------------------------------------


def _check_new_token(s: Scenario, token: Token) -> None:
    """A usable token: believed to live what the table says, no longer."""
    expected = s.case.lifetime or s.lifetime
    assert token.lifetime == pytest.approx(expected, abs=0.05), "wrong lifetime believed"


def _check_refusal(s: Scenario, exc: TokenUnavailable) -> None:
    """The consumer's error says what upstream did, and when asking again makes sense."""
    case, text = s.case, str(exc)
    assert case.says in text, f"{text!r} does not say {case.says!r}"
    if case.kind == "too_short_lived":  # refused before any wait: no upstream error to carry
        return
    assert text.startswith(f"profile {PROFILE!r} has no valid token: ")
    assert exc.cause is not None and exc.cause.kind == case.kind, f"cause: {exc.cause!r}"
    detail = exc.cause.detail
    assert (detail.status, detail.code) == (case.status, case.code), f"detail: {detail}"
    assert detail.tracking_id, "no tracking id to quote"
    if case.kind not in JUDGED:
        assert detail.tracking_id in text, "the message does not quote the tracking id"
    if case.excerpt:
        assert case.excerpt in (detail.excerpt or ""), f"excerpt: {detail.excerpt!r}"
    _check_wait(s, exc.retry_after, "retry_after")
    _check_problem(exc)


def _check_problem(exc: TokenUnavailable) -> None:
    """The problem response carries the upstream detail and when to ask again."""
    assert exc.cause is not None
    problem = token_unavailable(exc, PROFILE)
    body = problem.as_dict()
    assert body["status"] == 503
    assert body["type"] == "urn:colt-broker:problem:" + exc.cause.kind.replace("_", "-")
    assert str(exc) in str(body["detail"])
    assert body["upstream"] == exc.cause.detail.as_dict()
    assert exc.retry_after is not None
    assert ("Retry-After", str(math.ceil(exc.retry_after))) in problem.response_headers()


def _check_status(
    s: Scenario, *, valid: bool, state: str | tuple[str, ...], floor: float = 0.0
) -> None:
    """status() shows the last error's kind and detail, and the policy's next attempt."""
    status, case = s.status(), s.case
    assert status.valid is valid and status.state in state, f"{status.state}, valid={status.valid}"
    error = status.last_error
    assert error is not None and error.kind == case.kind, f"last_error: {error}"
    assert error.detail.get("status") == case.status and error.detail.get("code") == case.code
    assert status.counters["upstream_requests"] == len(s.attempts)
    assert status.counters["failures"] == 1
    _check_wait(s, _next_in(s), "next_refresh_in", floor=floor)


def _check_wait(s: Scenario, got: float | None, what: str, floor: float = 0.0) -> None:
    """``got`` seconds until the next attempt: the policy's delay after the failed one.

    The failure came after the attempt was sent and before now, so the delay counted from it
    ends in [sent + delay, now + delay]; a scheduled refresh (``floor``, monotonic) may be later.
    """
    now = time.monotonic()
    delay = first_delay(s.case)
    low = max(s.attempts[-1] + delay - s.case.wait_slack, floor) - now - ROUNDING
    high = max(now + delay, floor) - now + ROUNDING
    assert got is not None and low <= got <= high, f"{what} {got}, not in [{low:.2f}, {high:.2f}]"


def _check_upstream_saw(s: Scenario) -> None:
    """Upstream saw each request the broker sent (but refused ones), each with a tracking id."""
    seen = s.emu.requests
    sent = len(s.attempts) - (1 if s.case.refused else 0)  # the one attempt on a closed port
    assert len(seen) == sent, f"the emulator saw {len(seen)} requests, the broker sent {sent}"
    assert all(_tracking_ids(s)), "a request without a tracking id"


def _tracking_ids(s: Scenario) -> list[str | None]:
    """The tracking id of each request upstream saw, in the header the profile sends."""
    return [r.headers.get(s.config.tracking_header.lower()) for r in s.emu.requests]


def _check_logs(s: Scenario, logs: list[MutableMapping[str, Any]], texts: list[str]) -> None:
    """One upstream.failed line per failure, with kind and tracking id; nothing secret."""
    failed = [e for e in logs if e["event"] == "upstream.failed"]
    if s.case.kind is None:
        assert not failed and any(e["event"] == "token.refreshed" for e in logs)
        _check_skew_logged(s, logs)
    else:
        assert len(failed) == 1, f"{len(failed)} upstream.failed lines for one failure"
        assert failed[0]["kind"] == s.case.kind and failed[0]["status"] == s.case.status
        ids = _tracking_ids(s)
        assert failed[0]["tracking_id"] in ids or s.case.refused
    check_secret_free([str(e) for e in logs] + texts, [s.held.access_token] if s.held else [])


def _check_skew_logged(s: Scenario, logs: list[MutableMapping[str, Any]]) -> None:
    skews = [e["skew_s"] for e in logs if e["event"] == "upstream.clock_skew"]
    if s.case.skew is None:
        assert not skews, f"clock skew {skews} logged for a token with none"
    else:
        assert skews and skews[-1] == pytest.approx(s.case.skew, abs=5), f"skew logged: {skews}"


def _texts(s: Scenario, errors: Iterable[TokenUnavailable]) -> list[str]:
    """Everything a consumer or operator can read: errors, problems, status."""
    texts = [str(s.status().as_dict())]
    for exc in errors:
        texts += [str(exc), repr(exc.cause)]
        if exc.cause is not None:
            texts.append(str(token_unavailable(exc, PROFILE).as_dict()))
    return texts


def _next_in(s: Scenario) -> float:
    seconds = s.status().next_refresh_in
    assert seconds is not None, "no next attempt planned"
    return float(seconds)
