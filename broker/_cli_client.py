"""``colt-broker token`` and ``colt-broker status``: thin clients of the running daemon."""

from __future__ import annotations

import sys
import time

from broker._cli import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from broker._locate import call
from broker._wire import Response
from broker.exceptions import BrokerUnavailable

# Not typing's TYPE_CHECKING, nor urllib.parse: importing typing or re (which urllib.parse
# pulls in) would add milliseconds to every `$(colt-broker token)`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(segment: str) -> str:
    """Percent-encode a path segment (RFC 3986 unreserved characters stay)."""
    return "".join(
        c if c in _UNRESERVED else "".join(f"%{b:02X}" for b in c.encode()) for c in segment
    )


def token_command(profile: str | None, min_valid: float | None, *, as_json: bool) -> int:
    """Print the token alone (or its JSON document) on stdout; problems go to stderr."""
    path = "/v1/token" if profile is None else f"/v1/token/{quote(profile)}"
    query = [] if as_json else ["format=raw"]
    if min_valid is not None:
        query.append(f"min_valid={min_valid:g}")
    target = f"{path}?{'&'.join(query)}" if query else path
    try:
        response = call("GET", target)
    except BrokerUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    if response.status != 200:
        return _problem(response)
    sys.stdout.write(response.body.decode())  # the daemon ends both formats with a newline
    return EXIT_OK


def status_command(*, as_json: bool) -> int:
    """Every profile's state: a table for people, JSON for scripts."""
    try:
        response = call("GET", "/v1/status")
    except BrokerUnavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    if response.status != 200:
        return _problem(response)
    if as_json:
        sys.stdout.write(response.body.decode())
        return EXIT_OK
    document = response.json()
    profiles = document.get("profiles", []) if isinstance(document, dict) else []
    sys.stdout.write(render_table(profiles, now=time.time()))
    return EXIT_OK


def render_table(profiles: list[dict[str, Any]], *, now: float) -> str:
    """An aligned table: profile, state, time left, last refresh, requests, last error."""
    header = ("PROFILE", "STATE", "VALID", "EXPIRES IN", "LAST REFRESH", "UPSTREAM", "LAST ERROR")
    rows = [header, *(_row(p, now) for p in profiles)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _row(p: dict[str, Any], now: float) -> tuple[str, ...]:
    counters = p.get("counters") or {}
    error = p.get("last_error") or {}
    return (
        str(p.get("profile", "?")),
        str(p.get("state", "?")),
        "yes" if p.get("valid") else "no",
        _duration(p.get("expires_in")),
        _ago(p.get("last_refresh"), now),
        f"{counters.get('upstream_requests', 0)} req, {counters.get('failures', 0)} failed",
        _error_text(error, p.get("retry_after")),
    )


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds <= 0:
        return "expired"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _ago(iso: object, now: float) -> str:
    from broker._status import from_iso  # `status` only: datetime stays off `token`'s path

    wall = from_iso(iso)
    if wall is None:
        return "never"
    return f"{_duration(max(now - wall, 1))} ago"


def _error_text(error: dict[str, Any], retry_after: object) -> str:
    if not error:
        return "-"
    text = f"{error.get('kind', 'error')}: {error.get('summary', '')}"
    if isinstance(retry_after, int | float):
        text += f" (retry in {_duration(retry_after)})"
    return text


def _problem(response: Response) -> int:
    """Report a problem+json answer on stderr; 404 (unknown profile) is a usage error."""
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    title = problem.get("title") or f"HTTP {response.status}"
    message = f"{title}: {problem['detail']}" if problem.get("detail") else str(title)
    retry = response.headers.get("retry-after")
    if retry:
        message += f" (retry after {retry} s)"
    code = EXIT_USAGE if response.status in (400, 404) else EXIT_UNAVAILABLE
    return _fail(message, code)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"colt-broker: {message}\n")
    return code
