"""Classify a token endpoint's answer: pure functions, no I/O, every clock reading passed in.

A 200 with a usable body becomes a :class:`FetchResult`; everything else becomes one of the
:class:`~broker.exceptions.UpstreamError` subclasses, following Colt's error table
(``colt-auth-api.md``) and RFC 6749 §5.2.

How long a token lives
----------------------
``expires_in`` and ``exp - iat`` are *relative* figures: no clock skew between Colt and this
host can distort them. ``exp`` alone is an absolute time that only our wall clock can interpret,
so it is the last resort. Hence:

1. ``expires_in`` when valid (a positive number, or a numeric string);
2. if the JWT carries both ``exp`` and ``iat``, the smaller of that and ``exp - iat``
   (conservative: the shorter figure wins);
3. without a valid ``expires_in``: ``exp - iat``, else ``exp - now_wall``;
4. nothing positive: :class:`UpstreamUnavailable` ("token without a usable lifetime").

Lifetimes above 24 h are capped. The JWT is read without verifying its signature (Colt
publishes no key set); it is only a hint about the lifetime, never a reason to trust anything.
``clock_skew`` (``iat``, or ``exp - lifetime``, minus our wall time at arrival) is reported for
the engine to log, never used to move a deadline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from broker._token import Token
from broker._upstream_errors import error_for_status, header_value, parse_retry_after
from broker._upstream_redact import excerpt, sanitise
from broker.exceptions import UpstreamDetail, UpstreamUnavailable

MAX_LIFETIME = 24 * 3600.0
DEFAULT_TOKEN_TYPE = "Bearer"  # noqa: S105  # a token type name, not a password
LIFETIME_SOURCES = ("expires_in", "jwt", "jwt_exp")  # a "+capped" suffix marks the 24 h cap

# A token goes into consumers' Authorization headers: visible ASCII only, or it could smuggle
# a header line into their requests.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_JWT_DECODE_OPTIONS: jwt.types.Options = {"verify_signature": False}


@dataclass(frozen=True)
class FetchResult:
    """A token fresh from the endpoint, and what the engine logs about the fetch."""

    token: Token  # deadline on the monotonic clock, counted from the response's arrival
    tracking_id: str
    duration: float  # seconds the exchange took
    clock_skew: float | None  # issuer's clock minus ours, in seconds; None if unknown
    lifetime_source: str  # one of LIFETIME_SOURCES, perhaps with "+capped"


@dataclass(frozen=True)
class Lifetime:
    """How long a token lives, which figure decided it, and the issuer's clock skew."""

    seconds: float
    source: str
    clock_skew: float | None


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tracking_id: str,
    received_mono: float,
    received_wall: float,
    secret: str | None = None,
    duration: float = 0.0,
    tracking_header: str | None = None,
) -> FetchResult:
    """The token in a 200 response, or raise the UpstreamError that says what went wrong.

    ``headers`` should be case-insensitive (``httpx.Headers``); ``secret`` is redacted from
    anything quoted back; ``tracking_header`` (the name sent) makes Colt's 400-004 say which
    name was missing.
    """
    if status != 200:
        raise error_for_status(
            status,
            headers,
            body,
            tracking_id=tracking_id,
            now_wall=received_wall,
            secret=secret,
            tracking_header=tracking_header,
        )
    data = _json_object(body)
    if data is None:
        quoted = _quote_200(body, headers, secret)
        raise _unusable("200 with a body that is not a JSON object", tracking_id, quoted)
    token, lifetime = _token_from(data, tracking_id, received_mono, received_wall)
    return FetchResult(token, tracking_id, duration, lifetime.clock_skew, lifetime.source)


def decide_lifetime(access_token: str, expires_in: object, now_wall: float) -> Lifetime | None:
    """Seconds the token lives, by the rule in the module docstring; None if nothing usable."""
    valid_expires_in = _positive_seconds(expires_in)
    exp, iat = _jwt_times(access_token)
    seconds, source = _pick_lifetime(valid_expires_in, exp, iat, now_wall)
    if seconds is None or seconds <= 0:
        return None
    skew = _clock_skew(seconds, source, exp, iat, now_wall)
    if seconds > MAX_LIFETIME:
        seconds, source = MAX_LIFETIME, f"{source}+capped"
    return Lifetime(seconds, source, skew)


def _token_from(
    data: dict[str, Any], tracking_id: str, received_mono: float, received_wall: float
) -> tuple[Token, Lifetime]:
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _unusable("200 without access_token", tracking_id, _field_names(data))
    if not _HEADER_SAFE.fullmatch(access_token):
        summary = "200 with an access_token that cannot go in a header (spaces or controls)"
        raise _unusable(summary, tracking_id, _field_names(data))
    lifetime = decide_lifetime(access_token, data.get("expires_in"), received_wall)
    if lifetime is None:
        summary = "token without a usable lifetime (no positive expires_in, exp or iat)"
        raise _unusable(summary, tracking_id, _field_names(data))
    token = Token(
        access_token=access_token,
        token_type=_token_type(data.get("token_type")),
        obtained_at=received_mono,
        expires_at=received_mono + lifetime.seconds,
        wall_expires_at=received_wall + lifetime.seconds,
    )
    return token, lifetime


def _token_type(value: object) -> str:
    # Kept as given ("bearer", Apigee's "BearerToken"): consumers compare it case-insensitively.
    if isinstance(value, str) and len(value) <= 64 and _HEADER_SAFE.fullmatch(value):
        return value
    return DEFAULT_TOKEN_TYPE


def _pick_lifetime(
    expires_in: float | None, exp: float | None, iat: float | None, now_wall: float
) -> tuple[float | None, str]:
    if exp is not None and iat is not None:
        claimed = exp - iat
        if expires_in is None or claimed < expires_in:
            return claimed, "jwt"
    if expires_in is not None:
        return expires_in, "expires_in"
    if exp is not None:
        return exp - now_wall, "jwt_exp"
    return None, "none"


def _clock_skew(
    seconds: float, source: str, exp: float | None, iat: float | None, now_wall: float
) -> float | None:
    if iat is not None:
        return iat - now_wall
    if exp is not None and source != "jwt_exp":  # exp - now_wall would report 0 by definition
        return (exp - seconds) - now_wall
    return None


def _positive_seconds(value: object) -> float | None:
    if isinstance(value, bool):  # JSON true is not a number of seconds
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _jwt_times(access_token: str) -> tuple[float | None, float | None]:
    if access_token.count(".") != 2:  # opaque, or an encrypted JWE: no readable claims
        return None, None
    try:
        claims = jwt.decode(access_token, options=_JWT_DECODE_OPTIONS)
    except (jwt.PyJWTError, ValueError, TypeError):
        return None, None
    return _numeric_date(claims.get("exp")), _numeric_date(claims.get("iat"))


def _numeric_date(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        return None
    return data if isinstance(data, dict) else None


def _quote_200(body: bytes, headers: Mapping[str, str], secret: str | None) -> str | None:
    if body.lstrip()[:1] in (b"<", b"{", b"["):  # markup or broken JSON: redaction can see keys
        return excerpt(body, [secret])
    # Bare text may be the token itself: describe it, never quote it.
    kind = sanitise(header_value(headers, "content-type") or "no Content-Type", limit=60)
    return f"{len(body)} bytes, {kind}"


def _field_names(data: Mapping[str, object]) -> str:
    # Names only: values of a 200 body may include an opaque token under any key.
    return sanitise("fields: " + ", ".join(sorted(str(k) for k in data)))


def _unusable(summary: str, tracking_id: str, quoted: str | None) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        summary, UpstreamDetail(status=200, tracking_id=tracking_id, excerpt=quoted)
    )


__all__ = [
    "LIFETIME_SOURCES",
    "MAX_LIFETIME",
    "FetchResult",
    "Lifetime",
    "classify_response",
    "decide_lifetime",
    "parse_retry_after",
]
