"""The emulator's HTTP/1.1 server: h11 over raw non-blocking sockets, one task per connection.

Why raw sockets rather than anyio streams: a fault must be able to *reset* a connection (an
RST with no FIN before it), and anyio's ``aclose()`` half-closes (FIN) first. Owning the socket
lets an abortive close be ``SO_LINGER`` 0 then ``close()``.

A connection task reads one whole request (h11), asks the handler for a :class:`Reply`, delivers
it the way the reply says (answer, reset, half the body then reset, or close), and repeats while
the client keeps the connection alive. Whatever a client sends, only its own connection ends.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Literal

import anyio
import h11
import structlog

log = structlog.get_logger()

Action = Literal["respond", "reset", "reset_mid_body", "close"]

MAX_BODY = 64 * 1024
"""Largest request body accepted; a token request is a few dozen bytes."""

_RECV_SIZE = 65536
_SIOCOUTQNSD = 0x894B  # Linux ioctl: bytes queued but not yet sent


@dataclass(frozen=True)
class HttpRequest:
    """One complete request. Header names are lower-case; values are decoded as Latin-1."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        values = self.header_values(name)
        return values[0] if values else None


@dataclass
class Reply:
    """What to do with a request: answer it, or misbehave as ``action`` says.

    Header names are lower-case; Content-Length is always the true length of ``body``.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    action: Action = "respond"

    @classmethod
    def json(cls, status: int, payload: object, headers: dict[str, str] | None = None) -> Reply:
        """A JSON answer."""
        merged = {"content-type": "application/json"} | {
            k.lower(): v for k, v in (headers or {}).items()
        }
        return cls(status, json.dumps(payload).encode(), merged)

    def with_headers(self, headers: dict[str, str]) -> Reply:
        """This reply with ``headers`` added or replaced (names compared without case)."""
        self.headers.update({k.lower(): v for k, v in headers.items()})
        return self


Handler = Callable[[HttpRequest], Awaitable[Reply]]


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host``:``port`` (0: any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    listener: socket.socket, handler: Handler, on_accept: Callable[[], None] | None = None
) -> None:
    """Accept connections on ``listener`` and serve each in its own task, until cancelled."""
    async with anyio.create_task_group() as tg:
        while True:
            conn = await _accept(listener)
            if on_accept is not None:
                on_accept()
            tg.start_soon(serve_connection, conn, handler)


async def _accept(listener: socket.socket) -> socket.socket:
    while True:
        await anyio.wait_readable(listener)
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        except OSError as exc:  # EMFILE and friends: back off rather than spin
            log.warning("emulator.accept_failed", errno=exc.errno)
            await anyio.sleep(0.05)
            continue
        return conn


class _Socket:
    """Non-blocking socket I/O through anyio's readiness waits. Closing is idempotent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def recv(self) -> bytes:
        """The next bytes from the peer; b"" at end of stream."""
        while True:
            await anyio.wait_readable(self._sock)
            try:
                return self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                continue

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await anyio.wait_writable(self._sock)
            try:
                sent = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            view = view[sent:]

    async def reset(self) -> None:
        """Abort the connection: RST, no FIN. Bytes already sent reach the peer first."""
        if self._sock.fileno() < 0:
            return
        await self._wait_flushed()
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()

    def close(self) -> None:
        """Close gracefully: FIN after whatever was sent."""
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._sock.close()

    async def _wait_flushed(self) -> None:
        # An abortive close drops bytes the kernel has not transmitted yet; wait (briefly,
        # bounded) until none are left, so "half the body, then RST" really sends half.
        import fcntl  # Unix only, and only needed here

        for _ in range(100):
            try:
                unsent = struct.unpack("i", fcntl.ioctl(self._sock, _SIOCOUTQNSD, b"\0" * 4))[0]
            except OSError:
                return  # not Linux: the best we can do is close now
            if unsent == 0:
                return
            await anyio.sleep(0.001)


async def serve_connection(sock: socket.socket, handler: Handler) -> None:
    """Serve requests on one accepted connection until either side ends it."""
    io = _Socket(sock)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        await _request_loop(io, conn, handler)
    except h11.RemoteProtocolError as exc:
        await _answer_bad_request(io, conn, exc.error_status_hint)
    except OSError as exc:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF):
            log.warning("emulator.connection_error", errno=exc.errno)
    except Exception:  # a bug in the emulator must not take the server down with it
        log.exception("emulator.connection_failed")
    finally:
        io.close()


async def _request_loop(io: _Socket, conn: h11.Connection, handler: Handler) -> None:
    while True:
        request = await _read_request(io, conn)
        if request is None:
            return
        reply = await _safe_handle(handler, request)
        if not await _deliver(io, conn, reply, head_only=request.method == "HEAD"):
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # Connection: close, or HTTP/1.0 without keep-alive
        conn.start_next_cycle()


async def _read_request(io: _Socket, conn: h11.Connection) -> HttpRequest | None:
    """The next whole request, or None when the client closed the connection between requests."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await io.recv())
        elif isinstance(event, h11.Request):
            head = event
            await _continue_if_expected(io, conn)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return _to_request(head, bytes(body))
        else:  # ConnectionClosed (or PAUSED, which a fresh cycle never yields)
            return None


async def _continue_if_expected(io: _Socket, conn: h11.Connection) -> None:
    if conn.they_are_waiting_for_100_continue:
        interim = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        await io.send_all(conn.send(interim) or b"")


def _to_request(head: h11.Request, body: bytes) -> HttpRequest:
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
    return HttpRequest(head.method.decode("ascii"), head.target.decode("latin-1"), headers, body)


async def _safe_handle(handler: Handler, request: HttpRequest) -> Reply:
    try:
        return await handler(request)
    except Exception:  # e.g. a test's fault rule raised: answer 500, keep serving
        log.exception("emulator.handler_failed", path=request.path)
        return Reply.json(500, _problem(500, "The emulator failed to handle the request."))


async def _deliver(io: _Socket, conn: h11.Connection, reply: Reply, *, head_only: bool) -> bool:
    """Send ``reply`` as its action says; False when the connection is gone afterwards."""
    if reply.action == "reset":
        await io.reset()
        return False
    if reply.action == "close":
        io.close()
        return False
    body = b"" if head_only else reply.body
    head = conn.send(_response(reply)) or b""
    if reply.action == "reset_mid_body":
        await io.send_all(head + body[: len(body) // 2])
        await io.reset()
        return False
    tail = (conn.send(h11.Data(data=body)) or b"") if body else b""
    await io.send_all(head + tail + (conn.send(h11.EndOfMessage()) or b""))
    return True


def _response(reply: Reply) -> h11.Response:
    headers = {
        "server": "colt-emulator",
        "date": email.utils.formatdate(usegmt=True),
    } | {k: v for k, v in reply.headers.items() if k not in ("content-length", "transfer-encoding")}
    headers["content-length"] = str(len(reply.body))
    return h11.Response(
        status_code=reply.status, headers=list(headers.items()), reason=_phrase(reply.status)
    )


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _problem(status: int, message: str) -> dict[str, object]:
    return {"status": status, "reason": _phrase(status).decode(), "message": message}


async def _answer_bad_request(io: _Socket, conn: h11.Connection, status: int) -> None:
    """Tell a client that sent something that is not HTTP/1.1 so, then close."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    reply = Reply.json(status, _problem(status, "The request is not valid HTTP/1.1."))
    reply.headers["connection"] = "close"
    with contextlib.suppress(OSError, h11.LocalProtocolError):
        await _deliver(io, conn, reply, head_only=False)
