"""Colt's token-endpoint rules without I/O: the error table, request validation, the quota.

Validation order (the first failing check answers), Colt's error table as far as it makes sense:

====  =======  ==========================================================================
step  answer   when
====  =======  ==========================================================================
1     400-001  no Authorization header
2     400-003  no (or an empty) Content-Type header
3     415-001  Content-Type is not application/x-www-form-urlencoded (parameters allowed)
4     400-002  no grant_type in the body
5     400-004  none of the tracking headers present (message names the first configured)
6     400-005  a query string; a body parameter other than grant_type (and the accepted
               extras, none by default: ``scope`` is rejected); a repeated parameter;
               client_id/client_secret in the body; more than one Authorization header
7     400-006  grant_type other than client_credentials
8     401-002  Authorization scheme is not Basic
9     401-001  Basic credentials empty, not base64, not UTF-8, or without ``id:secret``
10    401-002  unknown client id or wrong secret
====  =======  ==========================================================================

Basic credentials are compared as sent (not form-urldecoded first). Error bodies are flat:
``{"status", "code", "reason", "message", "details"}``; Colt publishes no code for 429, so
that body has none. Texts are the published ones; ``details`` of 400-005 and of the
wrong-credentials 401-002 are inferred (the page truncates or omits them).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from urllib.parse import parse_qsl

from broker._emulator_http import HttpRequest

FORM = "application/x-www-form-urlencoded"
_CREDENTIAL_PARAMS = ("client_id", "client_secret")


@dataclass(frozen=True)
class ErrorRow:
    """One row of Colt's error table."""

    status: int
    code: str | None
    reason: str
    message: str
    details: str

    def body(self) -> dict[str, object]:
        """The JSON error object Colt answers with."""
        body: dict[str, object] = {"status": self.status, "code": self.code}
        body |= {"reason": self.reason, "message": self.message, "details": self.details}
        return {k: v for k, v in body.items() if v is not None}


def _row(key: str, reason: str, message: str, details: str | None = None) -> ErrorRow:
    status, _, code = key.partition("-")
    return ErrorRow(int(status), code or None, reason, message, details or message.rstrip("."))


_VALIDATION = "Validation not met"
_AUTHENTICATION = "Authentication error"
BASIC_ONLY = (
    "Client authentication failed due to unsupported authentication method other than Basic."
)

ROWS: dict[str, ErrorRow] = {
    "400-001": _row("400-001", _VALIDATION, "The request is missing authorization parameter."),
    "400-002": _row("400-002", _VALIDATION, "The request is missing grant_type."),
    "400-003": _row("400-003", _VALIDATION, "The request is missing content_type header"),
    "400-004": _row("400-004", _VALIDATION, "The request is missing APIGWTrackingId."),
    "400-005": _row(
        "400-005", _VALIDATION, "Invalid input parameter", "The request contains invalid input."
    ),
    "400-006": _row(
        "400-006",
        _VALIDATION,
        "The authorization grant type is not supported by authorization server",
    ),
    "401-001": _row(
        "401-001",
        _AUTHENTICATION,
        "The authorization parameter is missing.",
        "Client authentication failed due to no client authentication included in the request.",
    ),
    "401-002": _row(
        "401-002", _AUTHENTICATION, "The authorization parameter is not valid.", BASIC_ONLY
    ),
    "415-001": _row(
        "415-001",
        _VALIDATION,
        "The format of the posted body is not supported by the endpoint.",
        "The format of the posted body is not supported by the endpoint.",
    ),
    "429": _row("429", "Too many requests", "quota exceeded", "Too many requests: quota exceeded"),
    "500-001": _row(
        "500-001",
        "Internal error",
        "An unknown internal error occurred",
        "Generic failure message used if no more precise code can be provided.",
    ),
    "500-002": _row(
        "500-002",
        "internal error",
        "O Auth server failed.",
        "The server failed to generate access token",
    ),
    "503-001": _row(
        "503-001",
        "service unavailable",
        "The service is temporarily unavailable",
        "Backend unavailable.",
    ),
}


def error_body(status: int, code: str | None = None) -> dict[str, object]:
    """Colt's body for ``status`` (and ``code``, else the first row of that status).

    A status Colt does not document gets a body of the same shape with the HTTP reason phrase.
    """
    key = f"{status}-{code}" if code else next((k for k in ROWS if k.startswith(str(status))), "")
    if key in ROWS:
        return ROWS[key].body()
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return ErrorRow(status, code, phrase, phrase, phrase).body()


class Rejection(Exception):
    """A token request fails a check: ``row`` is the answer, with ``details`` specialised."""

    def __init__(self, key: str, *, message: str | None = None, details: str | None = None) -> None:
        row = ROWS[key]
        self.row = replace(row, message=message or row.message, details=details or row.details)
        super().__init__(f"{key} {self.row.message}")


@dataclass(frozen=True)
class TokenPolicy:
    """What a valid token request looks like."""

    clients: Mapping[str, str]
    tracking_headers: Sequence[str]
    accepted_params: Collection[str] = ()


def authenticate(request: HttpRequest, policy: TokenPolicy) -> str:
    """The client id of a valid token request; raises :class:`Rejection` in the order above."""
    authorization = request.header("authorization")
    if authorization is None:
        raise Rejection("400-001")
    _check_content_type(request.header("content-type"))
    form = parse_form(request.body)
    if "grant_type" not in dict(form):
        raise Rejection("400-002")
    _check_tracking(request, policy.tracking_headers)
    _check_input(request, form, policy.accepted_params)
    if dict(form)["grant_type"] != "client_credentials":
        raise Rejection("400-006")
    return _check_basic(authorization, policy.clients)


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """The body's form fields in order; undecodable bytes become U+FFFD, never an error."""
    return parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)


def _check_content_type(value: str | None) -> None:
    if value is None or not value.strip():
        raise Rejection("400-003")
    if value.partition(";")[0].strip().lower() != FORM:
        raise Rejection("415-001")


def _check_tracking(request: HttpRequest, names: Sequence[str]) -> None:
    if tracking_id(request, names) is None:
        first = names[0] if names else "APIGWTrackingId"
        raise Rejection(
            "400-004",
            message=f"The request is missing {first}.",
            details=f"The request is missing {first}",
        )


def tracking_id(request: HttpRequest, names: Sequence[str]) -> str | None:
    """The value of the first configured tracking header the request carries (non-empty)."""
    for name in names:
        value = request.header(name)
        if value and value.strip():
            return value.strip()
    return None


def _check_input(
    request: HttpRequest, form: list[tuple[str, str]], accepted: Collection[str]
) -> None:
    problem = _input_problem(request, [name for name, _ in form], accepted)
    if problem is not None:
        raise Rejection("400-005", details=f"The request contains {problem}.")


def _input_problem(request: HttpRequest, names: list[str], accepted: Collection[str]) -> str | None:
    if len(request.header_values("authorization")) > 1:
        return "more than one authorization header"
    if any(name in _CREDENTIAL_PARAMS for name in names):
        return "client credentials in the body as well as in the authorization header"
    if request.query:
        return "query parameters"
    unsupported = sorted({n for n in names if n != "grant_type" and n not in accepted})
    if unsupported:
        return "unsupported parameters: " + ", ".join(n[:40] for n in unsupported[:5])
    repeated = sorted({n for n in names if names.count(n) > 1})
    return f"a repeated parameter: {repeated[0]}" if repeated else None


def _check_basic(authorization: str, clients: Mapping[str, str]) -> str:
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Rejection("401-002", details=BASIC_ONLY)
    pair = decode_basic(credentials)
    if pair is None:
        raise Rejection("401-001")
    client_id, secret = pair
    expected = clients.get(client_id)
    if expected is None or not hmac.compare_digest(expected.encode(), secret.encode()):
        raise Rejection(
            "401-002",
            details="Client authentication failed due to unknown client or invalid credentials.",
        )
    return client_id


def decode_basic(credentials: str) -> tuple[str, str] | None:
    """``(client_id, secret)`` from Basic credentials, or None when empty or malformed."""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, secret = decoded.partition(":")
    return (client_id, secret) if colon and client_id and secret else None


def basic_client_id(request: HttpRequest) -> str | None:
    """The client id a request claims in a Basic Authorization header, valid or not."""
    scheme, _, credentials = (request.header("authorization") or "").strip().partition(" ")
    pair = decode_basic(credentials) if scheme.lower() == "basic" else None
    return pair[0] if pair else None


class SlidingQuota:
    """At most ``limit`` admissions per ``window`` seconds per key (a sliding log).

    Refused requests are not logged, so a client that keeps asking is served again as soon
    as its oldest admission leaves the window.
    """

    def __init__(self, limit: int | None, window: float) -> None:
        self._limit = limit
        self._window = window
        self._log: dict[str, deque[float]] = {}

    def admit(self, key: str, now: float) -> bool:
        """Count one request for ``key`` at monotonic ``now``; False if over the quota."""
        if self._limit is None:
            return True
        log = self._log.setdefault(key, deque())
        while log and log[0] <= now - self._window:
            log.popleft()
        if len(log) >= self._limit:
            return False
        log.append(now)
        return True
