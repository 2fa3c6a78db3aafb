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

Plain classes, no dataclasses: ``colt-broker token`` imports this module, and importing
dataclasses (with inspect) would cost it more start-up time than its whole exchange.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: see above
if TYPE_CHECKING:
    from typing import ClassVar

_DETAIL_FIELDS = ("status", "code", "reason", "message", "tracking_id", "excerpt", "retry_after")


class BrokerError(Exception):
    """Base class of every error colt-broker raises on purpose."""

    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500


class ConfigError(BrokerError):
    """The configuration or a secret file is unusable; the message names the key, file and fix."""

    http_status = 500


class UpstreamDetail:
    """What the token endpoint told us, minus anything secret.

    ``excerpt`` is a short, sanitised prefix of a body that was not a Colt error object.
    """

    __slots__ = _DETAIL_FIELDS

    def __init__(
        self,
        *,
        status: int | None = None,
        code: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        tracking_id: str | None = None,
        excerpt: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.reason = reason
        self.message = message
        self.tracking_id = tracking_id
        self.excerpt = excerpt
        self.retry_after = retry_after

    def as_dict(self) -> dict[str, object]:
        """The non-empty fields, for problem responses, status and logs."""
        values = ((name, getattr(self, name)) for name in _DETAIL_FIELDS)
        return {name: value for name, value in values if value is not None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UpstreamDetail) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable value object, like a dataclass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"UpstreamDetail({fields})"


class UpstreamError(BrokerError):
    """The token endpoint failed to hand out a token."""

    kind: ClassVar[str] = "upstream_error"
    http_status = 503

    def __init__(self, summary: str, detail: UpstreamDetail | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail if detail is not None else UpstreamDetail()

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
        client_error: bool = False,
    ) -> None:
        super().__init__(message)
        self.client_error = client_error  # the request itself cannot be met (400, not 503)
        self.profile = profile
        self.retry_after = retry_after
        self.cause = cause
        self.problem = problem or {}


class BrokerUnavailable(BrokerError):
    """The daemon could not be reached at any of the places a client looked."""

    retryable = True
    http_status = 503
