"""A credential profile after configuration is resolved: what the engine works from."""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_URLS = {
    "production": "https://apis.colt.net/authentication/v1/oauth/token",
    "sandbox": "https://sandbox.apis.colt.net/authentication/v1/oauth/token",
}


class Secret:
    """A client secret that no repr, str, log line or error can show."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source  # where it came from, e.g. "file /etc/colt-broker/x.secret"

    def reveal(self) -> str:
        """The secret itself: only for the Authorization header of a token request."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>, source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProfileConfig:
    """Every setting of one profile, defaults applied."""

    name: str
    client_id: str
    secret: Secret = field(repr=False)
    token_url: str
    account: str = "default"
    min_valid: float = 60.0
    refresh_ahead: float = 0.2
    refresh_jitter: float = 0.05
    upstream_timeout: float = 10.0
    tracking_header: str = "APIGWTrackingId"
    scope: str | None = None
    max_requests_per_minute: int = 6
    max_requests_per_day: int = 500
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None
