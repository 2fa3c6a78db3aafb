"""A Colt-compatible OAuth2 token endpoint on loopback, for tests and ``serve --demo``.

It speaks real HTTP/1.1 (keep-alive included) and follows
``reference/colt-auth-api.md``: Basic client authentication, a form body with
``grant_type=client_credentials``, a tracking header, Colt's error table, a per-client quota
answered with 429, and HS256 JWTs it can verify and revoke. A small resource API
(``/numberManagement/...``) accepts only its own live tokens.

A token request is handled in this order:

1. it is recorded in :attr:`Emulator.requests` (Authorization left out);
2. the next fault is taken: the injected queue first, then the rule (see :class:`Fault`);
   a fault's ``delay`` is waited out; ``reset``/``close`` end the connection at once;
   a fault with a ``status`` or ``body`` answers with it, skipping everything below;
3. a method other than POST gets 405;
4. validation; the first failing check answers, in this order (each check is spelled out
   in :mod:`broker._emulator_colt`): 400-001 no Authorization, 400-003 no Content-Type,
   415-001 not a form, 400-002 no grant_type, 400-004 no tracking header, 400-005 extra
   input, 400-006 other grant, 401-002 not Basic, 401-001 bad Basic, 401-002 wrong client;
5. the quota: per client id, at most ``quota`` requests admitted per sliding
   ``quota_window``; beyond it 429 "Too many requests"/"quota exceeded", with
   ``Retry-After: ceil(retry_after)`` unless ``retry_after`` is None. Refused requests, and
   those a fault answered in step 2, do not use up the quota;
6. success: ``{"access_token", "token_type", "expires_in"}``, shaped by the fault's
   ``token`` if it has one; a fault's ``headers`` are added to whatever is answered and its
   ``reset_mid_body`` action cuts the answer in half.

Example::

    emulator = Emulator({"id": "secret"}, token_lifetime=2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.run)
        emulator.inject(Fault(status=503), Fault(action="reset"))
        ...  # point the broker at emulator.token_url
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import jwt
from anyio.abc import TaskStatus

from broker._clock import SYSTEM_CLOCK, Clock
from broker._emulator_colt import (
    Rejection,
    SlidingQuota,
    TokenPolicy,
    authenticate,
    basic_client_id,
    error_body,
    parse_form,
    tracking_id,
)
from broker._emulator_http import Action, HttpRequest, Reply, bind, serve
from broker._emulator_tokens import LIFETIME, MISSING, TokenMint, TokenRevoked, TokenShape
from broker._loop import backend_options

__all__ = [
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "LIFETIME",
    "MISSING",
    "RESOURCE_PREFIX",
    "TOKEN_PATH",
    "Emulator",
    "Fault",
    "RecordedRequest",
    "TokenRevoked",
    "TokenShape",
]

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret-not-for-production"  # noqa: S105  # made up, for --demo
TOKEN_PATH = "/authentication/v1/oauth/token"  # noqa: S105  # a URL path, not a secret
RESOURCE_PREFIX = "/numberManagement/"

_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
_SAMPLE_NUMBERS = [
    {"number": "+442071234567", "country": "GB", "status": "active"},
    {"number": "+4930123456789", "country": "DE", "status": "reserved"},
]
_ACTIONS = ("respond", "reset", "reset_mid_body", "close")


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour for the next token request(s).

    ``status``/``body``: answer with them instead of a token (``body`` alone: status 200; a
    status alone: Colt's error body for it, ``code`` choosing the row, e.g. 500 + "002";
    status 200 alone: a token, even for an invalid request). ``headers`` are added to the
    answer, e.g. ``{"Retry-After": "7"}``. ``delay`` is waited before answering.
    ``action``: ``reset`` aborts the connection (RST) before any byte; ``reset_mid_body``
    sends the status line, headers with Content-Length and half the body, then RST;
    ``close`` closes the connection (FIN) without an answer. ``token`` shapes a 200.
    ``times``: how many consecutive token requests it applies to. A raw ``body`` goes out as
    ``application/json`` unless ``headers`` give another Content-Type.
    """

    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    action: Action = "respond"
    token: TokenShape | None = None
    times: int = 1
    code: str | None = None

    def __post_init__(self) -> None:
        if self.times < 1 or self.delay < 0 or self.action not in _ACTIONS:
            raise ValueError(f"invalid fault: {self!r}")
        if self.status is not None and not 200 <= self.status <= 599:
            raise ValueError(f"fault status must be 200..599, not {self.status}")

    @property
    def overrides(self) -> bool:
        """Whether this fault answers by itself, skipping validation and the quota."""
        return self.status is not None or self.body is not None


@dataclass
class RecordedRequest:
    """One token request as the emulator saw it. Never holds the Authorization header or a
    body value (the body may carry a secret): ``params`` are the body's parameter names.
    """

    time: float  # the clock's monotonic time on arrival
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    params: tuple[str, ...]
    client_id: str | None  # as claimed by a Basic Authorization header, valid or not
    tracking_id: str | None
    fault: Fault | None = None
    status: int | None = None  # the status answered; None if reset or closed before it


class Emulator:
    """A Colt token endpoint (and a tiny resource API) on loopback. See the module docstring."""

    def __init__(
        self,
        clients: Mapping[str, str],
        *,
        token_lifetime: float = 1800,
        quota: int | None = None,
        quota_window: float = 60.0,
        retry_after: float | None = 30.0,
        tracking_headers: Sequence[str] = ("APIGWTrackingId",),
        clock: Clock = SYSTEM_CLOCK,
        signing_key: bytes | None = None,
        accepted_params: Sequence[str] = (),
    ) -> None:
        # client id -> secret; public and live, so a test can rotate or withdraw a secret.
        self.clients: dict[str, str] = dict(clients)
        self._policy = TokenPolicy(self.clients, tuple(tracking_headers), tuple(accepted_params))
        self._mint = TokenMint(lifetime=token_lifetime, clock=clock, key=signing_key)
        self._quota = SlidingQuota(quota, quota_window)
        self._retry_after = retry_after
        self._clock = clock
        self._queue: deque[Fault] = deque()
        self._rule: Callable[[RecordedRequest], Fault | None] | None = None
        self._base_url: str | None = None
        self.requests: list[RecordedRequest] = []
        self.resource_requests = 0
        self.connections = 0

    @classmethod
    def demo(cls, **kwargs: Any) -> Emulator:
        """An emulator that knows the made-up demo client (``DEMO_CLIENT_ID``)."""
        return cls({DEMO_CLIENT_ID: DEMO_CLIENT_SECRET}, **kwargs)

    @property
    def base_url(self) -> str:
        """``http://host:port`` once :meth:`run` is listening."""
        if self._base_url is None:
            raise RuntimeError("the emulator is not running yet: await tg.start(emulator.run)")
        return self._base_url

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def faults_pending(self) -> int:
        """Token requests the injected queue will still answer with a fault."""
        return len(self._queue)

    async def run(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host``:``port`` (0: any free port), report ``base_url`` through
        ``task_status``, then serve until cancelled.
        """
        with bind(host, port) as listener:
            bound_port = listener.getsockname()[1]
            self._base_url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
            task_status.started(self._base_url)
            await serve(listener, self._handle, on_accept=self._on_accept)

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each applies to the next ``times`` token requests, in order."""
        for fault in faults:
            self._queue.extend([fault] * fault.times)

    def set_rule(self, rule: Callable[[RecordedRequest], Fault | None] | None) -> None:
        """Decide a fault per token request (when the queue is empty); None removes it."""
        self._rule = rule

    def count(self, *, client_id: str | None = None, status: int | None = None) -> int:
        """How many token requests were recorded, optionally by client id and status."""
        return sum(
            1
            for r in self.requests
            if (client_id is None or r.client_id == client_id)
            and (status is None or r.status == status)
        )

    def issue(self, client_id: str = DEMO_CLIENT_ID, shape: TokenShape | None = None) -> str:
        """A token as the endpoint would issue it to ``client_id``, without a request."""
        return self._mint.mint(client_id, shape or TokenShape())

    def revoke(self, access_token: str) -> None:
        """The resource API will answer 401 to ``access_token`` although it has not expired."""
        self._mint.revoke(access_token)

    def verify(self, access_token: str) -> dict[str, Any]:
        """The claims of a token this emulator issued; raises ``jwt.InvalidTokenError``
        (``jwt.ExpiredSignatureError``, :class:`TokenRevoked`) when it is not valid now.
        """
        return self._mint.verify(access_token)

    def _on_accept(self) -> None:
        self.connections += 1

    async def _handle(self, request: HttpRequest) -> Reply:
        if request.path == TOKEN_PATH:
            return await self._token_request(request)
        if request.path.startswith(RESOURCE_PREFIX):
            return self._resource_request(request)
        return Reply.json(404, error_body(404) | {"message": "No resource at this path."})

    async def _token_request(self, request: HttpRequest) -> Reply:
        record = self._record(request)
        fault = record.fault = self._next_fault(record)
        reply = await self._answer(request, record, fault)
        if reply.action in ("respond", "reset_mid_body"):
            record.status = reply.status
        return reply

    def _record(self, request: HttpRequest) -> RecordedRequest:
        headers: dict[str, str] = {}
        for name, value in request.headers:
            if name != "authorization":
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        record = RecordedRequest(
            time=self._clock.monotonic(),
            method=request.method,
            path=request.path,
            headers=headers,
            params=tuple(name for name, _ in parse_form(request.body)),
            client_id=basic_client_id(request),
            tracking_id=tracking_id(request, self._policy.tracking_headers),
        )
        self.requests.append(record)
        return record

    def _next_fault(self, record: RecordedRequest) -> Fault | None:
        if self._queue:
            return self._queue.popleft()
        return self._rule(record) if self._rule is not None else None

    async def _answer(
        self, request: HttpRequest, record: RecordedRequest, fault: Fault | None
    ) -> Reply:
        if fault is None:
            return self._validated(request)
        if fault.delay:
            await anyio.sleep(fault.delay)
        if fault.action in ("reset", "close"):
            return Reply(action=fault.action)
        if fault.overrides:
            reply = self._fault_reply(fault, record.client_id)
        else:
            reply = self._validated(request, fault.token)
        reply.action = fault.action
        return reply.with_headers(dict(fault.headers))

    def _fault_reply(self, fault: Fault, client_id: str | None) -> Reply:
        status = fault.status or 200
        if fault.body is not None:
            return Reply(status, fault.body, {"content-type": "application/json"})
        if status == 200:
            shape = fault.token or TokenShape()
            return Reply.json(200, self._mint.success_body(client_id or "anonymous", shape))
        return Reply.json(status, error_body(status, fault.code))

    def _validated(self, request: HttpRequest, shape: TokenShape | None = None) -> Reply:
        if request.method != "POST":
            return Reply.json(405, error_body(405), {"allow": "POST"})
        try:
            client_id = authenticate(request, self._policy)
        except Rejection as rejection:
            return Reply.json(rejection.row.status, rejection.row.body())
        if not self._quota.admit(client_id, self._clock.monotonic()):
            return self._throttled()
        body = self._mint.success_body(client_id, shape or TokenShape())
        return Reply.json(200, body, _NO_STORE)

    def _throttled(self) -> Reply:
        headers = {}
        if self._retry_after is not None:
            headers["retry-after"] = str(math.ceil(self._retry_after))
        return Reply.json(429, error_body(429), headers)

    def _resource_request(self, request: HttpRequest) -> Reply:
        self.resource_requests += 1
        scheme, _, token = (request.header("authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _unauthorized("401-001", "No bearer access token in the request.")
        try:
            self._mint.verify(token.strip())
        except jwt.ExpiredSignatureError:
            return _unauthorized("401-002", "The access token has expired.")
        except TokenRevoked:
            return _unauthorized("401-002", "The access token has been revoked.")
        except jwt.InvalidTokenError:
            return _unauthorized("401-002", "The access token is not valid.")
        return Reply.json(200, {"numbers": _SAMPLE_NUMBERS})


def _unauthorized(key: str, details: str) -> Reply:
    body = Rejection(key, details=details).row.body()
    return Reply.json(401, body, {"www-authenticate": 'Bearer error="invalid_token"'})


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker.emulator",
        description="A Colt-compatible token endpoint on loopback; prints its token URL.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=1800.0, help="token lifetime, seconds")
    parser.add_argument("--quota", type=int, default=None, help="token requests per window")
    parser.add_argument("--quota-window", type=float, default=60.0)
    parser.add_argument("--retry-after", type=float, default=30.0)
    parser.add_argument("--client-id", default=DEMO_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEMO_CLIENT_SECRET)
    return parser.parse_args(argv)


async def _serve_until_cancelled(emulator: Emulator, host: str, port: int) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(emulator.run, host=host, port=port))
        print(emulator.token_url, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the emulator in the foreground until interrupted."""
    args = _parse_args(argv)
    emulator = Emulator(
        {args.client_id: args.client_secret},
        token_lifetime=args.lifetime,
        quota=args.quota,
        quota_window=args.quota_window,
        retry_after=args.retry_after,
    )
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(
            _serve_until_cancelled,
            emulator,
            args.host,
            args.port,
            backend_options=backend_options(),
        )


if __name__ == "__main__":
    main()
