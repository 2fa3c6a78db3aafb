"""The async driver: one task per profile turns the lifecycle's actions into token requests.

Like Vault Agent's auth handler, only this module talks to the token endpoint; everything else
reads the immutable ``Token`` it publishes. Each profile's task loops: ask ``decide`` what to
do, then fetch, or sleep until the time it names or until an event (a consumer's need, a
report of a rejected token) wakes it. Consumers never fetch themselves: they state a need and
wait for the next outcome, so any number of them cause one upstream request.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import anyio
import httpx
import structlog

from broker._clock import SYSTEM_CLOCK, Clock
from broker._engine_profile import (
    LiveProfile,
    carry_token,
    gates_for,
    policy_for,
    replacing,
    status_of,
    still_in_flight,
    unavailable,
)
from broker._lifecycle import Fetch, Lifecycle, decide
from broker._profile import ProfileConfig
from broker._status import ProfileStatus
from broker._throttle import AccountGate
from broker._token import Token
from broker._upstream import FetchResult, fetch_token
from broker.exceptions import Throttled, TokenUnavailable, UpstreamDetail, UpstreamError

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
        heartbeat: Callable[[], None] | None = None,
        heartbeat_interval: float = 10.0,
    ) -> None:
        self._http = http
        self._store = store
        self._clock = clock
        self._rng = rng
        self._observer: Observer = observer or _NullObserver()
        self._heartbeat = heartbeat
        self._tick = heartbeat_interval if heartbeat is not None else float("inf")
        self._gates: dict[str, AccountGate] = {}
        self._profiles = self._arrange(profiles, {})
        self._tg: anyio.abc.TaskGroup | None = None

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
        # The operator's min_valid is a floor no consumer can lower.
        floor = max(p.config.min_valid, min_valid or 0.0)
        token = p.machine.servable(self._clock.monotonic(), floor)
        if token is not None:
            return token
        return await self._wait_for(profile, min_valid, timeout)

    async def report_rejected(self, profile: str, sha256: str, *, timeout: float) -> Token:
        """A consumer saw ``sha256`` rejected: refresh once if it is current, then answer."""
        p = self._profiles[profile]
        p.counters["reports"] += 1
        now = self._clock.monotonic()
        deadline = now + timeout
        if p.machine.report_rejected(sha256, now):
            p.poke()
            log.info("token.reported_rejected", profile=profile, token=sha256[:12])
        while replacing(p, sha256) and now < deadline and self._next_try(p, now) <= deadline:
            await self._next_outcome(p, deadline - now)
            now = self._clock.monotonic()
            p = self._profiles[profile]  # a reload may have replaced it (KeyError: removed)
        return await self.get(profile, min_valid=None, timeout=max(deadline - now, 0.0))

    def status(self) -> list[ProfileStatus]:
        now, wall = self._clock.monotonic(), self._clock.wall()
        return [status_of(name, p, now, wall) for name, p in self._profiles.items()]

    # -- the daemon side ---------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Restore persisted tokens, then drive every profile until cancelled."""
        await self._restore(self._profiles.values())
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for p in self._profiles.values():
                self._start(p)
            if self._heartbeat is not None:
                tg.start_soon(self._watchdog, name="watchdog")
            task_status.started()

    async def update(self, profiles: Mapping[str, ProfileConfig]) -> None:
        """Apply a reloaded configuration: unchanged profiles keep their token and task,
        changed or new ones start afresh (from disk when possible), removed ones stop."""
        old = self._profiles
        new = self._arrange(profiles, old)
        fresh = [(name, p) for name, p in new.items() if old.get(name) is not p]
        for name, p in fresh:
            carry_token(old.get(name), p, self._clock.monotonic(), self._rng())
        await self._restore(p for _, p in fresh if p.machine.token is None)
        self._profiles = new
        for name, p in old.items():
            if new.get(name) is not p:
                if p.scope is not None:
                    p.scope.cancel()
                p.publish()  # its waiters look again, and find the new profile (or none)
        for _, p in fresh:
            self._start(p)
        log.info(
            "engine.updated",
            profiles=list(new),
            started=[n for n, _ in fresh],
            stopped=[n for n in old if n not in new],
        )

    def _arrange(
        self, profiles: Mapping[str, ProfileConfig], old: Mapping[str, LiveProfile]
    ) -> dict[str, LiveProfile]:
        """Profiles for ``profiles``, reusing the unchanged ones of ``old`` and the gates."""
        self._gates = gates_for(profiles.values(), self._gates)
        arranged = {}
        for name, cfg in profiles.items():
            kept = old.get(name)
            if kept is not None and kept.config == cfg:
                arranged[name] = kept
            else:
                arranged[name] = LiveProfile(
                    cfg, Lifecycle(policy_for(cfg)), self._gates[cfg.account]
                )
        return arranged

    def _start(self, p: LiveProfile) -> None:
        if self._tg is None:
            return  # run() starts every profile
        p.scope = anyio.CancelScope()
        self._tg.start_soon(self._drive_within, p, name=f"profile {p.config.name}")

    async def _drive_within(self, p: LiveProfile) -> None:
        assert p.scope is not None  # set by _start
        with p.scope:
            async with anyio.create_task_group() as tg:
                if self._store is not None:
                    tg.start_soon(self._keep_saved, p, self._store)
                await self._drive(p)

    async def _watchdog(self) -> None:
        """Ping systemd only while every profile's task keeps deciding (a stuck one stops it)."""
        assert self._heartbeat is not None  # run() starts this only with one
        while True:
            now = self._clock.monotonic()
            if all(self._responsive(p, now) for p in self._profiles.values()):
                self._heartbeat()
            else:
                log.error(
                    "engine.stuck",
                    profiles=[n for n, p in self._profiles.items() if not self._responsive(p, now)],
                )
            for p in self._profiles.values():
                p.poke()
            await anyio.sleep(self._tick)

    def _responsive(self, p: LiveProfile, now: float) -> bool:
        if p.machine.in_flight:  # a fetch is bounded by its timeout
            return now - p.fetch_started_at < p.config.upstream_timeout + self._tick * 2
        return now - p.alive_at < self._tick * 2.5

    async def _restore(self, profiles: Iterable[LiveProfile]) -> None:
        store = self._store
        if store is None:
            return
        for p in profiles:
            token = await anyio.to_thread.run_sync(store.load, p.config)
            if token is not None:
                p.machine.adopt(token, self._clock.monotonic(), self._rng())
                log.info(
                    "token.restored",
                    profile=p.config.name,
                    token=token.fingerprint,
                    expires_in=round(token.remaining(self._clock.monotonic())),
                )

    async def _drive(self, p: LiveProfile) -> None:
        while True:
            now = self._clock.monotonic()
            p.alive_at = now
            action = decide(p.machine, p.gate, now)
            if isinstance(action, Fetch):
                p.gate.record(now)
                p.machine.fetch_started(now)
                p.fetch_started_at = now
                await self._refresh(p)
                continue
            await self._sleep(p, action.until - now)

    async def _sleep(self, p: LiveProfile, seconds: float) -> None:
        with anyio.move_on_after(min(max(seconds, 0.0), self._tick)):
            await p.wake.wait()
        if p.wake.is_set():
            p.wake = anyio.Event()

    async def _refresh(self, p: LiveProfile) -> None:
        p.counters["upstream_requests"] += 1
        started = self._clock.monotonic()
        adopted: Token | None = None
        try:
            result = await fetch_token(self._http, p.config, clock=self._clock)
        except UpstreamError as error:
            self._observer.observe_upstream(
                p.config.name, self._clock.monotonic() - started, error.detail.status
            )
            self._on_failure(p, error)
        else:
            self._observer.observe_upstream(p.config.name, result.duration, 200)
            adopted = self._on_token(p, result)
        finally:
            p.machine.in_flight = False  # also when cancelled mid-request
            if p.waiters:
                self._observer.observe_coalesced(p.config.name, p.waiters)
            p.publish()
        if adopted is not None:
            # Neither waiters nor the next refresh wait on the disk: the writer task does.
            p.unsaved = adopted
            p.save_wanted.set()

    async def _keep_saved(self, p: LiveProfile, store: TokenSink) -> None:
        """Write each new token of one profile (the latest wins), and what is pending when
        shutting down, so that a restart finds it."""
        try:
            while True:
                await p.save_wanted.wait()
                p.save_wanted = anyio.Event()
                await self._save(p, store)
        finally:
            await self._save(p, store)

    async def _save(self, p: LiveProfile, store: TokenSink) -> None:
        token, p.unsaved = p.unsaved, None
        if token is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.save, p.config, token)

    def _on_token(self, p: LiveProfile, result: FetchResult) -> Token | None:
        """Take a fetched token; returns it when it became the current one."""
        now, token = self._clock.monotonic(), result.token
        problem = p.machine.fetch_succeeded(token, now, self._rng())
        if problem is not None:
            problem.detail = UpstreamDetail(status=200, tracking_id=result.tracking_id)
            self._on_failure(p, problem, already_recorded=True)
            return None
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
        return token

    def _on_failure(
        self, p: LiveProfile, error: UpstreamError, *, already_recorded: bool = False
    ) -> None:
        """The one path every failed attempt takes: state, account gate, metrics, log."""
        now = self._clock.monotonic()
        if not already_recorded:
            p.machine.fetch_failed(error, now, self._rng())
        if isinstance(error, Throttled):
            p.gate.throttle(p.machine.retry_at, error)
            p.counters["throttled"] += 1
            self._observer.observe_throttled(p.config.account)
        p.counters["failures"] += 1
        self._observer.observe_refresh(p.config.name, error.kind)
        log.warning(
            "upstream.failed",
            profile=p.config.name,
            kind=error.kind,
            error=str(error),
            tracking_id=error.detail.tracking_id,
            status=error.detail.status,
            code=error.detail.code,
            retry_in=round(p.machine.retry_at - now, 1),
            failures=p.machine.failures,
            serving=p.machine.servable(now) is not None,
        )

    # -- waiting -----------------------------------------------------------------------------

    async def _wait_for(self, profile: str, min_valid: float | None, timeout: float) -> Token:
        deadline = self._clock.monotonic() + timeout
        while True:
            # Looked up each time round: a reload may have replaced the profile (KeyError:
            # removed), and its min_valid with it.
            p = self._profiles[profile]
            floor = max(p.config.min_valid, min_valid or 0.0)
            now = self._clock.monotonic()
            token = p.machine.servable(now, floor)
            if token is not None:
                return token
            p.wanting.append(floor)
            try:
                self._give_up_if_hopeless(p, floor, now, deadline)
                p.poke()
                await self._next_outcome(p, deadline - now)
            finally:
                p.wanting.remove(floor)
                # A consumer that gave up no longer needs that much: keep only the others'.
                p.machine.need = min(p.machine.need, max(p.wanting, default=0.0))

    @staticmethod
    def _next_try(p: LiveProfile, now: float) -> float:
        """When the next fetch outcome can come: now if one is in flight (NEVER if none is
        wanted)."""
        if p.machine.in_flight:
            return now
        discretionary = p.machine.discretionary(now)
        return max(p.machine.next_fetch_at(now), p.gate.earliest(now, discretionary=discretionary))

    async def _next_outcome(self, p: LiveProfile, timeout: float) -> None:
        """Wait for the next fetch attempt to end, at most ``timeout`` seconds."""
        event = p.outcome
        p.waiters += 1
        try:
            with anyio.move_on_after(max(timeout, 0.0)):
                await event.wait()
        finally:
            p.waiters -= 1

    def _give_up_if_hopeless(
        self, p: LiveProfile, floor: float, now: float, deadline: float
    ) -> None:
        """Raise unless the next fetch can end before ``deadline``; else note the need."""
        m, name = p.machine, p.config.name
        if m.cannot_satisfy(floor):
            raise TokenUnavailable(
                f"profile {name!r}: tokens from the token endpoint live {m.upstream_lifetime:g} s, "
                f"less than the {floor:g} s asked for; ask for less (min_valid)",
                profile=name,
                cause=m.last_error,
                client_error=True,
            )
        m.want(floor)
        next_try = self._next_try(p, now)
        if now >= deadline and m.in_flight:
            raise still_in_flight(p, now)
        if now >= deadline or next_try > deadline:
            raise unavailable(p, now, next_try)
