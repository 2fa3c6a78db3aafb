"""Problem responses (RFC 9457): every refusal says what went wrong and what to do next.

The TCP gate's refusals (no Host, a foreign Host, no key, a wrong key) close the connection:
loopback TCP is open to every local user, and one without the key must not be able to hold
connections (and the daemon's descriptors) open by repeating refused requests.

Broker-specific problems carry a stable ``type`` URI, ``urn:colt-broker:problem:<kind>``, that
clients may switch on; plain HTTP failures (404 path, 405, malformed requests) use
``about:blank``. ``detail`` is written for the person at the terminal. Nothing here ever
contains a token, a secret or the ``X-Colt-Broker`` key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from broker.exceptions import TokenUnavailable, UpstreamError

TYPE_PREFIX = "urn:colt-broker:problem:"
KEY_HEADER = "X-Colt-Broker"
_CORE_KEYS = frozenset({"type", "status", "title", "detail"})  # ours, whatever extras say

ENDPOINTS = (
    "GET /v1/token[/PROFILE], POST /v1/token/PROFILE/refresh, GET /v1/status, "
    "GET /healthz, GET /readyz, GET /metrics"
)

_ADVICE = {
    "credentials_rejected": "Colt rejected this profile's client credentials: fix client_id or "
    "the secret, then reload the broker (systemctl reload colt-broker). Retrying will not help.",
    "request_rejected": "Colt refused the token request as malformed: check the profile's "
    "token_url, scope and tracking_header settings (colt-broker check).",
    "throttled": "Colt is throttling this account (HTTP 429); ask again after Retry-After.",
    "upstream_unavailable": "Colt's token endpoint is failing or unreachable; the broker keeps "
    "retrying with backoff. Ask again later.",
}
_DEFAULT_ADVICE = "See `colt-broker status` for the profile's state and last upstream error."


@dataclass(frozen=True)
class Problem:
    """One problem response, before it becomes bytes."""

    status: int
    title: str
    detail: str
    kind: str | None = None  # a stable slug: the type URI's last part; None -> about:blank
    profile: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)
    retry_after: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # the connection cannot carry another request after this one

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.kind if self.kind else "about:blank"

    def as_dict(self) -> dict[str, object]:
        """The JSON body: the RFC 9457 members, the profile, then any extension members."""
        body: dict[str, object] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.profile is not None:
            body["profile"] = self.profile
        body.update((k, v) for k, v in self.extra.items() if k not in _CORE_KEYS)
        return body

    def response_headers(self) -> list[tuple[str, str]]:
        """Extra headers: ``Retry-After`` (whole seconds, rounded up) and any of its own."""
        headers = list(self.headers)
        if self.retry_after is not None:
            # At least 1: "Retry-After: 0" invites a client to spin.
            headers.append(("Retry-After", str(max(1, math.ceil(self.retry_after)))))
        return headers


def _names(profiles: Iterable[str]) -> str:
    return ", ".join(sorted(profiles)) or "(none configured)"


def clip(text: str, limit: int = 80) -> str:
    """A client-supplied string made safe to echo: printable, short."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def not_found(path: str) -> Problem:
    return Problem(404, "Not Found", f"No endpoint at {clip(path)!r}. Endpoints: {ENDPOINTS}.")


def unknown_profile(name: str, profiles: Iterable[str]) -> Problem:
    detail = f"No profile named {clip(name)!r}. Configured profiles: {_names(profiles)}."
    return Problem(404, "Unknown profile", detail, kind="unknown-profile", profile=clip(name))


def no_default_profile(profiles: Iterable[str]) -> Problem:
    detail = (
        "No default profile is configured; name one in the path, GET /v1/token/PROFILE. "
        f"Configured profiles: {_names(profiles)}."
    )
    return Problem(404, "No default profile", detail, kind="no-default-profile")


def method_not_allowed(method: str, allow: str) -> Problem:
    detail = f"{clip(method)} is not supported here; use {allow}."
    return Problem(405, "Method Not Allowed", detail, headers=(("Allow", allow),))


def bad_request(detail: str, *, close: bool = False, profile: str | None = None) -> Problem:
    return Problem(400, "Bad Request", detail, profile=profile, close=close)


def content_too_large(limit: int) -> Problem:
    detail = f"Request bodies are limited to {limit} bytes; the refresh body is a small JSON."
    return Problem(413, "Content Too Large", detail, close=True)


def uri_too_long(limit: int) -> Problem:
    return Problem(414, "URI Too Long", f"Request lines are limited to {limit} bytes.", close=True)


def headers_too_large(detail: str) -> Problem:
    return Problem(431, "Request Header Fields Too Large", detail, close=True)


def request_timeout(seconds: float) -> Problem:
    detail = f"The request was not complete within {seconds:g} seconds."
    return Problem(408, "Request Timeout", detail, close=True)


def overloaded(limit: int, *, transport: str = "") -> Problem:
    """503 for a connection past the cap (``transport`` "TCP": past the TCP share)."""
    which = f"{transport} connections" if transport else "connections"
    detail = f"The broker is serving its maximum of {limit} {which}; try again shortly."
    if transport:
        detail += " The Unix socket keeps connections of its own in reserve."
    return Problem(
        503, "Too many connections", detail, kind="overloaded", retry_after=1, close=True
    )


def internal_error() -> Problem:
    detail = (
        "The broker failed to handle this request (a bug); other requests are unaffected. "
        "Its log has the details under the event http.handler_failed."
    )
    return Problem(500, "Internal Server Error", detail, kind="internal-error")


def host_not_loopback(host: str) -> Problem:
    detail = (
        f"Host {clip(host)!r} is not a loopback name (DNS rebinding protection). "
        "Address the broker as 127.0.0.1, [::1] or localhost."
    )
    return Problem(403, "Host not allowed", detail, kind="host-not-loopback", close=True)


def missing_host() -> Problem:
    return bad_request(
        "The Host header is missing; HTTP/1.1 requests over TCP must carry one.", close=True
    )


def missing_key(auth: str, key_dir: str) -> Problem:
    """401: the request lacks the ``X-Colt-Broker`` header."""
    if auth == "none":
        how = f"any non-empty value will do, e.g. -H '{KEY_HEADER}: 1'"
    else:
        how = f"add -H @{key_dir}/curl-headers (the key is in {key_dir}/http-key)"
    detail = f"Requests over TCP must carry the {KEY_HEADER} header: {how}."
    challenge = (("WWW-Authenticate", f'{KEY_HEADER} header="{KEY_HEADER}"'),)
    return Problem(
        401,
        "Missing X-Colt-Broker header",
        detail,
        kind="missing-key",
        headers=challenge,
        close=True,
    )


def wrong_key(key_dir: str) -> Problem:
    detail = (
        f"The {KEY_HEADER} header does not match the broker's key, which is made anew at "
        f"every start: re-read {key_dir}/http-key, or use -H @{key_dir}/curl-headers."
    )
    return Problem(403, "Wrong X-Colt-Broker key", detail, kind="wrong-key", close=True)


def peer_not_allowed(profile: str, who: str) -> Problem:
    detail = (
        f"Profile {profile!r} serves only the users and groups in its allowed_uids / "
        f"allowed_gids; {who} is not among them. Ask the operator, or use a permitted account."
    )
    return Problem(403, "Peer not allowed", detail, kind="peer-not-allowed", profile=profile)


def tcp_not_allowed(profile: str, socket_hint: str) -> Problem:
    detail = (
        f"Profile {profile!r} is restricted to certain users, which only the Unix socket can "
        f"verify; ask over it instead: curl --unix-socket {socket_hint} http://localhost/v1/token/"
        f"{profile}"
    )
    return Problem(403, "Peer not allowed", detail, kind="peer-not-allowed", profile=profile)


def token_unavailable(exc: TokenUnavailable, profile: str) -> Problem:
    """503 (or the error's own status) from the engine's ``TokenUnavailable``, upstream detail
    included: the upstream HTTP status, Colt's code/reason/message and the tracking id.

    A request no token could ever satisfy (``exc.client_error``: a min_valid beyond the
    tokens' lifetime) is the client's to change: 400, without Retry-After.
    """
    if getattr(exc, "client_error", False):  # getattr: set by engines that know the case
        return min_valid_too_large(str(exc), profile)
    cause = exc.cause
    kind = cause.kind if isinstance(cause, UpstreamError) else "token-unavailable"
    advice = _ADVICE.get(kind, _DEFAULT_ADVICE)
    extra: dict[str, object] = {}
    retry_after = exc.retry_after
    if isinstance(cause, UpstreamError):
        extra["upstream"] = cause.detail.as_dict()
        retry_after = retry_after if retry_after is not None else cause.detail.retry_after
    extra.update(exc.problem)
    return Problem(
        exc.http_status,
        "Token unavailable",
        _sentence(str(exc)) + " " + advice,
        kind=kind.replace("_", "-"),
        profile=profile,
        extra=extra,
        retry_after=retry_after,
    )


def min_valid_too_large(message: str, profile: str) -> Problem:
    """400: ``message`` (the engine's) names the tokens' lifetime and asks for less."""
    detail = f"{_sentence(message)} Retrying the same request will not help."
    return Problem(400, "min_valid too large", detail, kind="min-valid-too-large", profile=profile)


def wait_timed_out(profile: str, seconds: float, retry_after: float | None = None) -> Problem:
    """503 when the broker's own bound on a wait passed; ``retry_after``: when the engine
    expects to try upstream next, if it knows."""
    detail = (
        f"No token with the requested validity arrived within {seconds:g} seconds. "
        f"{_DEFAULT_ADVICE}"
    )
    return Problem(
        503,
        "Token unavailable",
        detail,
        kind="token-unavailable",
        profile=profile,
        retry_after=retry_after,
    )


def _sentence(text: str) -> str:
    """End a message with a full stop, so the advice that follows reads as its own sentence."""
    return text if text.endswith((".", "!", "?")) else text + "."
