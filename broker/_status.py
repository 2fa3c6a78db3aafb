"""What the engine tells the outside world: per-profile status, and the interface serving uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from broker._token import Token


@dataclass(frozen=True)
class LastError:
    """The last upstream failure of a profile, secret-free."""

    kind: str  # UpstreamError.kind: credentials_rejected, request_rejected, throttled, ...
    summary: str
    at: float  # wall time
    detail: dict[str, object] = field(default_factory=dict)  # UpstreamDetail.as_dict()


@dataclass(frozen=True)
class ProfileStatus:
    """One profile's state at one moment. Never holds a token or a secret."""

    profile: str
    account: str
    state: str  # empty | fresh | refreshing | stale | expired | failed
    valid: bool  # holds a token that may be served (at least min_valid left)
    token_fingerprint: str | None
    expires_in: float | None
    expires_at: float | None  # wall time
    last_refresh: float | None  # wall time of the last token received
    next_refresh_in: float | None
    retry_after: float | None  # seconds until the next upstream attempt, when waiting on one
    last_error: LastError | None
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The JSON document of ``/v1/status``: times of day as ISO 8601 UTC strings, like the
        token document's ``expires_at``; durations as seconds."""
        doc = asdict(self)
        for name in WALL_TIMES:
            doc[name] = iso_utc_or_none(doc[name])
        if isinstance(doc["last_error"], dict):
            doc["last_error"]["at"] = iso_utc_or_none(doc["last_error"]["at"])
        return doc


WALL_TIMES = ("expires_at", "last_refresh")  # ProfileStatus fields that are wall times


def iso_utc(wall: float) -> str:
    """A Unix time as ISO 8601 UTC to the second: ``2026-12-03T18:00:00Z``."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_utc_or_none(wall: object) -> str | None:
    return iso_utc(wall) if isinstance(wall, int | float) else None


def from_iso(text: object) -> float | None:
    """The Unix time of an ISO 8601 string (None for anything else)."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class TokenSource(Protocol):
    """The engine as the serving layer sees it."""

    @property
    def profiles(self) -> Sequence[str]: ...

    def current(self, profile: str, now: float) -> Token | None:
        """Hot path: the token to serve right now with the profile's min_valid, or None.

        Raises KeyError for an unknown profile.
        """

    async def get(self, profile: str, *, min_valid: float | None, timeout: float) -> Token:
        """A token with at least ``min_valid`` (default: the profile's) seconds left.

        Waits for a refresh at most ``timeout`` seconds. Raises KeyError for an unknown profile
        and broker.exceptions.TokenUnavailable when no such token can be had.
        """

    async def report_rejected(self, profile: str, sha256: str, *, timeout: float) -> Token:
        """A consumer saw ``sha256``'s token rejected: refresh if it is still current."""

    def status(self) -> list[ProfileStatus]: ...
