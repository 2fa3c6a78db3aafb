"""``GET /v1/token[/{profile}]`` and ``POST /v1/token/{profile}/refresh``.

The hot path (a current token, no waiting) is synchronous: resolve the profile, check the
peer, ask ``source.current`` and hand back cached bytes. Anything that must wait for the
engine (``min_valid`` beyond the current token, no token yet, a reported rejection) returns
a coroutine that the protocol runs as a task, bounded by ``wait_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from urllib.parse import parse_qsl, unquote_to_bytes

import structlog

from broker._clock import Clock
from broker._http import _problem
from broker._http._access import peer_allowed
from broker._http._problem import Problem
from broker._http._render import (
    FORMAT_JSON,
    FORMAT_RAW,
    TokenResponses,
    strip_body,
    wants_text,
)
from broker._http._reply import Replier, debug_enabled
from broker._http._request import GET_HEAD, ConnInfo, Reply, Request
from broker._metrics import UNKNOWN_PROFILE
from broker._profile import ProfileConfig
from broker._status import ProfileStatus, TokenSource
from broker._token import Token, sha256_hex
from broker.exceptions import TokenUnavailable

log = structlog.get_logger("broker.http")

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_REFRESH_BODY = 'the body must be JSON: {"access_token": "..."} or {"sha256": "<64 hex digits>"}'


def parse_options(query: bytes, accept: bytes | None) -> tuple[float | None, str] | Problem:
    """(min_valid, format) from the query string and Accept header, or a 400 problem."""
    min_valid: float | None = None
    fmt: str | None = None
    try:
        pairs = parse_qsl(
            query.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=16
        )
    except ValueError:
        return _problem.bad_request("Too many query parameters.")
    for key, value in pairs:
        if key == "min_valid":
            min_valid = _seconds(value)
            if min_valid is None:
                return _problem.bad_request(
                    f"min_valid must be a number of seconds >= 0, not {_problem.clip(value)!r}."
                )
        elif key == "format":
            if value not in (FORMAT_JSON, FORMAT_RAW):
                return _problem.bad_request(
                    f"format must be json or raw, not {_problem.clip(value)!r}."
                )
            fmt = value
    return min_valid, fmt or (FORMAT_RAW if wants_text(accept) else FORMAT_JSON)


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_rejected(body: bytes, profile: str) -> str | Problem:
    """The hex SHA-256 of the token a refresh request names, or why the body is unusable.

    The body is read as JSON whatever its Content-Type says: ``curl -d`` labels it
    ``application/x-www-form-urlencoded``, and the body's shape is what matters.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _problem.bad_request(f"Unreadable body: {_REFRESH_BODY}.", profile=profile)
    if isinstance(doc, dict):  # exactly one of the two names; other members are ignored
        token, digest = doc.get("access_token"), doc.get("sha256")
        if isinstance(token, str) and token and digest is None:
            return sha256_hex(token)
        if isinstance(digest, str) and _HEX64.fullmatch(digest) and token is None:
            return digest.lower()
    return _problem.bad_request(f"Unusable body: {_REFRESH_BODY}.", profile=profile)


def retry_hint(statuses: Iterable[ProfileStatus], profile: str) -> float | None:
    """When to ask again for ``profile``: its wait for upstream (``retry_after``), else its
    next refresh; None when the status tells neither."""
    for status in statuses:
        if status.profile == profile:
            if status.retry_after is not None:
                return status.retry_after
            return status.next_refresh_in
    return None


class TokenEndpoints:
    """The two token endpoints, over one TokenSource."""

    def __init__(
        self,
        source: TokenSource,
        reply: Replier,
        *,
        clock: Clock,
        wait_timeout: float,
    ) -> None:
        self._source = source
        self._reply = reply
        self._clock = clock
        self._wait_timeout = wait_timeout
        self.socket_hint = "<the broker's socket>"  # for messages; see App.locate
        self._responses = TokenResponses(reply.renderer)
        self._profiles: Mapping[str, ProfileConfig] = {}
        self._names: dict[bytes, str] = {}
        self._default: str | None = None

    def update(self, profiles: Mapping[str, ProfileConfig], default_profile: str | None) -> None:
        self._profiles = dict(profiles)
        self._names = {name.encode(): name for name in profiles}
        self._default = default_profile
        self._responses.clear()

    def route(self, req: Request, conn: ConnInfo, rest: bytes) -> Reply:
        """``rest`` is the path after ``/v1/token``."""
        if rest in (b"", b"/"):
            return self._get(req, conn, None)
        if rest[:1] == b"/":
            name, slash, action = rest[1:].partition(b"/")
            if not slash:
                return self._get(req, conn, name)
            if action == b"refresh":
                return self._refresh(req, conn, name)
        path = req.path.decode("latin-1")
        return self._reply.problem(req, conn, UNKNOWN_PROFILE, _problem.not_found(path))

    # --- GET -----------------------------------------------------------------------------

    def _get(self, req: Request, conn: ConnInfo, name: bytes | None) -> Reply:
        if req.method not in GET_HEAD:
            problem = _problem.method_not_allowed(req.method.decode("latin-1"), "GET, HEAD")
            return self._reply.problem(req, conn, UNKNOWN_PROFILE, problem)
        profile = self._admit(req, conn, name)
        if not isinstance(profile, str):
            return profile
        options = parse_options(req.query, req.headers.get(b"accept")) if req.query else None
        if isinstance(options, Problem):
            return self._reply.problem(req, conn, profile, options)
        min_valid, fmt = options or (None, self._format(req))
        now = self._clock.monotonic()
        try:
            token = self._source.current(profile, now)
        except KeyError:
            return self._unknown(req, conn, profile)
        if token is not None:
            remaining = token.expires_at - now
            if remaining > 0 and (min_valid is None or remaining >= min_valid):
                return self._serve(req, conn, profile, token, fmt=fmt, now=now)
        return self._wait(req, conn, profile, min_valid, fmt)

    @staticmethod
    def _format(req: Request) -> str:
        return FORMAT_RAW if wants_text(req.headers.get(b"accept")) else FORMAT_JSON

    def _admit(self, req: Request, conn: ConnInfo, name: bytes | None) -> str | bytes:
        """The profile's name, or the rendered refusal (unknown profile, peer not allowed)."""
        profile = self._resolve(name)
        if isinstance(profile, Problem):
            return self._reply.problem(req, conn, UNKNOWN_PROFILE, profile)
        if peer_allowed(self._profiles[profile], conn.peer):
            return profile
        if conn.transport == "tcp":
            refusal = _problem.tcp_not_allowed(profile, self.socket_hint)
        else:
            who = conn.peer.describe() if conn.peer else "a peer without credentials"
            refusal = _problem.peer_not_allowed(profile, who)
        return self._reply.problem(req, conn, profile, refusal)

    def _resolve(self, name: bytes | None) -> str | Problem:
        if not name:
            if self._default is None:
                return _problem.no_default_profile(self._profiles)
            name = self._default.encode()
        profile = self._names.get(name)
        if profile is not None:
            return profile
        decoded = unquote_to_bytes(name).decode("utf-8", "replace")
        if decoded in self._profiles:
            return decoded
        return _problem.unknown_profile(decoded, self._profiles)

    def _serve(
        self, req: Request, conn: ConnInfo, profile: str, token: Token, *, fmt: str, now: float
    ) -> bytes:
        data = self._responses.get(profile, token, now, fmt, req.conn_mode)
        if req.method == b"HEAD":
            data = strip_body(data)
        if not conn.took_token:
            self._first_token(conn, profile, token)
        elif conn.debug:
            log.debug("token.served", profile=profile, token=token.fingerprint, peer=conn.address)
        return self._reply.counted(conn, profile, 200, data)

    def _first_token(self, conn: ConnInfo, profile: str, token: Token) -> None:
        conn.took_token, conn.debug = True, debug_enabled()
        fields: dict[str, object] = {"transport": conn.transport, "peer": conn.address}
        if conn.peer is not None:
            fields.update(uid=conn.peer.uid, gid=conn.peer.gid, pid=conn.peer.pid)
        log.info("peer.first_token", profile=profile, token=token.fingerprint, **fields)

    async def _wait(
        self, req: Request, conn: ConnInfo, profile: str, min_valid: float | None, fmt: str
    ) -> bytes:
        def get() -> Awaitable[Token]:
            return self._source.get(profile, min_valid=min_valid, timeout=self._wait_timeout)

        return await self._await_token(req, conn, profile, fmt, get)

    async def _report(
        self, req: Request, conn: ConnInfo, profile: str, digest: str, fmt: str
    ) -> bytes:
        def report() -> Awaitable[Token]:
            return self._source.report_rejected(profile, digest, timeout=self._wait_timeout)

        return await self._await_token(req, conn, profile, fmt, report)

    async def _await_token(
        self,
        req: Request,
        conn: ConnInfo,
        profile: str,
        fmt: str,
        call: Callable[[], Awaitable[Token]],
    ) -> bytes:
        try:
            async with asyncio.timeout(self._wait_timeout * 1.1 + 0.05):  # the engine is late
                token = await call()
        except TokenUnavailable as exc:
            return self._reply.problem(req, conn, profile, _problem.token_unavailable(exc, profile))
        except KeyError:
            return self._unknown(req, conn, profile)
        except TimeoutError:
            return self._timed_out(req, conn, profile)
        now = self._clock.monotonic()
        if token.expires_at <= now:  # never serve an expired token, whatever the engine says
            return self._timed_out(req, conn, profile)
        return self._serve(req, conn, profile, token, fmt=fmt, now=now)

    def _timed_out(self, req: Request, conn: ConnInfo, profile: str) -> bytes:
        """The safety net gave up on the engine: 503, with Retry-After if the engine's
        status says when it next tries upstream."""
        retry_after = retry_hint(self._source.status(), profile)
        problem = _problem.wait_timed_out(profile, self._wait_timeout, retry_after)
        return self._reply.problem(req, conn, profile, problem)

    def _unknown(self, req: Request, conn: ConnInfo, profile: str) -> bytes:
        problem = _problem.unknown_profile(profile, self._source.profiles)
        return self._reply.problem(req, conn, UNKNOWN_PROFILE, problem)

    # --- POST refresh ----------------------------------------------------------------------

    def _refresh(self, req: Request, conn: ConnInfo, name: bytes) -> Reply:
        if req.method != b"POST":
            problem = _problem.method_not_allowed(req.method.decode("latin-1"), "POST")
            return self._reply.problem(req, conn, UNKNOWN_PROFILE, problem)
        if not name:  # a refresh names its profile
            return self._reply.problem(
                req, conn, UNKNOWN_PROFILE, _problem.not_found("/v1/token//refresh")
            )
        profile = self._admit(req, conn, name)
        if not isinstance(profile, str):
            return profile
        options = parse_options(req.query, req.headers.get(b"accept"))
        if isinstance(options, Problem):
            return self._reply.problem(req, conn, profile, options)
        digest = parse_rejected(req.body, profile)
        if isinstance(digest, Problem):
            return self._reply.problem(req, conn, profile, digest)
        # Debug: the engine logs the report that leads to a refresh (token.reported_rejected).
        log.debug("token.reported", profile=profile, token=digest[:12], peer=conn.address)
        return self._report(req, conn, profile, digest, options[1])
