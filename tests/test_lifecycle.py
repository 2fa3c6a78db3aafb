"""The token lifecycle, driven with explicit times: no loop, no clock, no network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker._backoff import Backoff
from broker._lifecycle import (
    Fetch,
    Lifecycle,
    NoProgress,
    Policy,
    TooShortLived,
    Wait,
    decide,
)
from broker._throttle import AccountGate
from broker._token import Token, sha256_hex
from broker.exceptions import (
    CredentialsRejected,
    RequestRejected,
    Throttled,
    UpstreamDetail,
    UpstreamUnavailable,
)

LIFETIME = 1800.0


def token(obtained: float, lifetime: float = LIFETIME, value: str = "tok") -> Token:
    """A token that arrived at ``obtained`` (monotonic), valid ``lifetime`` seconds."""
    return Token(f"{value}-{obtained}", "Bearer", obtained, obtained + lifetime, 1e9 + obtained)


def fresh_machine(policy: Policy | None = None, at: float = 0.0, u: float = 0.0) -> Lifecycle:
    """A lifecycle that fetched its first token at ``at``."""
    m = Lifecycle(policy or Policy(min_valid=60, refresh_ahead=0.2, refresh_jitter=0.05))
    m.fetch_started(at)
    assert m.fetch_succeeded(token(at), at, u) is None
    return m


def gate(per_minute: int = 6, per_day: int = 500) -> AccountGate:
    return AccountGate("acct", per_minute=per_minute, per_day=per_day)


def transient() -> UpstreamUnavailable:
    return UpstreamUnavailable("503", UpstreamDetail(status=503, code="001"))


# -- states -------------------------------------------------------------------------------


def test_new_profile_is_empty_and_wants_a_token_now() -> None:
    """A profile with no token asks for one at once."""
    m = Lifecycle(Policy())
    assert m.state(5.0) == "empty"
    assert decide(m, gate(), 5.0) == Fetch()


def test_states_follow_the_token_through_its_life() -> None:
    """refreshing while in flight, fresh, stale past the refresh point, expired under min_valid."""
    m = Lifecycle(Policy(min_valid=60, refresh_ahead=0.2, refresh_jitter=0.0))
    m.fetch_started(0.0)
    assert m.state(0.0) == "refreshing"
    m.fetch_succeeded(token(0.0), 0.0, 0.0)
    assert m.state(1.0) == "fresh"
    assert m.state(1440.0) == "stale"  # 360 s (a fifth) left
    assert m.state(1741.0) == "expired"  # 59 s left: under min_valid
    assert m.state(1900.0) == "expired"


def test_a_failure_without_a_servable_token_is_failed() -> None:
    """A failed first attempt leaves the profile failed, not empty."""
    m = Lifecycle(Policy())
    m.fetch_started(0.0)
    m.fetch_failed(transient(), 0.0, 0.0)
    assert m.state(0.1) == "failed"
    assert m.servable(0.1) is None


# -- serving rules ------------------------------------------------------------------------


def test_never_serves_a_token_with_less_than_min_valid_left() -> None:
    """The profile's min_valid and a consumer's stricter one are both floors."""
    m = fresh_machine()
    assert m.servable(1740.0) is not None  # exactly 60 s left
    assert m.servable(1740.5) is None
    assert m.servable(1000.0, min_valid=900) is None
    assert m.servable(1000.0, min_valid=800) is not None


def test_never_serves_an_expired_token_even_with_min_valid_zero() -> None:
    """min_valid=0 still requires time left."""
    m = fresh_machine()
    assert m.servable(1799.0, min_valid=0) is not None
    assert m.servable(1800.0, min_valid=0) is None


@given(
    u=st.floats(min_value=0.0, max_value=0.999),
    ahead=st.floats(0.01, 0.6),
    jitter=st.floats(0.0, 0.3),
    lifetime=st.floats(61.0, 86400.0),
)
def test_refresh_point_lies_within_the_jittered_window(
    u: float, ahead: float, jitter: float, lifetime: float
) -> None:
    """Refresh starts once refresh_ahead (+ jitter) of the lifetime remains, early enough to
    leave min_valid plus a tenth of the lifetime, and never in the token's first tenth."""
    m = Lifecycle(Policy(min_valid=60, refresh_ahead=ahead, refresh_jitter=jitter))
    m.fetch_started(0.0)
    m.fetch_succeeded(token(0.0, lifetime), 0.0, u)
    lead = lifetime - m.refresh_at
    eps = 1e-6 * lifetime
    assert lead >= ahead * lifetime - eps
    assert lead >= min(60 + 0.1 * lifetime, 0.9 * lifetime) - eps
    assert lead <= max((ahead + jitter) * lifetime, 0.9 * lifetime) + eps


def test_jitter_spreads_refreshes_of_identical_tokens() -> None:
    """Two draws of the jitter give two refresh points, 90 s apart at the extremes."""
    early, late = fresh_machine(u=0.999), fresh_machine(u=0.0)
    assert late.refresh_at == pytest.approx(1800 - 360)
    assert early.refresh_at == pytest.approx(1800 - 450, abs=0.1)


def test_waits_until_the_refresh_point_then_fetches() -> None:
    """A fresh token means wait until its refresh point; past it, fetch."""
    m = fresh_machine()
    assert decide(m, gate(), 10.0) == Wait(1440.0)
    assert decide(m, gate(), 1440.0) == Fetch()


def test_a_consumer_needing_more_than_is_left_triggers_a_refresh() -> None:
    """want(min_valid) beyond the remaining time asks for a fetch now."""
    m = fresh_machine()
    m.want(1500.0)
    assert decide(m, gate(), 400.0) == Fetch()  # 1400 s left < 1500 asked


def test_tokens_shorter_than_a_requested_min_valid_are_known_hopeless() -> None:
    """After seeing a token's lifetime, a min_valid beyond it cannot be satisfied."""
    m = fresh_machine()
    assert m.cannot_satisfy(1801.0)
    assert not m.cannot_satisfy(1800.0)


def test_one_fetch_in_flight_at_a_time() -> None:
    """While a fetch is in flight nothing else is asked for, whatever consumers want."""
    m = Lifecycle(Policy())
    m.fetch_started(0.0)
    m.want(100.0)
    assert m.next_fetch_at(0.0) == float("inf")
    assert isinstance(decide(m, gate(), 0.0), Wait)


# -- failures -----------------------------------------------------------------------------


def test_transient_failures_back_off_exponentially_with_a_cap() -> None:
    """1 s, 2 s, 4 s ... capped at 60 s (u=0 gives the fixed half, u~1 the whole)."""
    m = Lifecycle(Policy(transient=Backoff(base=1.0, cap=60.0)))
    waits = []
    now = 0.0
    for _ in range(9):
        m.fetch_started(now)
        m.fetch_failed(transient(), now, 0.999999)
        waits.append(round(m.retry_at - now, 2))
        now = m.retry_at
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_jitter_keeps_half_of_the_delay_fixed() -> None:
    """Even with the unluckiest draw the delay is at least half the ceiling."""
    assert Backoff(base=1.0, cap=60.0).delay(4, 0.0) == 4.0
    assert Backoff(base=1.0, cap=60.0).delay(4, 0.5) == 6.0


def test_a_valid_token_keeps_being_served_while_refreshes_fail() -> None:
    """Upstream down past the refresh point: the stale token is still served until min_valid."""
    m = fresh_machine()
    now = 1440.0
    while now < 1740.0:
        assert m.servable(now) is not None
        m.fetch_started(now)
        m.fetch_failed(transient(), now, 0.5)
        assert m.state(now) == "stale"
        now = m.retry_at
    assert m.servable(1741.0) is None
    assert m.state(1741.0) == "failed"


def test_success_after_failures_resets_the_backoff() -> None:
    """A token after failures clears the failure count and the retry time."""
    m = Lifecycle(Policy())
    m.fetch_started(0.0)
    m.fetch_failed(transient(), 0.0, 0.0)
    m.fetch_started(1.0)
    assert m.fetch_succeeded(token(1.0), 1.0, 0.0) is None
    assert m.failures == 0
    assert m.retry_at == float("-inf")
    assert isinstance(m.last_error, UpstreamUnavailable)  # kept for status


@pytest.mark.parametrize(("retry_after", "expected"), [(7.0, 7.0), (None, 60.0), (1e9, 3600.0)])
def test_throttled_waits_retry_after_or_a_bounded_default(
    retry_after: float | None, expected: float
) -> None:
    """A 429 waits its Retry-After, 60 s without one, and never more than an hour."""
    m = Lifecycle(Policy())
    m.fetch_started(0.0)
    m.fetch_failed(Throttled("429", UpstreamDetail(status=429, retry_after=retry_after)), 0.0, 0.0)
    assert m.retry_at == expected


@pytest.mark.parametrize("error_type", [CredentialsRejected, RequestRejected])
def test_rejected_requests_retry_only_after_minutes(
    error_type: type[CredentialsRejected] | type[RequestRejected],
) -> None:
    """Credentials or request refused: five minutes, then growing up to an hour, never a spin."""
    m = Lifecycle(Policy())
    delays = []
    now = 0.0
    for _ in range(6):
        m.fetch_started(now)
        m.fetch_failed(error_type("401", UpstreamDetail(status=401, code="002")), now, 0.0)
        delays.append(m.retry_at - now)
        now = m.retry_at
    assert delays[0] >= 150.0
    assert all(d >= 150.0 for d in delays)
    assert max(delays) <= 3600.0
    assert m.state(now) == "failed"


def test_a_token_whose_expiry_did_not_move_backs_off() -> None:
    """Upstream handing back the same (cached) token is no progress: back off, keep it."""
    m = fresh_machine()
    held = m.token
    m.fetch_started(1440.0)
    problem = m.fetch_succeeded(token(0.0), 1440.0, 0.0)
    assert isinstance(problem, NoProgress)
    assert m.token is held
    assert m.retry_at >= 1440.0 + 15.0
    assert decide(m, gate(), 1441.0) == Wait(m.retry_at)


def test_a_token_shorter_lived_than_min_valid_is_reported_not_served() -> None:
    """A 30 s token with min_valid 60 is an error, and fetching again backs off."""
    m = Lifecycle(Policy(min_valid=60))
    m.fetch_started(0.0)
    problem = m.fetch_succeeded(token(0.0, lifetime=30.0), 0.0, 0.0)
    assert isinstance(problem, TooShortLived)
    assert "min_valid" in str(problem)
    assert m.servable(0.0) is None
    assert m.retry_at >= 15.0
    assert m.state(1.0) == "failed"


# -- the account gate ---------------------------------------------------------------------


def test_a_429_holds_back_every_profile_of_the_account() -> None:
    """Once throttled, the shared gate makes other profiles wait too."""
    shared = gate()
    other = Lifecycle(Policy())
    shared.throttle(100.0)
    assert decide(other, shared, 10.0) == Wait(100.0)
    assert decide(other, shared, 100.0) == Fetch()


def test_a_shorter_429_does_not_cut_a_longer_one_short() -> None:
    """Two profiles' 429s: the account stays closed until the later of the two deadlines."""
    shared = gate(per_minute=100, per_day=1000)
    shared.throttle(300.0)
    shared.throttle(50.0)
    assert shared.earliest(0.0) == 300.0


def test_per_minute_cap_holds_whatever_the_profiles_want() -> None:
    """Six requests in a minute, then wait until the oldest leaves the window."""
    g = gate(per_minute=6)
    m = Lifecycle(Policy())
    for t in range(6):
        assert decide(m, g, float(t)) == Fetch()
        g.record(float(t))
    assert decide(m, g, 6.0) == Wait(60.0)
    assert decide(m, g, 60.0) == Fetch()


def test_per_day_cap_holds() -> None:
    """The daily cap stops requests until a day after the oldest counted one."""
    g = gate(per_minute=1000, per_day=3)
    for t in (0.0, 100.0, 200.0):
        g.record(t)
    assert g.earliest(300.0) == 86_400.0
    assert g.earliest(86_400.0) == 86_400.0
    assert g.sent_within(86_401.0, 86_400.0) == 2


@given(st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=1, max_size=60))
def test_gate_never_allows_more_than_the_caps(times: list[float]) -> None:
    """Whatever asks when, following the gate keeps every minute within its cap."""
    g = gate(per_minute=6, per_day=500)
    sent: list[float] = []
    for t in sorted(times):
        when = g.earliest(t)
        g.record(when)
        sent.append(when)
    for t in sent:
        assert sum(1 for s in sent if t <= s < t + 60) <= 6


# -- reports of rejected tokens -----------------------------------------------------------


def test_a_report_of_the_current_token_forces_one_refresh() -> None:
    """The consumer names the current token: fetch now, even though it is fresh."""
    m = fresh_machine()
    assert m.report_rejected(sha256_hex(m.token.access_token if m.token else ""), 100.0)
    assert decide(m, gate(), 100.0) == Fetch()


def test_a_report_of_an_old_token_changes_nothing() -> None:
    """A token already replaced is answered with the current one, without a fetch."""
    m = fresh_machine()
    assert not m.report_rejected(sha256_hex("some-older-token"), 100.0)
    assert decide(m, gate(), 100.0) == Wait(m.refresh_at)


def test_concurrent_reports_collapse_into_one_refresh() -> None:
    """Reports during the fetch, or within the report interval, start nothing new."""
    m = fresh_machine()
    sha = sha256_hex(m.token.access_token if m.token else "")
    assert m.report_rejected(sha, 100.0)
    m.fetch_started(100.0)
    assert not m.report_rejected(sha, 100.1)
    m.fetch_failed(transient(), 100.2, 0.0)
    assert not m.report_rejected(sha, 105.0)  # within 10 s of the last forced refresh
    assert m.report_rejected(sha, 111.0)


# -- consumers cannot spend the account's budget ----------------------------------------------


def test_refreshes_for_a_large_min_valid_come_at_most_once_a_quarter_lifetime() -> None:
    """A client asking for nearly a whole lifetime in a loop gets one early refresh per 450 s."""
    m = fresh_machine()
    m.want(1790.0)
    assert decide(m, gate(), 20.0) == Fetch()
    m.fetch_started(20.0)
    m.fetch_succeeded(token(20.0), 20.0, 0.0)
    m.want(1790.0)
    assert decide(m, gate(), 40.0) == Wait(20.0 + 450.0)


def test_consumer_driven_fetches_keep_a_fifth_of_the_daily_budget() -> None:
    """Reports and large min_valid requests stop at four fifths of the daily cap; the
    schedule may still use the rest."""
    g = gate(per_minute=1000, per_day=10)
    for t in range(8):
        g.record(float(t))
    m = fresh_machine(at=10.0)
    m.want(1790.0)
    assert isinstance(decide(m, g, 100.0), Wait), "a consumer's wish used the reserve"
    assert decide(m, g, m.refresh_at) == Fetch(), "the schedule could not use the reserve"


def test_an_endpoint_returning_its_cached_token_is_asked_once_more_before_expiry() -> None:
    """No progress backs off (30, 60, 120 s ...), but when the backoff would pass the held
    token's last servable stretch, one attempt comes just before it; then the backoff again."""
    m = fresh_machine()
    held = m.token
    assert held is not None
    attempts, now = [], 1500.0
    while now < 1800.0:
        attempts.append(round(now, 3))
        m.fetch_started(now)
        m.fetch_succeeded(held, now, 0.999999)  # the same token again
        now = m.retry_at
    last_chance = 1800.0 - 60.0 - 90.0  # min_valid and a twentieth of the lifetime before
    assert attempts == [1500.0, 1530.0, 1590.0, last_chance]
