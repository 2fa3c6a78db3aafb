"""The token lifecycle of one profile, as a pure state machine (no I/O, no clock, no randomness).

Theory. A profile holds at most one token. Its state is derived, never stored, from four facts:
the token (if any) and ``now``, whether a fetch is in flight, and how the last attempt ended::

    empty ──fetch──▶ refreshing ──token──▶ fresh ──refresh point──▶ stale ──expiry──▶ expired
                        │   ▲                 ▲                       │
                        │   └─────────────────┼───────── fetch ◀──────┘
                        └──failure──▶ failed ─┘ (after the backoff, fetch again)

* fresh: the token has more than ``min_valid`` left and its refresh point is still ahead.
* stale: past the refresh point but still servable; it keeps being served while a refresh runs
  or while failures back off (google-auth's STALE).
* expired: less than ``min_valid`` left: never served, whatever a consumer asks for.
* failed: no servable token and the last attempt failed; the next one waits for its backoff.

Events go in (``fetch_started``, ``fetch_succeeded``, ``fetch_failed``, ``need``,
``report_rejected``) with the time they happened; ``next_fetch_at`` says when the driver should
fetch next. The driver (``_engine.py``) owns the clock, the jitter source and the network.
The account-wide budget (429s, per-minute and per-day caps) lives in ``_throttle.AccountGate``;
``decide`` combines both into one action.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker._backoff import Backoff
from broker._throttle import AccountGate
from broker._token import Token
from broker.exceptions import (
    CredentialsRejected,
    RequestRejected,
    Throttled,
    UpstreamError,
    UpstreamUnavailable,
)

NEVER = float("inf")


class NoProgress(UpstreamUnavailable):
    """Upstream answered with a token that expires no later than the one we hold."""

    kind = "no_progress"


class TooShortLived(UpstreamError):
    """Upstream's tokens live less than ``min_valid``: none of them could ever be served."""

    kind = "too_short_lived"


@dataclass(frozen=True)
class Policy:
    """How one profile refreshes and backs off. Durations are seconds."""

    min_valid: float = 60.0
    refresh_ahead: float = 0.2
    refresh_jitter: float = 0.05
    transient: Backoff = field(default_factory=Backoff)  # 5xx, timeouts, resets, garbage
    rejected: Backoff = field(default_factory=lambda: Backoff(base=300.0, cap=3600.0))
    no_progress: Backoff = field(default_factory=lambda: Backoff(base=30.0, cap=600.0))
    throttle_default: float = 60.0  # a 429 without Retry-After
    throttle_max: float = 3600.0  # an absurd Retry-After is believed up to this much
    report_interval: float = 10.0  # forced refreshes on consumer reports: at most one per this


@dataclass(frozen=True)
class Fetch:
    """Send a token request now."""


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (monotonic), unless an event arrives first."""

    until: float


Action = Fetch | Wait


@dataclass
class Lifecycle:
    """The state of one profile's token; see the module docstring."""

    policy: Policy
    token: Token | None = None
    in_flight: bool = False
    refresh_at: float = NEVER
    retry_at: float = float("-inf")
    failures: int = 0
    last_error: UpstreamError | None = None
    last_error_at: float | None = None
    need: float = 0.0  # the largest min_valid a waiting consumer asked for
    upstream_lifetime: float | None = None  # of the last token upstream issued
    last_need_fetch_at: float = float("-inf")  # the last fetch made for a consumer's min_valid
    forced: bool = False
    replacing: bool = False
    last_forced_at: float = float("-inf")

    # -- questions ---------------------------------------------------------------------------

    def servable(self, now: float, min_valid: float | None = None) -> Token | None:
        """The token, if it has at least ``min_valid`` (default: the policy's) seconds left."""
        floor = self.policy.min_valid if min_valid is None else min_valid
        token = self.token
        if token is not None and token.remaining(now) >= floor and token.remaining(now) > 0:
            return token
        return None

    def state(self, now: float) -> str:
        """empty | fresh | refreshing | stale | expired | failed (see the module docstring)."""
        if self.in_flight:
            return "refreshing"
        if self.servable(now) is not None:
            return "fresh" if now < self.refresh_at else "stale"
        if self.failures:
            return "failed"
        return "empty" if self.token is None else "expired"

    def next_fetch_at(self, now: float) -> float:
        """When this profile wants its next token request (NEVER while one is in flight)."""
        if self.in_flight:
            return NEVER
        return max(self._wanted_at(now), self.retry_at)

    def cannot_satisfy(self, min_valid: float) -> bool:
        """True when upstream's tokens are known to live less than ``min_valid``."""
        return self.upstream_lifetime is not None and self.upstream_lifetime < min_valid

    # -- events ------------------------------------------------------------------------------

    def fetch_started(self, now: float) -> None:
        token = self.token
        if token is not None and not self.forced and token.remaining(now) < self.need:
            self.last_need_fetch_at = now
        self.in_flight = True
        self.replacing = self.forced  # this fetch replaces a token a consumer saw rejected
        self.forced = False
        self.need = 0.0  # consumers still waiting after this fetch will say so again

    def fetch_succeeded(self, token: Token, now: float, u: float) -> UpstreamError | None:
        """A token arrived; ``u`` is uniform in [0, 1) for the jitter. Returns a problem, if any.

        A problem (no progress, too short-lived) keeps the token we hold, which is at least as
        good, and backs off like a failure."""
        self.in_flight = False
        self.upstream_lifetime = token.lifetime
        problem = self._judge(token)
        if problem is not None:
            self._fail(problem, now, u)
            return problem
        self.token = token
        self.failures = 0
        self.retry_at = float("-inf")
        self.refresh_at = token.expires_at - self._lead(token.lifetime, u)
        return None

    def fetch_failed(self, error: UpstreamError, now: float, u: float) -> None:
        self.in_flight = False
        self._fail(error, now, u)

    def want(self, min_valid: float) -> None:
        """A consumer is waiting for a token with at least ``min_valid`` seconds left."""
        self.need = max(self.need, min_valid)

    def report_rejected(self, sha256: str, now: float) -> bool:
        """A consumer saw this token refused upstream. True if that starts a refresh."""
        token = self.token
        if token is None or token.sha256 != sha256:
            return False  # already replaced (or never ours): the current token is the answer
        if self.in_flight or now - self.last_forced_at < self.policy.report_interval:
            return False  # collapse a burst of reports into the refresh already under way
        self.forced = True
        self.last_forced_at = now
        return True

    def adopt(self, token: Token, now: float, u: float) -> None:
        """Take a token restored from disk at start-up, scheduling its refresh as usual."""
        self.token = token
        self.refresh_at = token.expires_at - self._lead(token.lifetime, u)

    # -- internals ---------------------------------------------------------------------------

    def _wanted_at(self, now: float) -> float:
        token = self.token
        if token is None or self.forced or self.servable(now) is None:
            return now
        if token.remaining(now) < self.need:
            # A consumer wants more than the token has left: refresh early, but no more often
            # than a quarter of a lifetime, so that a client asking for nearly a whole
            # lifetime in a loop cannot spend the account's budget.
            return min(max(now, self.last_need_fetch_at + 0.25 * token.lifetime), self.refresh_at)
        return self.refresh_at

    def discretionary(self, now: float) -> bool:
        """The fetch wanted now is only for a consumer (a report, a large min_valid): the
        schedule itself would not fetch yet."""
        return self.servable(now) is not None and now < self.refresh_at

    def _lead(self, lifetime: float, u: float) -> float:
        """Seconds before expiry to refresh: the configured fraction, spread by jitter.

        Never later than ``min_valid`` plus a tenth of the lifetime before expiry, so that
        consumers are not left waiting on a scheduled refresh; never earlier than a tenth of
        the lifetime after arrival, so a short-lived token cannot make the loop spin.
        """
        fraction = self.policy.refresh_ahead + self.policy.refresh_jitter * u
        floor = min(self.policy.min_valid + 0.1 * lifetime, 0.9 * lifetime)
        return max(fraction * lifetime, floor)

    def _judge(self, token: Token) -> UpstreamError | None:
        if token.lifetime <= self.policy.min_valid:
            return TooShortLived(
                f"the token endpoint issued a token valid for {token.lifetime:g} s, not more "
                f"than min_valid ({self.policy.min_valid:g} s): lower min_valid"
            )
        held = self.token
        if held is None:
            return None
        if token.access_token == held.access_token:
            return NoProgress("upstream returned the token we already hold")
        # A second's slack absorbs jitter in the arrival time; short test tokens get less.
        slack = min(1.0, 0.05 * token.lifetime)
        if not self.replacing and token.expires_at <= held.expires_at + slack:
            return NoProgress("upstream returned a token that expires no later than the one held")
        return None

    def _fail(self, error: UpstreamError, now: float, u: float) -> None:
        self.failures += 1
        self.last_error = error
        self.last_error_at = now
        self.retry_at = now + self._retry_delay(error, u)
        token = self.token
        if isinstance(error, NoProgress) and token is not None:
            # An endpoint that hands back its cached token is asked once more before the token
            # we hold stops being servable, however long the backoff: once, not in a loop.
            last_chance = token.expires_at - self.policy.min_valid - 0.05 * token.lifetime
            if now < last_chance < self.retry_at:
                self.retry_at = last_chance

    def _retry_delay(self, error: UpstreamError, u: float) -> float:
        policy = self.policy
        if isinstance(error, Throttled):
            asked = error.detail.retry_after
            wait = policy.throttle_default if asked is None else asked
            return min(max(wait, 1.0), policy.throttle_max)
        if isinstance(error, CredentialsRejected | RequestRejected):
            return policy.rejected.delay(self.failures, u)
        if isinstance(error, NoProgress | TooShortLived):
            return policy.no_progress.delay(self.failures, u)
        return policy.transient.delay(self.failures, u)


def decide(machine: Lifecycle, gate: AccountGate, now: float) -> Action:
    """Fetch now, or wait: the profile's own wish, held back by its account's budget."""
    wanted = machine.next_fetch_at(now)
    if wanted > now:
        return Wait(wanted)
    allowed = gate.earliest(now, discretionary=machine.discretionary(now))
    return Fetch() if allowed <= now else Wait(allowed)
