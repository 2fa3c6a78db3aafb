"""Routing: the TCP gate, then the token endpoints or the small status endpoints."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from broker._clock import Clock
from broker._http import _problem
from broker._http._access import TcpGate
from broker._http._hot import HotTokens, Lane
from broker._http._problem import Problem
from broker._http._render import Renderer, TokenResponses
from broker._http._reply import Replier
from broker._http._request import GET_HEAD, ConnInfo, Reply, Request
from broker._http._tokens import TokenEndpoints
from broker._metrics import CONTENT_TYPE, NO_PROFILE, Metrics
from broker._profile import ProfileConfig
from broker._status import TokenSource

log = structlog.get_logger("broker.http")

_TOKEN_PREFIX = b"/v1/token"

Endpoint = Callable[[Request, ConnInfo], bytes]


class App:
    """Everything the HTTP API answers, behind ``HttpProtocol``.

    An exception out of a handler is a bug: the protocol answers it with ``crashed``.
    """

    def __init__(
        self,
        source: TokenSource,
        *,
        gate: TcpGate,
        metrics: Metrics,
        clock: Clock,
        wait_timeout: float,
    ) -> None:
        self._source = source
        self._gate = gate
        self._metrics = metrics
        self._reply = Replier(Renderer(clock), metrics, clock)
        self._tokens = TokenEndpoints(source, self._reply, clock=clock, wait_timeout=wait_timeout)
        self._hot = HotTokens(source, TokenResponses(self._reply.renderer), gate, metrics, clock)
        self._endpoints: dict[bytes, Endpoint] = {
            b"/v1/status": self._status,
            b"/healthz": self._healthz,
            b"/readyz": self._readyz,
            b"/metrics": self._metrics_page,
        }

    def update(self, profiles: Mapping[str, ProfileConfig], default_profile: str | None) -> None:
        self._tokens.update(profiles, default_profile)
        self._hot.update(profiles, default_profile)

    def locate(self, socket_path: Path) -> None:
        """Where the Unix socket and key files are, for refusal messages that say what to do."""
        self._gate.key_dir = str(socket_path.parent)
        self._tokens.socket_hint = str(socket_path)

    # --- Handler (for HttpProtocol) ----------------------------------------------------------

    def connected(self, conn: ConnInfo) -> None:
        if conn.peer is not None:
            self._metrics.observe_peer(conn.peer.uid, conn.peer.gid)

    def lane(self, conn: ConnInfo) -> Lane:
        return self._hot.lane(conn)

    def handle(self, request: Request, conn: ConnInfo) -> Reply:
        return self._route(request, conn)

    def refuse(self, problem: Problem, conn: ConnInfo) -> bytes:
        return self._reply.problem(None, conn, NO_PROFILE, problem)

    def crashed(self, exc: BaseException, conn: ConnInfo) -> bytes:
        """A 500 for a bug; the protocol closes this connection after it."""
        log.error("http.handler_failed", transport=conn.transport, peer=conn.address, exc_info=exc)
        return self._reply.internal_error(conn)

    # --- routing -----------------------------------------------------------------------------

    def _route(self, req: Request, conn: ConnInfo) -> Reply:
        if conn.transport == "tcp":
            headers = req.headers
            refusal = self._gate.check(headers.get(b"host"), headers.get(b"x-colt-broker"))
            if refusal is not None:
                return self._reply.problem(req, conn, NO_PROFILE, refusal)
        path = req.path
        if path.startswith(_TOKEN_PREFIX):
            return self._tokens.route(req, conn, path[len(_TOKEN_PREFIX) :])
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            problem = _problem.not_found(path.decode("latin-1"))
            return self._reply.problem(req, conn, NO_PROFILE, problem)
        if req.method not in GET_HEAD:
            problem = _problem.method_not_allowed(req.method.decode("latin-1"), "GET, HEAD")
            return self._reply.problem(req, conn, NO_PROFILE, problem)
        return endpoint(req, conn)

    # --- the small endpoints -----------------------------------------------------------------

    def _status(self, req: Request, conn: ConnInfo) -> bytes:
        profiles = [status.as_dict() for status in self._source.status()]
        return self._reply.json(req, conn, NO_PROFILE, 200, {"profiles": profiles})

    def _healthz(self, req: Request, conn: ConnInfo) -> bytes:
        return self._reply.json(req, conn, NO_PROFILE, 200, {"status": "ok"})

    def _readyz(self, req: Request, conn: ConnInfo) -> bytes:
        statuses = self._source.status()
        ready = all(s.valid for s in statuses)
        body = {
            "status": "ready" if ready else "not ready",
            "profiles": {
                s.profile: {"valid": s.valid, "state": s.state, "expires_in": s.expires_in}
                for s in statuses
            },
        }
        return self._reply.json(req, conn, NO_PROFILE, 200 if ready else 503, body)

    def _metrics_page(self, req: Request, conn: ConnInfo) -> bytes:
        return self._reply.body(req, conn, NO_PROFILE, CONTENT_TYPE, self._metrics.render())
