"""Turning answers into bytes, counting them, and logging refusals (rate-limited)."""

from __future__ import annotations

import logging

import structlog

from broker._clock import Clock
from broker._http._access import RateLimitedLog
from broker._http._problem import Problem, clip, internal_error
from broker._http._render import CONN_CLOSE, Renderer
from broker._http._request import ConnInfo, Request
from broker._metrics import NO_PROFILE, Metrics

log = structlog.get_logger("broker.http")

_REFUSALS = frozenset({401, 403})


class Replier:
    """Renders responses for the endpoints and counts every one in the metrics."""

    def __init__(self, renderer: Renderer, metrics: Metrics, clock: Clock) -> None:
        self.renderer = renderer
        self._metrics = metrics
        self._refusal_log = RateLimitedLog(clock)

    def counted(self, conn: ConnInfo, label: str, status: int, data: bytes) -> bytes:
        self._metrics.observe_request(label, conn.transport, status)
        return data

    def json(self, req: Request, conn: ConnInfo, label: str, status: int, obj: object) -> bytes:
        data = self.renderer.json(status, obj, req.conn_mode, head=req.method == b"HEAD")
        return self.counted(conn, label, status, data)

    def body(
        self, req: Request, conn: ConnInfo, label: str, content_type: str, body: bytes
    ) -> bytes:
        head = req.method == b"HEAD"
        data = self.renderer.response(200, content_type, body, req.conn_mode, head=head)
        return self.counted(conn, label, 200, data)

    def problem(self, req: Request | None, conn: ConnInfo, label: str, problem: Problem) -> bytes:
        """A problem response; ``req`` None for a request that could not be parsed."""
        if req is None or problem.status in _REFUSALS:
            self._log_refusal(req, conn, problem)
        head = req is not None and req.method == b"HEAD"
        if req is not None and problem.close:
            req.conn_mode = CONN_CLOSE  # tells the protocol to close after this answer
        mode = CONN_CLOSE if req is None else req.conn_mode
        data = self.renderer.problem(problem, mode, head=head)
        return self.counted(conn, label, problem.status, data)

    def internal_error(self, conn: ConnInfo) -> bytes:
        data = self.renderer.problem(internal_error(), CONN_CLOSE)
        return self.counted(conn, NO_PROFILE, 500, data)

    def _log_refusal(self, req: Request | None, conn: ConnInfo, problem: Problem) -> None:
        if not self._refusal_log.allow():
            return
        fields: dict[str, object] = {
            "status": problem.status,
            "reason": problem.kind or problem.title,
            "transport": conn.transport,
            "peer": conn.address,
        }
        if conn.peer is not None:
            fields["uid"] = conn.peer.uid
        if req is not None:  # the path only: never a header value (the key lives in one)
            fields["path"] = clip(req.path.decode("latin-1"))
        if dropped := self._refusal_log.take_suppressed():
            fields["suppressed"] = dropped
        log.warning("http.refused", **fields)


def debug_enabled() -> bool:
    """Whether per-request debug lines would be written (checked once per connection)."""
    check = getattr(log, "is_enabled_for", None)
    return bool(check(logging.DEBUG)) if check is not None else False
