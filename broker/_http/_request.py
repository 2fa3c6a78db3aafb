"""What the protocol hands the application: the request, the connection, the limits."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from broker._http._access import PeerCred, read_peercred
from broker._http._listeners import BACKLOG
from broker._http._problem import Problem

if TYPE_CHECKING:
    from broker._http._hot import Lane

Reply = bytes | Coroutine[Any, Any, bytes]
Transport = Literal["unix", "tcp"]
GET_HEAD = (b"GET", b"HEAD")  # the methods of every read-only endpoint


# Descriptors the process needs besides its connections: listeners, the event loop, outbound
# token requests, state and log files, systemd's notify socket.
RESERVED_FDS = 64
MAX_CONNECTIONS = 8192  # far beyond any honest local use; bounds memory (a few KB each)
MAX_BACKLOG = BACKLOG  # the listen() queue the listeners are opened with


@dataclass(frozen=True)
class Limits:
    """What one request may cost, and how many connections may be open. Timeouts are seconds.

    TCP connections may take at most ``tcp_connections`` (3/4) of ``max_connections``: the
    rest is kept for the Unix socket, whose file mode already decides who connects, so a
    flood over loopback TCP (open to every local user) cannot lock out socket users.
    """

    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 64
    max_body: int = 4096
    header_timeout: float = 10.0  # from a request's first byte (or the connection) to its end
    idle_timeout: float = 60.0  # keep-alive connection with nothing to do
    max_connections: int = 1024
    backlog: int = MAX_BACKLOG  # also how many connections one accept burst may open

    @property
    def tcp_connections(self) -> int:
        """The most connections TCP may hold at once."""
        return max(1, self.max_connections * 3 // 4)

    @classmethod
    def for_nofile(cls, nofile: int) -> Limits:
        """Limits that keep a process allowed ``nofile`` descriptors from running out.

        Beyond the open connections, an accept burst may open ``backlog`` more before they
        are refused (twice, if a second burst comes before the first is closed), and the
        broker keeps RESERVED_FDS for its own files and its requests to the token endpoint.
        """
        backlog = min(MAX_BACKLOG, max(16, nofile // 8))
        spare = nofile - RESERVED_FDS - 2 * backlog
        return cls(max_connections=min(MAX_CONNECTIONS, max(4, spare)), backlog=backlog)


@dataclass(slots=True)
class ConnInfo:
    """Who is on the other end of one connection."""

    transport: Transport
    peer: PeerCred | None  # Unix sockets only
    address: str  # for logs
    took_token: bool = False  # "peer.first_token" is logged once per connection
    debug: bool = False  # per-request debug lines: decided once, at the first token


@dataclass(slots=True)
class Request:
    """One parsed request; header names are lower case, only those the broker reads."""

    method: bytes
    path: bytes
    query: bytes
    headers: dict[bytes, bytes]
    body: bytes
    # CONN_DEFAULT | CONN_CLOSE | CONN_KEEP_ALIVE: what the response must say. A handler sets
    # CONN_CLOSE to have the connection closed after its answer (``Problem.close``).
    conn_mode: int


class Handler(Protocol):
    """The application behind the protocol (``_app.App``)."""

    def connected(self, conn: ConnInfo) -> None:
        """A connection was admitted (peer metrics)."""

    def lane(self, conn: ConnInfo) -> Lane:
        """The connection's hot lane (``_hot.Lane``): prepared answers to token GETs."""

    def handle(self, request: Request, conn: ConnInfo) -> Reply:
        """The response, or a coroutine making it; an exception is a bug, see ``crashed``."""

    def refuse(self, problem: Problem, conn: ConnInfo) -> bytes:
        """A protocol-level refusal (malformed, too large, too slow, too many)."""

    def crashed(self, exc: BaseException, conn: ConnInfo) -> bytes:
        """A 500 for a bug, logged."""


def split_target(url: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request target, origin-form or absolute-form."""
    if not url.startswith(b"/"):
        scheme_end = url.find(b"://")
        slash = url.find(b"/", scheme_end + 3) if scheme_end > 0 else -1
        url = url[slash:] if slash > 0 else b"/"
    path, _, query = url.partition(b"?")
    return path, query


def conn_info(kind: Transport, transport: asyncio.Transport) -> ConnInfo:
    """Who connected: SO_PEERCRED on a Unix socket, the address on TCP."""
    if kind == "unix":
        peer = read_peercred(transport)
        return ConnInfo(kind, peer, f"pid {peer.pid}" if peer else "unix")
    address = transport.get_extra_info("peername")
    where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    return ConnInfo(kind, None, where)
