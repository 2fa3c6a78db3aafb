"""A scriptable TokenSource and a hand-driven clock, for testing the serving layer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from _clocks import FakeClock

from broker._profile import ProfileConfig, Secret
from broker._status import ProfileStatus
from broker._token import Token
from broker.exceptions import TokenUnavailable

GetHook = Callable[[str, float | None, float], Awaitable[Token]]
ReportHook = Callable[[str, str, float], Awaitable[Token]]


def profile_config(
    name: str,
    *,
    allowed_uids: frozenset[int] | None = None,
    allowed_gids: frozenset[int] | None = None,
) -> ProfileConfig:
    """A profile with made-up credentials."""
    return ProfileConfig(
        name=name,
        client_id=f"client-{name}",
        secret=Secret("not-a-real-secret", "test"),
        token_url="http://127.0.0.1:9/token",
        allowed_uids=allowed_uids,
        allowed_gids=allowed_gids,
    )


class FakeSource:
    """Implements broker._status.TokenSource over a dict of tokens; hooks script the waits."""

    def __init__(
        self, clock: FakeClock, names: Sequence[str] = ("default", "other"), min_valid: float = 60
    ) -> None:
        self.clock = clock
        self.min_valid = min_valid
        self.tokens: dict[str, Token | None] = dict.fromkeys(names)
        self.get_calls: list[tuple[str, float | None, float]] = []
        self.reports: list[tuple[str, str]] = []
        self.on_get: GetHook | None = None
        self.on_report: ReportHook | None = None
        self.fail_current: Exception | None = None
        self.retry_after: dict[str, float] = {}  # what status() reports, per profile
        self.next_refresh_in: dict[str, float] = {}

    def issue(self, profile: str, access_token: str, lifetime: float = 1800.0) -> Token:
        """Make ``access_token`` the profile's current token, valid for ``lifetime`` seconds."""
        c = self.clock
        token = Token(access_token, "Bearer", c.mono, c.mono + lifetime, c.now + lifetime)
        self.tokens[profile] = token
        return token

    @property
    def profiles(self) -> Sequence[str]:
        return list(self.tokens)

    def current(self, profile: str, now: float) -> Token | None:
        if self.fail_current is not None:
            raise self.fail_current
        token = self.tokens[profile]
        if token is None or token.remaining(now) < self.min_valid:
            return None
        return token

    async def get(self, profile: str, *, min_valid: float | None, timeout: float) -> Token:
        self.get_calls.append((profile, min_valid, timeout))
        token = self.tokens[profile]
        if self.on_get is not None:
            return await self.on_get(profile, min_valid, timeout)
        floor = self.min_valid if min_valid is None else min_valid
        if token is not None and token.remaining(self.clock.mono) >= floor:
            return token
        raise TokenUnavailable("no token with enough validity left", profile=profile)

    async def report_rejected(self, profile: str, sha256: str, *, timeout: float) -> Token:
        self.reports.append((profile, sha256))
        token = self.tokens[profile]
        if self.on_report is not None:
            return await self.on_report(profile, sha256, timeout)
        if token is not None and token.sha256 == sha256:
            token = self.issue(profile, token.access_token + "-renewed")
        if token is None:
            raise TokenUnavailable("no token", profile=profile)
        return token

    def status(self) -> list[ProfileStatus]:
        return [self._status(name, token) for name, token in self.tokens.items()]

    def _status(self, name: str, token: Token | None) -> ProfileStatus:
        now = self.clock.mono
        valid = token is not None and token.remaining(now) >= self.min_valid
        return ProfileStatus(
            profile=name,
            account="default",
            state="fresh" if valid else "empty",
            valid=valid,
            token_fingerprint=token.fingerprint if token else None,
            expires_in=token.remaining(now) if token else None,
            expires_at=token.wall_expires_at if token else None,
            last_refresh=None,
            next_refresh_in=self.next_refresh_in.get(name),
            retry_after=self.retry_after.get(name),
            last_error=None,
        )
