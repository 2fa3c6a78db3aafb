"""Every error colt-broker raises, sorted by who is at fault.

::

    BrokerError
    ├── ConfigError ................ the operator's configuration or secret files (exit 2)
    ├── UpstreamError .............. the token endpoint did not give us a token
    │   ├── CredentialsRejected .... 401: wrong, missing or revoked client id or secret
    │   ├── RequestRejected ........ 400/415: the request was refused as malformed (config or bug)
    │   ├── Throttled .............. 429: wait before asking again
    │   └── UpstreamUnavailable .... 5xx, timeouts, resets, TLS, garbage bodies: transient
    ├── TokenUnavailable ........... the broker holds no token that satisfies the request
    └── BrokerUnavailable .......... a client cannot reach the daemon at all

Each class knows whether retrying soon can help (``retryable``) and which HTTP status the
broker answers a consumer with when this error is why it has no token (``http_status``).
No error ever carries a secret or a whole token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


class BrokerError(Exception):
    """Base class of every error colt-broker raises on purpose."""

    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500


class ConfigError(BrokerError):
    """The configuration or a secret file is unusable; the message names the key, file and fix."""

    http_status = 500


@dataclass(frozen=True)
class UpstreamDetail:
    """What the token endpoint told us, minus anything secret.

    ``excerpt`` is a short, sanitised prefix of a body that was not a Colt error object.
    """

    status: int | None = None
    code: str | None = None
    reason: str | None = None
    message: str | None = None
    tracking_id: str | None = None
    excerpt: str | None = None
    retry_after: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The non-empty fields, for problem responses, status and logs."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class UpstreamError(BrokerError):
    """The token endpoint failed to hand out a token."""

    summary: str
    detail: UpstreamDetail = field(default_factory=UpstreamDetail)

    kind: ClassVar[str] = "upstream_error"
    http_status = 503

    def __post_init__(self) -> None:
        super().__init__(self.summary)

    def __str__(self) -> str:
        d = self.detail
        parts = [self.summary]
        if d.status is not None:
            parts.append(f"HTTP {d.status}")
        if d.code:
            parts.append(f"code {d.code}")
        if d.message:
            parts.append(repr(d.message))
        if d.tracking_id:
            parts.append(f"tracking id {d.tracking_id}")
        return "; ".join(parts)


class CredentialsRejected(UpstreamError):
    """The client id or secret was refused: fix the credentials; retrying soon will not help."""

    kind = "credentials_rejected"


class RequestRejected(UpstreamError):
    """The token request was refused as malformed: a configuration problem or a broker bug."""

    kind = "request_rejected"


class Throttled(UpstreamError):
    """HTTP 429: the account is over its quota; no request until ``detail.retry_after`` passes."""

    kind = "throttled"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    """A transient failure: 5xx, timeout, reset, TLS error, or a body we cannot use."""

    kind = "upstream_unavailable"
    retryable = True


class TokenUnavailable(BrokerError):
    """No token satisfies the request (upstream down, throttled, rejected, or too short-lived)."""

    http_status = 503
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        profile: str | None = None,
        retry_after: float | None = None,
        cause: UpstreamError | None = None,
        problem: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.profile = profile
        self.retry_after = retry_after
        self.cause = cause
        self.problem = problem or {}


class BrokerUnavailable(BrokerError):
    """The daemon could not be reached at any of the places a client looked."""

    retryable = True
    http_status = 503
