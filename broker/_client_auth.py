"""``ColtAuth``: the broker's token on every request of an httpx client, renewed after a 401.

The sync and async flows are twins, line for line, that differ only in how they reach the
daemon (directly, or from a worker thread), the way svcs pairs ``get`` and ``aget``: a shared
sans-IO generator would need an effect protocol to share these few lines. The policy: after a
401, report the token (so the next request gets a new one either way), then retry once, and
only when the request's body can be sent again. Neither flow asks httpx to buffer the body
(``requires_request_body``), so a streaming upload is never held in memory nor replayed.
httpx reads the 401's body itself before it sends the retry.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from broker import _client_tokens as _tokens
from broker.client import aget_token, get_token


class ColtAuth(httpx.Auth):
    """Authenticate httpx requests to a Colt API with the broker's token for ``profile``.

    Adds ``Authorization: Bearer <token>`` (a token with at least ``min_valid`` seconds
    left). When the API answers 401, reports that token to the broker
    (``POST /v1/token/{profile}/refresh``) and sends the request once more with the token it
    returns; a second 401 goes back to the caller. A request whose body cannot be replayed
    (a streaming body) is not retried, though its token is still reported. Works with
    ``httpx.Client`` and ``httpx.AsyncClient``; raises ``BrokerUnavailable`` or
    ``TokenUnavailable`` (see ``broker.client``) when no token can be had.
    """

    requires_request_body = False
    requires_response_body = False

    def __init__(self, profile: str = "default", min_valid: float = 60) -> None:
        self.profile = profile
        self.min_valid = min_valid

    def __repr__(self) -> str:
        return f"ColtAuth(profile={self.profile!r}, min_valid={self.min_valid!r})"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        replayable = _body_in_memory(request)  # before sending: a stream is consumed by it
        token = get_token(self.profile, self.min_valid)
        response = yield _bearer(request, token)
        if response.status_code == 401:
            fresh = _tokens.report_rejected(self.profile, token, self.min_valid)
            if replayable and fresh != token:
                yield _bearer(request, fresh)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        replayable = _body_in_memory(request)
        token = await aget_token(self.profile, self.min_valid)
        response = yield _bearer(request, token)
        if response.status_code == 401:
            fresh = await _tokens.in_worker_thread(
                _tokens.report_rejected, self.profile, token, self.min_valid
            )
            if replayable and fresh != token:
                yield _bearer(request, fresh)


def _bearer(request: httpx.Request, token: str) -> httpx.Request:
    request.headers["Authorization"] = f"Bearer {token}"
    return request


def _body_in_memory(request: httpx.Request) -> bool:
    """Whether the request can be sent again: its body is bytes in memory, or it has none."""
    try:
        request.content  # noqa: B018  # raises RequestNotRead for a streaming body
    except httpx.RequestNotRead:
        return False
    return True
