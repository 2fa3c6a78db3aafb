"""Responses as bytes, and the token response cache that makes the hot path one dict lookup.

A token response changes only when the token does, when ``expires_in`` (whole seconds) ticks,
or when the ``Date`` second ticks; so it is rendered once per (profile, format, connection
header) and that combination, and served as the same ``bytes`` object until then.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus

from broker._clock import Clock
from broker._http._problem import Problem
from broker._status import iso_utc
from broker._token import Token

# What the Connection header says: nothing (HTTP/1.1 keep-alive), close, or keep-alive
# (HTTP/1.0, which closes unless told otherwise).
CONN_DEFAULT, CONN_CLOSE, CONN_KEEP_ALIVE = 0, 1, 2
_CONN_LINES = (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n")
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_ALWAYS = b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

JSON_TYPE = "application/json"
PROBLEM_TYPE = "application/problem+json"
TEXT_TYPE = "text/plain; charset=utf-8"
FORMAT_JSON, FORMAT_RAW = "json", "raw"

Headers = Sequence[tuple[str, str]]


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()


def strip_body(response: bytes) -> bytes:
    """The head of a rendered response: what a HEAD request gets."""
    return response[: response.index(b"\r\n\r\n") + 4]


def dump_json(obj: object) -> bytes:
    """Compact-enough JSON with a final newline, so ``curl`` output ends its line."""
    return json.dumps(obj, default=str).encode() + b"\n"


def wants_text(accept: bytes | None) -> bool:
    """Whether an Accept header asks for the raw token rather than JSON."""
    if not accept:
        return False
    accept = accept.lower()
    return b"text/plain" in accept and b"application/json" not in accept


class Renderer:
    """Builds whole responses: status line, headers (``Date`` cached per second), body."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._second = -1
        self._date = b""

    def second(self) -> int:
        return int(self._clock.wall())

    def date_line(self, second: int) -> bytes:
        if second != self._second:
            self._second, self._date = (
                second,
                f"Date: {formatdate(second, usegmt=True)}\r\n".encode(),
            )
        return self._date

    def response(
        self,
        status: int,
        content_type: str,
        body: bytes,
        conn: int,
        headers: Headers = (),
        *,
        head: bool = False,
        second: int | None = None,
    ) -> bytes:
        """One complete response; ``head`` keeps Content-Length but drops the body."""
        parts = [
            status_line(status),
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode(),
            _ALWAYS,
            self.date_line(self.second() if second is None else second),
            _CONN_LINES[conn],
            *(f"{name}: {value}\r\n".encode() for name, value in headers),
            b"\r\n",
        ]
        if not head:
            parts.append(body)
        return b"".join(parts)

    def json(self, status: int, obj: object, conn: int, *, head: bool = False) -> bytes:
        return self.response(status, JSON_TYPE, dump_json(obj), conn, head=head)

    def problem(self, problem: Problem, conn: int, *, head: bool = False) -> bytes:
        conn = CONN_CLOSE if problem.close else conn
        body = dump_json(problem.as_dict())
        return self.response(
            problem.status, PROBLEM_TYPE, body, conn, problem.response_headers(), head=head
        )


def token_document(profile: str, token: Token, expires_in: int) -> dict[str, object]:
    """The JSON body of ``GET /v1/token``: users script against these names."""
    return {
        "access_token": token.access_token,
        "token_type": token.token_type,
        "expires_in": expires_in,
        "expires_at": iso_utc(token.wall_expires_at),
        "profile": profile,
    }


class TokenResponses:
    """Rendered ``200`` token responses, reused until the token, second or expires_in changes.

    Keys are (profile, format, connection header): bounded by the configured profiles, since
    only known profiles get this far. ``clear`` on reload.
    """

    def __init__(self, renderer: Renderer) -> None:
        self._renderer = renderer
        self._cache: dict[tuple[str, str, int], tuple[Token, int, int, bytes]] = {}

    def get(self, profile: str, token: Token, now: float, fmt: str, conn: int) -> bytes:
        expires_in = int(token.expires_at - now)  # floor: callers serve only unexpired tokens
        second = self._renderer.second()
        key = (profile, fmt, conn)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is token and hit[1] == expires_in and hit[2] == second:
            return hit[3]
        data = self.render(profile, token, expires_in, fmt=fmt, conn=conn, second=second)
        self._cache[key] = (token, expires_in, second, data)
        return data

    def render(
        self, profile: str, token: Token, expires_in: int, *, fmt: str, conn: int, second: int
    ) -> bytes:
        if fmt == FORMAT_RAW:
            body, content_type = token.access_token.encode() + b"\n", TEXT_TYPE
        else:
            body, content_type = dump_json(token_document(profile, token, expires_in)), JSON_TYPE
        return self._renderer.response(200, content_type, body, conn, second=second)

    def clear(self) -> None:
        self._cache.clear()
