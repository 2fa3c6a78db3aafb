"""The async driver: one task per profile turns the lifecycle's actions into token requests.

Like Vault Agent's auth handler, only this module talks to the token endpoint; everything else
reads the immutable ``Token`` it publishes. Each profile's task loops: ask ``decide`` what to
do, then fetch, or sleep until the time it names or until an event (a consumer's need, a
report of a rejected token) wakes it. Consumers never fetch themselves: they state a need and
wait for the next outcome, so any number of them cause one upstream request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import httpx
import structlog

from broker._clock import SYSTEM_CLOCK, Clock
from broker._lifecycle import Fetch, Lifecycle, Policy, decide
from broker._profile import ProfileConfig
from broker._status import LastError, ProfileStatus
from broker._throttle import AccountGate
from broker._token import Token
from broker._upstream import FetchResult, fetch_token
from broker.exceptions import Throttled, TokenUnavailable, UpstreamError

log = structlog.get_logger("broker.engine")


class Observer(Protocol):
    """Where the engine reports what it did (``broker._metrics.Metrics`` in the daemon)."""

    def observe_refresh(self, profile: str, outcome: str) -> None: ...
    def observe_upstream(self, profile: str, seconds: float, status: int | None) -> None: ...
    def observe_throttled(self, account: str) -> None: ...
    def observe_coalesced(self, profile: str, waiters: int) -> None: ...


class TokenSink(Protocol):
    """Where new tokens are kept across restarts (``broker._persist.TokenStore``)."""

    def load(self, profile: ProfileConfig) -> Token | None: ...
    def save(self, profile: ProfileConfig, token: Token) -> None: ...


class _NullObserver:
    def observe_refresh(self, profile: str, outcome: str) -> None: ...
    def observe_upstream(self, profile: str, seconds: float, status: int | None) -> None: ...
    def observe_throttled(self, account: str) -> None: ...
    def observe_coalesced(self, profile: str, waiters: int) -> None: ...


@dataclass
class _Profile:
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


class Engine:
    """Keeps one valid token per profile; implements ``broker._status.TokenSource``."""

    def __init__(
        self,
        profiles: Mapping[str, ProfileConfig],
        *,
        http: httpx.AsyncClient,
        store: TokenSink | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: Callable[[], float] = random.random,
        observer: Observer | None = None,
    ) -> None:
        self._http = http
        self._store = store
        self._clock = clock
        self._rng = rng
        self._observer: Observer = observer or _NullObserver()
        gates = _gates_for(profiles.values())
        self._profiles = {
            name: _Profile(cfg, Lifecycle(policy_for(cfg)), gates[cfg.account])
            for name, cfg in profiles.items()
        }

    # -- TokenSource -------------------------------------------------------------------------

    @property
    def profiles(self) -> Sequence[str]:
        return list(self._profiles)

    def current(self, profile: str, now: float) -> Token | None:
        """The token to serve now with the profile's own min_valid (KeyError if unknown)."""
        return self._profiles[profile].machine.servable(now)

    async def get(self, profile: str, *, min_valid: float | None, timeout: float) -> Token:
        """A token with at least ``min_valid`` seconds left, waiting at most ``timeout``."""
        p = self._profiles[profile]
        floor = p.config.min_valid if min_valid is None else min_valid
        token = p.machine.servable(self._clock.monotonic(), floor)
        if token is not None:
            return token
        return await self._wait_for(p, floor, timeout)

    async def report_rejected(self, profile: str, sha256: str, *, timeout: float) -> Token:
        """A consumer saw ``sha256`` rejected: refresh once if it is current, then answer."""
        p = self._profiles[profile]
        p.counters["reports"] += 1
        now = self._clock.monotonic()
        if p.machine.report_rejected(sha256, now):
            p.poke()
            log.info("token.reported_rejected", profile=profile, token=sha256[:12])
        if p.machine.in_flight or p.machine.forced:
            await self._next_outcome(p, timeout)
        return await self.get(profile, min_valid=None, timeout=timeout)

    def status(self) -> list[ProfileStatus]:
        now, wall = self._clock.monotonic(), self._clock.wall()
        return [_status_of(name, p, now, wall) for name, p in self._profiles.items()]

    # -- the daemon side ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Restore persisted tokens, then drive every profile until cancelled."""
        await self._restore()
        async with anyio.create_task_group() as tg:
            for p in self._profiles.values():
                tg.start_soon(self._drive, p, name=f"profile {p.config.name}")
            task_status.started()

    async def _restore(self) -> None:
        store = self._store
        if store is None:
            return
        for p in self._profiles.values():
            token = await anyio.to_thread.run_sync(store.load, p.config)
            if token is not None:
                p.machine.adopt(token, self._clock.monotonic(), self._rng())
                log.info(
                    "token.restored",
                    profile=p.config.name,
                    token=token.fingerprint,
                    expires_in=round(token.remaining(self._clock.monotonic())),
                )

    async def _drive(self, p: _Profile) -> None:
        while True:
            now = self._clock.monotonic()
            action = decide(p.machine, p.gate, now)
            if isinstance(action, Fetch):
                p.gate.record(now)
                p.machine.fetch_started(now)
                await self._refresh(p)
                continue
            await self._sleep(p, action.until - now)

    async def _sleep(self, p: _Profile, seconds: float) -> None:
        with anyio.move_on_after(max(seconds, 0.0)):
            await p.wake.wait()
        if p.wake.is_set():
            p.wake = anyio.Event()

    async def _refresh(self, p: _Profile) -> None:
        p.counters["upstream_requests"] += 1
        started = self._clock.monotonic()
        try:
            result = await fetch_token(self._http, p.config, clock=self._clock)
        except UpstreamError as error:
            self._observer.observe_upstream(
                p.config.name, self._clock.monotonic() - started, error.detail.status
            )
            self._on_failure(p, error)
        else:
            self._observer.observe_upstream(p.config.name, result.duration, 200)
            await self._on_token(p, result)
        finally:
            p.machine.in_flight = False  # also when cancelled mid-request
            if p.waiters:
                self._observer.observe_coalesced(p.config.name, p.waiters)
            p.publish()

    async def _on_token(self, p: _Profile, result: FetchResult) -> None:
        now, token = self._clock.monotonic(), result.token
        problem = p.machine.fetch_succeeded(token, now, self._rng())
        if problem is not None:
            self._on_failure(p, problem, already_recorded=True, tracking_id=result.tracking_id)
            return
        p.counters["refreshes"] += 1
        p.last_refresh_wall = self._clock.wall()
        self._observer.observe_refresh(p.config.name, "ok")
        log.info(
            "token.refreshed",
            profile=p.config.name,
            token=token.fingerprint,
            expires_in=round(token.lifetime),
            tracking_id=result.tracking_id,
            duration_ms=round(result.duration * 1000, 1),
            refresh_in=round(p.machine.refresh_at - now),
        )
        if result.clock_skew is not None and abs(result.clock_skew) > 30:
            log.warning(
                "upstream.clock_skew",
                profile=p.config.name,
                skew_s=round(result.clock_skew, 1),
                tracking_id=result.tracking_id,
            )
        if self._store is not None:
            await anyio.to_thread.run_sync(self._store.save, p.config, token)

    def _on_failure(
        self,
        p: _Profile,
        error: UpstreamError,
        *,
        already_recorded: bool = False,
        tracking_id: str | None = None,
    ) -> None:
        """The one path every failed attempt takes: state, account gate, metrics, log."""
        now = self._clock.monotonic()
        if not already_recorded:
            p.machine.fetch_failed(error, now, self._rng())
        if isinstance(error, Throttled):
            p.gate.throttle(p.machine.retry_at)
            p.counters["throttled"] += 1
            self._observer.observe_throttled(p.config.account)
        p.counters["failures"] += 1
        self._observer.observe_refresh(p.config.name, error.kind)
        log.warning(
            "upstream.failed",
            profile=p.config.name,
            kind=error.kind,
            error=str(error),
            tracking_id=error.detail.tracking_id or tracking_id,
            status=error.detail.status,
            code=error.detail.code,
            retry_in=round(p.machine.retry_at - now, 1),
            failures=p.machine.failures,
            serving=p.machine.servable(now) is not None,
        )

    # -- waiting -----------------------------------------------------------------------------

    async def _wait_for(self, p: _Profile, floor: float, timeout: float) -> Token:
        deadline = self._clock.monotonic() + timeout
        while True:
            now = self._clock.monotonic()
            token = p.machine.servable(now, floor)
            if token is not None:
                return token
            p.machine.want(floor)
            self._give_up_if_hopeless(p, floor, now, deadline)
            p.poke()
            await self._next_outcome(p, deadline - now)

    async def _next_outcome(self, p: _Profile, timeout: float) -> None:
        """Wait for the next fetch attempt to end, at most ``timeout`` seconds."""
        event = p.outcome
        p.waiters += 1
        try:
            with anyio.move_on_after(max(timeout, 0.0)):
                await event.wait()
        finally:
            p.waiters -= 1

    def _give_up_if_hopeless(self, p: _Profile, floor: float, now: float, deadline: float) -> None:
        m, name = p.machine, p.config.name
        if m.cannot_satisfy(floor):
            lifetime = m.token.lifetime if m.token else 0.0
            raise TokenUnavailable(
                f"profile {name!r}: tokens from the token endpoint live {lifetime:.0f} s, "
                f"less than the {floor:.0f} s asked for",
                profile=name,
            )
        # With a fetch in flight, its outcome is what we wait for.
        next_try = now if m.in_flight else max(m.next_fetch_at(now), p.gate.earliest(now))
        if now >= deadline or next_try > deadline:
            raise _unavailable(p, now, next_try)


def _unavailable(p: _Profile, now: float, next_try: float) -> TokenUnavailable:
    name, error = p.config.name, p.machine.last_error
    why = f": {error}" if error is not None else ""
    retry = max(next_try - now, 0.0) if next_try < float("inf") else None
    return TokenUnavailable(
        f"profile {name!r} has no valid token{why}",
        profile=name,
        retry_after=retry,
        cause=error,
    )


def _gates_for(profiles: object) -> dict[str, AccountGate]:
    """One gate per account; its caps are the strictest any of its profiles asks for."""
    gates: dict[str, AccountGate] = {}
    for cfg in profiles:  # type: ignore[attr-defined]  # an iterable of ProfileConfig
        gate = gates.get(cfg.account)
        if gate is None:
            gates[cfg.account] = AccountGate(
                cfg.account,
                per_minute=cfg.max_requests_per_minute,
                per_day=cfg.max_requests_per_day,
            )
        else:
            gate.per_minute = min(gate.per_minute, cfg.max_requests_per_minute)
            gate.per_day = min(gate.per_day, cfg.max_requests_per_day)
    return gates


def _status_of(name: str, p: _Profile, now: float, wall: float) -> ProfileStatus:
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
