"""The hot lane: ``GET /v1/token[/{profile}]`` answered from prepared bytes, in a few steps.

Nearly every request a broker gets is the same one, repeated on a keep-alive connection. The
general path (``App`` -> ``TokenEndpoints``) builds a ``Request``, routes it, parses the query
and resolves the profile each time; this lane answers the common shape of that request with
one dict lookup on the raw request target, the access checks the connection has not already
settled, ``source.current(profile, now)`` (so the engine's ``min_valid`` rule holds per
request) and a cached response. Anything else, and any doubt, returns None: the protocol then
takes the general path, which answers (or refuses) as it always did.

What the lane decides once per connection: the routes it may take (over TCP only profiles
without uid/gid restrictions; over the Unix socket only profiles the peer may read), and
whether per-request logging is wanted (then the lane stays shut). The first token on a
connection always goes the general way, which logs ``peer.first_token``. What it checks per
request over TCP: a loopback ``Host`` (memoised by ``TcpGate``) and the key, compared in
constant time.

Rendered responses are reused until the token changes, the ``Date`` second ticks, or the
whole seconds of ``expires_in`` do: the same bytes as the general path would make.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping

from broker._clock import Clock, SystemClock
from broker._http._access import TcpGate, peer_allowed
from broker._http._render import (
    FORMAT_JSON,
    FORMAT_RAW,
    TokenResponses,
    wants_text,
)
from broker._http._request import ConnInfo
from broker._metrics import Metrics
from broker._profile import ProfileConfig
from broker._status import TokenSource
from broker._token import Token

_PREFIX = b"/v1/token"
_FORMATS = (FORMAT_JSON, FORMAT_RAW)
_QUERIES = ((b"", -1), (b"?format=json", 0), (b"?format=raw", 1))  # -1: Accept decides
_MEMO = 64  # distinct Accept values remembered (honest clients send one or two)
_ROUTE_SETS = 256  # distinct peers' route tables kept


class _Entry:
    """One rendered response (a profile, format and connection mode), shared by every
    connection: valid for ``token`` until ``fresh_until`` (monotonic)."""

    __slots__ = ("data", "fmt", "fresh_until", "mode", "token")

    def __init__(self, fmt: int, mode: int) -> None:
        self.fmt, self.mode = fmt, mode
        self.token: Token | None = None
        self.fresh_until = 0.0
        self.data = b""


class _Route:
    """Where one exact request target leads, for one transport."""

    __slots__ = ("entries", "fmt", "metric", "profile")

    def __init__(self, profile: str, fmt: int, entries: list[_Entry], metric: tuple[object, ...]):
        self.profile = profile
        self.fmt = fmt  # index in _FORMATS, or -1: by the Accept header
        self.entries = entries  # by fmt * 3 + connection mode
        self.metric = metric  # the key counted in Metrics.requests


Routes = dict[bytes, _Route]
Choice = tuple[_Route | None, _Entry | None]


class HotTokens:
    """The service-wide half: routes per peer, rendered responses, the update generation."""

    def __init__(
        self,
        source: TokenSource,
        responses: TokenResponses,
        gate: TcpGate,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.source = source
        self.gate = gate
        self.clock = clock
        self.counts = metrics.requests
        self._metrics = metrics
        self._responses = responses
        self.generation = 0
        self._profiles: Mapping[str, ProfileConfig] = {}
        self._default: str | None = None
        self._entries: dict[str, list[_Entry]] = {}
        self._route_sets: dict[object, Routes] = {}
        self._accept: dict[bytes, int] = {}

    def update(self, profiles: Mapping[str, ProfileConfig], default_profile: str | None) -> None:
        """New profiles (reload): every connection's lane rebuilds its routes."""
        self._profiles = dict(profiles)
        self._default = default_profile
        self._entries = {name: [_Entry(i // 3, i % 3) for i in range(6)] for name in profiles}
        self._route_sets.clear()
        self.generation += 1

    def lane(self, conn: ConnInfo) -> Lane:
        """The hot lane of one new connection."""
        return Lane(self, conn)

    def routes(self, conn: ConnInfo) -> Routes:
        """The exact request targets this connection may have answered from the lane."""
        peer = conn.peer
        who = (conn.transport, None if peer is None else (peer.uid, peer.gid))
        routes = self._route_sets.get(who)
        if routes is None:
            routes = self._build_routes(conn)
            if len(self._route_sets) < _ROUTE_SETS:
                self._route_sets[who] = routes
        return routes

    def _build_routes(self, conn: ConnInfo) -> Routes:
        routes: Routes = {}
        for name, config in self._profiles.items():
            if not peer_allowed(config, conn.peer):
                continue  # the general path words the refusal
            metric = self._metrics.request_key(name, conn.transport, 200)
            paths = [_PREFIX + b"/" + name.encode()]
            if name == self._default:
                paths += [_PREFIX, _PREFIX + b"/"]
            for path in paths:
                for query, fmt in _QUERIES:
                    routes[path + query] = _Route(name, fmt, self._entries[name], metric)
        return routes

    def accept_format(self, accept: bytes) -> int:
        """The format an Accept header asks for (memoised: clients repeat theirs)."""
        fmt = self._accept.get(accept)
        if fmt is None:
            fmt = 1 if wants_text(accept) else 0
            if len(self._accept) < _MEMO:
                self._accept[accept] = fmt
        return fmt

    def render(self, entry: _Entry, profile: str, token: Token, now: float) -> bool:
        """Fill ``entry`` for ``token`` at ``now``; False if the token has no time left."""
        left = token.expires_at - now
        if left <= 0:
            return False
        wall = self.clock.wall()
        second, expires_in = int(wall), int(left)
        entry.data = self._responses.render(
            profile, token, expires_in, fmt=_FORMATS[entry.fmt], conn=entry.mode, second=second
        )
        # Reuse until the Date second or the whole seconds of expires_in change.
        entry.fresh_until = min(now + (second + 1 - wall), token.expires_at - expires_in)
        entry.token = token
        return True


class Lane:
    """One connection's hot lane (see the module docstring)."""

    __slots__ = (
        "_conn", "_counts", "_current", "_generation", "_hot", "_key", "_now", "_routes", "_tcp",
        "chosen",
    )  # fmt: skip

    def __init__(self, hot: HotTokens, conn: ConnInfo) -> None:
        self._hot = hot
        self._conn = conn
        self._tcp = conn.transport == "tcp"
        gate = hot.gate
        self._key: bytes | None = gate.key if gate.auth == "key" else None
        # The system clock's method only wraps time.monotonic: spare the hot path a call.
        clock = hot.clock
        self._now: Callable[[], float] = (
            time.monotonic if isinstance(clock, SystemClock) else clock.monotonic
        )
        self._current = hot.source.current
        self._counts = hot.counts
        self._routes: Routes = {}
        self._generation = -1
        self.chosen: Choice = (None, None)  # what the last answer was: see ``serve``

    def answer(self, url: bytes, headers: Mapping[bytes, bytes], mode: int) -> bytes | None:
        """The response to a parsed GET (no body, keep-alive ``mode``), or None: take the
        general path."""
        if self._generation != self._hot.generation and not self._open():
            return None
        route = self._routes.get(url)
        if route is None:
            return None
        if self._tcp and not self._gate_passes(headers):
            return None
        fmt = route.fmt
        if fmt < 0:
            accept = headers.get(b"accept")
            fmt = 0 if accept is None else self._hot.accept_format(accept)
        self.chosen = choice = (route, route.entries[fmt * 3 + mode])
        return self.serve(choice)

    def serve(self, choice: Choice) -> bytes | None:
        """The response ``answer`` chose (``chosen``) once more, for the same request bytes
        on this connection: checks that depend on the bytes alone need not run again."""
        route, entry = choice
        if route is None or entry is None or self._generation != self._hot.generation:
            return None
        now = self._now()
        try:
            token = self._current(route.profile, now)
        except KeyError:  # the engine does not know it (yet): the general path says so
            return None
        if token is None:
            return None  # wait for a refresh: the general path does
        if (token is not entry.token or now >= entry.fresh_until) and not self._hot.render(
            entry, route.profile, token, now
        ):
            return None
        counts = self._counts
        counts[route.metric] = counts.get(route.metric, 0) + 1
        return entry.data

    def _open(self) -> bool:
        """Take the routes for this connection; False while the lane must stay shut."""
        conn = self._conn
        if not conn.took_token or conn.debug:
            return False  # the first token is logged; debug logs every one
        self._routes = self._hot.routes(conn)
        self._generation = self._hot.generation
        return True

    def _gate_passes(self, headers: Mapping[bytes, bytes]) -> bool:
        host, key = headers.get(b"host"), headers.get(b"x-colt-broker")
        if host is None or not key:
            return False
        gate = self._hot.gate
        if not (gate.good_hosts.get(host) or gate.host_ok(host)):
            return False
        return self._key is None or hmac.compare_digest(key, self._key)
