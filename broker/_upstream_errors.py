"""Turn a token endpoint's non-200 answer into the UpstreamError that says who is at fault.

Colt's error table (``colt-auth-api.md``) decides the class; its body is parsed defensively
because its exact shape is not published: a flat ``{"code", "reason", "message", "details"}``,
the same wrapped in ``{"error": {...}}``, ``{"errors": [{...}]}`` or Apigee's
``{"fault": {...}}``, an RFC 6749 §5.2 ``{"error", "error_description"}``, or no JSON at all
(a gateway's HTML page), of which a short sanitised excerpt is kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from broker._upstream_redact import excerpt, sanitise, truncate
from broker.exceptions import (
    CredentialsRejected,
    RequestRejected,
    Throttled,
    UpstreamDetail,
    UpstreamError,
    UpstreamUnavailable,
)

# "004", 4, "4" or "400-004": the optional prefix is the HTTP status the code belongs to.
_CODE = re.compile(r"(?:(\d{3})\s*[-./:_]\s*)?(\d{1,3})")
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?")

_COLT_400 = {
    "001": "the request carried no client credentials (does a proxy strip Authorization?)",
    "002": "the request carried no grant_type (broker bug)",
    "003": "the request carried no Content-Type header (broker bug, or a proxy strips it)",
    "004": "the tracking header name is wrong: set tracking_header "
    "(Colt's newer docs call it x-tracking-id)",
    "005": "the request has unsupported or duplicate parameters: unset scope, and check that "
    "no proxy adds credentials",
    "006": "the grant type is not supported by this endpoint: check token_url",
}
_RFC_400 = {
    "invalid_request": "the token request was refused as invalid (invalid_request)",
    "invalid_grant": "the grant was refused (invalid_grant)",
    "unsupported_grant_type": "the endpoint does not offer the client_credentials grant: "
    "check token_url",
    "invalid_scope": "the scope was refused: check the profile's scope",
}
_COLT_401 = {
    "001": "the endpoint saw no client credentials",
    "002": "the client id or secret is wrong, revoked, or not sent as HTTP Basic",
}
_RFC_CREDENTIALS = {
    "invalid_client": "the client id or secret was refused (invalid_client)",
    "unauthorized_client": "this client may not use the client_credentials grant",
}
_UNAVAILABLE = {
    408: "the token endpoint gave up waiting for the request",
    500: "the token endpoint failed internally",
    502: "a gateway in front of the token endpoint failed",
    503: "the token endpoint is unavailable",
    504: "a gateway timed out waiting for the token endpoint",
}
# Refusals of the request itself: a broker bug, a proxy, or a wrong token_url. Configuration,
# so retried only slowly, like a 400.
_REFUSED = {
    415: "the endpoint refused the body's format (broker bug, or a proxy)",
    404: "the token endpoint was not found: check token_url",
    405: "the token endpoint does not take POST: check token_url",
}


@dataclass(frozen=True)
class ErrorFields:
    """What an error body said, every field sanitised; ``excerpt`` when it was not parseable."""

    code: str | None = None
    reason: str | None = None
    message: str | None = None
    excerpt: str | None = None


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tracking_id: str,
    now_wall: float,
    secret: str | None = None,
    tracking_header: str | None = None,
) -> UpstreamError:
    """The error for a non-200 response (returned, for the caller to raise)."""
    fields = parse_error_body(body, status, secret)
    detail = UpstreamDetail(
        status=status,
        code=fields.code,
        reason=fields.reason,
        message=fields.message,
        tracking_id=tracking_id,
        excerpt=fields.excerpt,
        retry_after=parse_retry_after(header_value(headers, "retry-after"), now_wall),
    )
    if 300 <= status < 400:  # credentials are never re-posted elsewhere: fix token_url
        summary = _redirect_summary(header_value(headers, "location"), secret)
        return RequestRejected(summary, detail)
    cls, summary = _verdict(status, fields.code, detail.retry_after, tracking_header)
    return cls(summary, detail)


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date), at least 0.

    None when absent or unreadable.
    """
    if value is None or not (text := value.strip()):
        return None
    if _NUMBER.fullmatch(text):  # "-5" is not valid, but clearly means "now"
        seconds = float(text)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


def parse_error_body(body: bytes, status: int, secret: str | None = None) -> ErrorFields:
    """Colt's (or RFC 6749's) error fields, or an excerpt of a body that has none."""
    obj = _error_object(body)
    fields = _fields_of(obj, status, secret) if obj is not None else ErrorFields()
    if fields.code is None and fields.reason is None and fields.message is None:
        return ErrorFields(excerpt=excerpt(body, [secret]))
    return fields


def _verdict(
    status: int, code: str | None, retry_after: float | None, tracking_header: str | None
) -> tuple[type[UpstreamError], str]:
    if 400 <= status < 500 and code in _RFC_CREDENTIALS:
        return CredentialsRejected, _RFC_CREDENTIALS[code]
    if status == 401:
        return CredentialsRejected, _COLT_401.get(code or "", "the credentials were rejected")
    if status == 400:
        return RequestRejected, _bad_request_summary(code, tracking_header)
    if status in _REFUSED:
        return RequestRejected, _REFUSED[status]
    if status == 429:
        return Throttled, _throttled_summary(retry_after)
    return UpstreamUnavailable, _unexpected_summary(status)


def _bad_request_summary(code: str | None, tracking_header: str | None) -> str:
    if code == "004" and tracking_header:
        return (
            f"the endpoint did not find the tracking header {tracking_header!r}: set "
            "tracking_header (Colt's newer docs call it x-tracking-id)"
        )
    summary = _COLT_400.get(code or "") or _RFC_400.get(code or "")
    return summary or "the token request was refused as invalid"


def _throttled_summary(retry_after: float | None) -> str:
    if retry_after is None:
        return "throttled by the token endpoint (no Retry-After)"
    return f"throttled by the token endpoint: retry after {retry_after:g}s"


def _unexpected_summary(status: int) -> str:
    if status in _UNAVAILABLE:
        return _UNAVAILABLE[status]
    if status >= 500:
        return "the token endpoint failed"
    return f"unexpected HTTP {status} from the token endpoint"


def _redirect_summary(location: str | None, secret: str | None) -> str:
    try:
        parts = urlsplit(location or "")
    except ValueError:  # e.g. an unbalanced "[" in the host
        parts = urlsplit("")
    # Scheme, host and path only: a query string may carry anything.
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    target = sanitise(origin + parts.path, [secret], limit=120)
    if not target:
        return "unexpected redirect from the token endpoint: check token_url"
    return f"unexpected redirect to {target}: check token_url"


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for _ in range(4):  # unwrap {"error": {...}}, {"errors": [{...}]}, {"fault": {...}}
        if not isinstance(data, dict):
            return None
        data = {str(k).lower(): v for k, v in data.items()}
        inner = _wrapped(data)
        if inner is None:
            return dict(data)
        data = inner
    return None


def _wrapped(data: dict[str, Any]) -> Any:
    for key in ("error", "fault"):
        if isinstance(data.get(key), dict):
            return data[key]
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        return errors[0]
    return None


def _fields_of(obj: dict[str, Any], status: int, secret: str | None) -> ErrorFields:
    detail = obj.get("detail")
    raw_code = _first(obj, "code", "errorcode", "error", "error_code")
    if raw_code is None and isinstance(detail, dict):  # Apigee: fault.detail.errorcode
        raw_code = detail.get("errorcode")
    message = _text(_first(obj, "message", "error_description", "faultstring"), secret)
    details = _text(obj.get("details"), secret)
    if details and details != message:
        message = truncate(f"{message} ({details})", 300) if message else details
    return ErrorFields(
        code=normalise_code(raw_code, status, secret),
        reason=_text(obj.get("reason"), secret),
        message=message,
    )


def normalise_code(raw: object, status: int, secret: str | None = None) -> str | None:
    """Colt's code as three digits ("004") when it is numeric; other codes sanitised as given."""
    text = _text(raw, secret)
    if text is None:
        return None
    match = _CODE.fullmatch(text)
    if match and (match[1] is None or int(match[1]) == status):
        return match[2].zfill(3)
    return truncate(text, 64)


def _first(obj: Mapping[str, Any], *keys: str) -> object:
    for key in keys:
        if obj.get(key) not in (None, ""):
            return obj[key]
    return None


def _text(value: object, secret: str | None) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    raw = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return sanitise(raw, [secret]) or None


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """The header ``name`` (lower case) from httpx.Headers or a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    # Plain dicts are accepted too; httpx.Headers is already case-insensitive.
    return next((v for k, v in headers.items() if k.lower() == name), None)
