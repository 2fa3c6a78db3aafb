"""A minimal blocking HTTP/1.1 exchange with the local daemon, on the standard library alone.

``colt-broker token`` runs inside ``$(...)`` in shell loops, so it cannot afford the import
time of http.client's email parser or of httpx. The daemon is ours and answers
``Connection: close`` requests with a Content-Length, so a request is one write and the
response one read to EOF; anything else is reported as a protocol error, not guessed at.
"""

from __future__ import annotations

import json
import socket
import struct

MAX_RESPONSE = 1 << 20

TYPE_CHECKING = False  # not typing's: importing typing costs `colt-broker token` start-up
if TYPE_CHECKING:
    from collections.abc import Callable


class WireError(OSError):
    """The daemon could not be reached, or answered something that is not HTTP."""


# Plain classes, not dataclasses: importing dataclasses (and inspect) costs more start-up
# time than the whole exchange.
class Response:
    """Status, lower-cased header names, and the body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> object:
        return json.loads(self.body)


class Endpoint:
    """A Unix socket path, or a loopback (host, port) and the Host header to send."""

    __slots__ = ("host", "port", "unix", "verify")

    def __init__(
        self,
        unix: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8787,
        verify: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.unix = unix
        self.host = host
        self.port = port
        self.verify = verify  # vets a connected Unix socket's server; raises WireError

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """``http://HOST[:PORT]`` (IPv6 in brackets); anything else is refused."""
        rest = url.removeprefix("http://")
        netloc = rest.split("/", 1)[0]
        host, _, port = netloc.rpartition(":") if not netloc.endswith("]") else (netloc, "", "")
        if not host:
            host, port = netloc, ""
        host = host.strip("[]")
        if rest == url or not host or (port and not port.isdigit()):
            raise WireError(f"COLT_BROKER_URL must be http://HOST:PORT, not {url!r}")
        if not _loopback(host):
            # The key travels in clear text: it may only go to this machine.
            raise WireError(f"COLT_BROKER_URL must name a loopback host, not {host!r}")
        return cls(host=host, port=int(port) if port else 80)

    def describe(self) -> str:
        return f"unix socket {self.unix}" if self.unix else f"http://{self._netloc()}"

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def connect(self, timeout: float) -> socket.socket:
        if self.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.unix)
                if self.verify is not None:
                    self.verify(sock)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process that listens on a connected Unix socket (Linux), else None."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, 12))
    return int(uid)


def _loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1, without importing ipaddress (start-up time)."""
    if host in ("localhost", "::1", "0:0:0:0:0:0:0:1"):
        return True
    parts = host.split(".")
    return (
        len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)
    )


def request(
    endpoint: Endpoint,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 30.0,
) -> Response:
    """Send one request and read the whole response. Raises WireError or OSError."""
    head = _head(endpoint, method, target, headers or {}, body)
    with endpoint.connect(timeout) as sock:
        sock.sendall(head + body)
        raw = _read_all(sock)
    return parse_response(raw)


def _head(
    endpoint: Endpoint, method: str, target: str, headers: dict[str, str], body: bytes
) -> bytes:
    host = "localhost" if endpoint.unix else endpoint._netloc()
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise WireError("response larger than 1 MiB")
    return b"".join(chunks)


def parse_response(raw: bytes) -> Response:
    """Split a complete ``Connection: close`` response into status, headers and body."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if not sep or len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
        raise WireError("the daemon's answer is not an HTTP response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        body = body[: int(length)]
    return Response(int(status_line[1]), headers, body)
