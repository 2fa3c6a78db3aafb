"""One profile as the engine runs it, and what its state says to consumers and to status.

``LiveProfile`` joins the pure ``Lifecycle`` to the events its task and its waiters meet on;
the functions below read it (status, refusals) or arrange it (account gates, reloads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import anyio

from broker._lifecycle import Lifecycle, Policy
from broker._profile import ProfileConfig
from broker._status import LastError, ProfileStatus
from broker._throttle import AccountGate
from broker._token import Token
from broker.exceptions import TokenUnavailable, UpstreamError


@dataclass
class LiveProfile:
    """One profile's machine plus the events its task and its waiters meet on."""

    config: ProfileConfig
    machine: Lifecycle
    gate: AccountGate
    wake: anyio.Event = field(default_factory=anyio.Event)
    outcome: anyio.Event = field(default_factory=anyio.Event)  # set after every fetch attempt
    waiters: int = 0
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("upstream_requests", "refreshes", "failures", "throttled", "reports"), 0
        )
    )
    last_refresh_wall: float | None = None
    scope: anyio.CancelScope | None = None  # the profile's task, cancelled when it is removed
    alive_at: float = float("-inf")  # when its task last decided something (for the watchdog)
    fetch_started_at: float = float("-inf")
    wanting: list[float] = field(default_factory=list)  # min_valid of each consumer waiting
    unsaved: Token | None = None  # the newest token not yet written to the state directory
    save_wanted: anyio.Event = field(default_factory=anyio.Event)

    def poke(self) -> None:
        """Wake the profile's task so it decides again."""
        self.wake.set()

    def publish(self) -> None:
        """Release everyone waiting for the outcome of a fetch."""
        self.outcome.set()
        self.outcome = anyio.Event()


def policy_for(config: ProfileConfig) -> Policy:
    """The lifecycle policy a profile's settings ask for."""
    return Policy(
        min_valid=config.min_valid,
        refresh_ahead=config.refresh_ahead,
        refresh_jitter=config.refresh_jitter,
    )


def replacing(p: LiveProfile, sha256: str) -> bool:
    """The reported token is still current and a refresh to replace it is due or under way."""
    token, m = p.machine.token, p.machine
    return token is not None and token.sha256 == sha256 and (m.in_flight or m.forced)


def unavailable(p: LiveProfile, now: float, next_try: float) -> TokenUnavailable:
    name, error = p.config.name, p.machine.last_error
    held_back = p.gate.earliest(now) > max(p.machine.next_fetch_at(now), now)
    if held_back and p.gate.throttled_until > now and p.gate.throttle_error is not None:
        error = p.gate.throttle_error  # a sibling profile's 429 holds the whole account
        why = f": account {p.gate.account!r} is throttled: {error}"
    elif held_back:
        why = f": account {p.gate.account!r} reached its own request cap (max_requests_per_*)"
    else:
        why = f": {error}" if error is not None else ""
    retry = max(next_try - now, 0.0) if next_try < float("inf") else None
    return TokenUnavailable(
        f"profile {name!r} has no valid token{why}", profile=name, retry_after=retry, cause=error
    )


def still_in_flight(p: LiveProfile, now: float) -> TokenUnavailable:
    """A consumer gave up while a token request was still under way."""
    timeout, started = p.config.upstream_timeout, p.fetch_started_at
    return TokenUnavailable(
        f"profile {p.config.name!r} has no valid token yet: a request to the token endpoint "
        f"has been under way for {now - started:.1f} s (upstream_timeout is {timeout:g} s)",
        profile=p.config.name,
        retry_after=max(started + timeout - now, 0.0),
        cause=p.machine.last_error,
    )


def gates_for(
    profiles: Iterable[ProfileConfig], existing: Mapping[str, AccountGate]
) -> dict[str, AccountGate]:
    """One gate per account, kept across reloads (its 429 and history stay); its caps are the
    strictest any of its profiles asks for."""
    gates: dict[str, AccountGate] = {}
    for cfg in profiles:
        gate = gates.get(cfg.account)
        if gate is None:
            gate = existing.get(cfg.account) or AccountGate(cfg.account, per_minute=1, per_day=1)
            gate.per_minute, gate.per_day = cfg.max_requests_per_minute, cfg.max_requests_per_day
            gates[cfg.account] = gate
        else:
            gate.per_minute = min(gate.per_minute, cfg.max_requests_per_minute)
            gate.per_day = min(gate.per_day, cfg.max_requests_per_day)
    return gates


def carry_token(old: LiveProfile | None, new: LiveProfile, now: float, u: float) -> None:
    """A changed profile with the same credentials and endpoint keeps its valid token."""
    if old is None or old.machine.token is None:
        return
    same = (old.config.client_id, old.config.token_url) == (
        new.config.client_id,
        new.config.token_url,
    )
    if same and old.machine.token.remaining(now) > 0:
        new.machine.adopt(old.machine.token, now, u)


def status_of(name: str, p: LiveProfile, now: float, wall: float) -> ProfileStatus:
    m, token = p.machine, p.machine.token
    error = m.last_error
    next_at = m.next_fetch_at(now)
    waiting = max(next_at, p.gate.earliest(now)) if next_at < float("inf") else None
    return ProfileStatus(
        profile=name,
        account=p.config.account,
        state=m.state(now),
        valid=m.servable(now) is not None,
        token_fingerprint=token.fingerprint if token else None,
        expires_in=round(token.remaining(now), 1) if token else None,
        expires_at=token.wall_expires_at if token else None,
        last_refresh=p.last_refresh_wall,
        next_refresh_in=round(max(waiting - now, 0.0), 1) if waiting is not None else None,
        retry_after=round(m.retry_at - now, 1) if m.retry_at > now else None,
        last_error=_last_error(error, m.last_error_at, now, wall) if error else None,
        counters=dict(p.counters),
    )


def _last_error(error: UpstreamError, at: float | None, now: float, wall: float) -> LastError:
    when = wall - (now - at) if at is not None else wall
    return LastError(kind=error.kind, summary=str(error), at=when, detail=error.detail.as_dict())
