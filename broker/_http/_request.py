"""What the protocol hands the application: the request, the connection, the limits."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from broker._http._access import PeerCred, read_peercred
from broker._http._problem import Problem

Reply = bytes | Coroutine[Any, Any, bytes]


@dataclass(frozen=True)
class Limits:
    """What one request may cost. Timeouts are seconds."""

    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 64
    max_body: int = 4096
    header_timeout: float = 10.0  # from a request's first byte (or the connection) to its end
    idle_timeout: float = 60.0  # keep-alive connection with nothing to do
    max_connections: int = 1024


@dataclass(slots=True)
class ConnInfo:
    """Who is on the other end of one connection."""

    transport: str  # "unix" | "tcp"
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
    conn_mode: int  # CONN_DEFAULT | CONN_CLOSE | CONN_KEEP_ALIVE: what the response must say


class Handler(Protocol):
    """The application behind the protocol (``_app.App``)."""

    def connected(self, conn: ConnInfo) -> None:
        """A connection was admitted (peer metrics)."""

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


def conn_info(kind: str, transport: asyncio.Transport) -> ConnInfo:
    """Who connected: SO_PEERCRED on a Unix socket, the address on TCP."""
    if kind == "unix":
        peer = read_peercred(transport)
        return ConnInfo(kind, peer, f"pid {peer.pid}" if peer else "unix")
    address = transport.get_extra_info("peername")
    where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    return ConnInfo(kind, None, where)
