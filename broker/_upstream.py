"""The Colt upstream client: ask the token endpoint for one token.

As in httpx's ``Auth.auth_flow``, the protocol lives in pure functions: :func:`build_token_request`
makes the request and :func:`classify_response` (``_upstream_parse``) judges the answer, with
every clock reading passed in. :func:`fetch_token` is the one thin async function that does
I/O, through an injected ``httpx.AsyncClient``, and turns transport failures into
:class:`~broker.exceptions.UpstreamUnavailable`.

Client authentication is HTTP Basic over the raw ``client_id:secret`` (RFC 7617, what
``curl -u`` sends). RFC 6749 §2.3.1 asks to form-urlencode both first, but Colt documents plain
Basic, many servers never decode (authlib reverted the encoding for that reason), and for ids
and secrets made of letters, digits and ``-._~`` the two agree anyway.
"""

from __future__ import annotations

import base64
import errno
import socket
import ssl
import types
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import anyio
import httpx

from broker import __version__
from broker._clock import SYSTEM_CLOCK, Clock
from broker._profile import ProfileConfig
from broker._upstream_parse import FetchResult, classify_response, parse_retry_after
from broker._upstream_redact import sanitise
from broker.exceptions import RequestRejected, UpstreamDetail, UpstreamUnavailable

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
USER_AGENT = f"colt-broker/{__version__}"
MAX_BODY_BYTES = 64 * 1024  # a token response is well under 4 KiB; a gateway page is cut here


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    received_mono: float
    received_wall: float


def new_tracking_id() -> str:
    """A fresh tracking id (a UUID4), sent in the tracking header and logged with the outcome."""
    return str(uuid.uuid4())


def basic_authorization(client_id: str, secret: str) -> str:
    """The ``Authorization`` value for HTTP Basic client authentication (see module docstring)."""
    credentials = base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")
    return f"Basic {credentials}"


def build_token_request(profile: ProfileConfig, tracking_id: str) -> httpx.Request:
    """The client-credentials token request for ``profile``: credentials only in the header."""
    form = {"grant_type": "client_credentials"}
    if profile.scope:  # Colt refuses unknown parameters (400-005): no empty scope either
        form["scope"] = profile.scope
    headers = {
        "Authorization": basic_authorization(profile.client_id, profile.secret.reveal()),
        "Content-Type": FORM_CONTENT_TYPE,
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if profile.tracking_header:  # "" turns Colt's tracking header off for other endpoints
        headers[profile.tracking_header] = tracking_id
    return httpx.Request(
        "POST",
        profile.token_url,
        headers=headers,
        content=urlencode(form).encode("ascii"),
        extensions={"timeout": httpx.Timeout(profile.upstream_timeout).as_dict()},
    )


async def fetch_token(
    client: httpx.AsyncClient,
    profile: ProfileConfig,
    *,
    clock: Clock = SYSTEM_CLOCK,
    tracking_id: str | None = None,
) -> FetchResult:
    """Ask the token endpoint for a token, within ``profile.upstream_timeout`` seconds in all.

    Returns the token on success; raises an UpstreamError subclass otherwise. Cancellation
    from outside propagates untouched.
    """
    tracking_id = tracking_id or new_tracking_id()
    try:
        request = build_token_request(profile, tracking_id)
    except httpx.InvalidURL as exc:  # config validates token_url; this keeps the contract
        summary = f"token_url is not a usable URL: {sanitise(str(exc), limit=120)}"
        raise RequestRejected(summary, UpstreamDetail(tracking_id=tracking_id)) from exc
    secret = profile.secret.reveal()
    started = clock.monotonic()
    try:
        with anyio.fail_after(profile.upstream_timeout):
            reply = await _exchange(client, request, clock)
    except TimeoutError:  # before OSError: TimeoutError is one
        summary = f"timed out after {profile.upstream_timeout:g}s"
        raise UpstreamUnavailable(summary, UpstreamDetail(tracking_id=tracking_id)) from None
    except (httpx.RequestError, OSError) as exc:
        summary = describe_transport_error(exc, request.url, secret)
        raise UpstreamUnavailable(summary, UpstreamDetail(tracking_id=tracking_id)) from exc
    return classify_response(
        reply.status,
        reply.headers,
        reply.body,
        tracking_id=tracking_id,
        received_mono=reply.received_mono,
        received_wall=reply.received_wall,
        secret=secret,
        duration=clock.monotonic() - started,
        tracking_header=profile.tracking_header or None,
    )


async def _exchange(client: httpx.AsyncClient, request: httpx.Request, clock: Clock) -> _Reply:
    # auth=None: a client-level auth must not replace our Basic header. No redirects: a 307
    # would re-post the credentials to wherever the Location points.
    response = await client.send(request, stream=True, auth=None, follow_redirects=False)
    received_mono, received_wall = clock.monotonic(), clock.wall()
    try:
        body = await _read_bounded(response)
    finally:
        await response.aclose()
    return _Reply(response.status_code, response.headers, body, received_mono, received_wall)


async def _read_bounded(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # cut, not refused: an error page still has a status
            break
    return b"".join(chunks)[:MAX_BODY_BYTES]


def describe_transport_error(exc: BaseException, url: httpx.URL, secret: str | None) -> str:
    """One line saying what went wrong on the wire, naming the endpoint, secret-free."""
    where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"
    causes = list(_causes(exc))
    tls = next((e for e in causes if isinstance(e, ssl.SSLError)), None)
    if tls is not None:
        return f"TLS error with {where}: {sanitise(str(tls), [secret], limit=160)}"
    for matches, template in _BY_CAUSE:
        if any(matches(e) for e in causes):
            return template.format(where=where)
    message = sanitise(str(exc) or type(exc).__name__, [secret], limit=160)
    for kinds, template in _BY_TYPE:
        if isinstance(exc, kinds):
            return template.format(where=where, message=message, kind=type(exc).__name__)
    return f"transport error with {where}: {type(exc).__name__}: {message}"


def _is_refused(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionRefusedError):
        return True
    if getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return True
    return "connection refused" in str(exc).lower()  # httpx often keeps only the text


# The socket's own error, wherever httpx and anyio have wrapped it, says the most.
_BY_CAUSE: tuple[tuple[Callable[[BaseException], bool], str], ...] = (
    (_is_refused, "connection refused by {where}"),
    (lambda e: isinstance(e, socket.gaierror), "cannot resolve the host of {where}"),
    (
        lambda e: isinstance(e, ConnectionResetError | BrokenPipeError),
        "connection reset by {where}",
    ),
)
# Otherwise httpx's exception type; the first match wins.
_BY_TYPE: tuple[tuple[type[BaseException] | types.UnionType, str], ...] = (
    (httpx.ConnectTimeout, "connecting to {where} timed out"),
    (httpx.TimeoutException, "{where} timed out ({kind})"),
    (httpx.ReadError | httpx.WriteError, "connection reset or lost with {where}: {message}"),
    (httpx.RemoteProtocolError, "{where} broke off the HTTP exchange: {message}"),
    (httpx.ConnectError, "cannot connect to {where}: {message}"),
)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: httpx and anyio chain and group the socket's own error."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)


__all__ = [
    "FetchResult",
    "build_token_request",
    "classify_response",
    "fetch_token",
    "new_tracking_id",
    "parse_retry_after",
]
