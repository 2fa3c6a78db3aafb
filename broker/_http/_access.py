"""Who may ask: loopback Host names, the ``X-Colt-Broker`` key, Unix peer credentials.

TCP: any local user can reach loopback, and a web page can make a browser send requests to
it. The Host check defeats DNS rebinding (the page's own name arrives as Host); the required
``X-Colt-Broker`` header defeats plain cross-site and server-side-forgery requests, which
cannot add custom headers; with ``http_auth = "key"`` its value must also be the key that only
the socket's group can read. Every path needs both, ``/healthz`` included (product.md: "every
TCP request"); a probe without the key can use the Unix socket. A refusal closes the
connection, so a client without the key cannot hold one open for long.

Unix socket: the file mode decides who connects; SO_PEERCRED tells who did, for the log,
the metrics and per-profile ``allowed_uids`` / ``allowed_gids`` (either match admits; the
gid is the peer's primary group).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import struct
from dataclasses import dataclass

from broker._clock import Clock
from broker._http import _problem
from broker._http._problem import Problem
from broker._loopback import is_localhost_name
from broker._profile import ProfileConfig

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The process at the other end of a Unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"uid {self.uid} (gid {self.gid}, pid {self.pid})"


def read_peercred(transport: asyncio.BaseTransport) -> PeerCred | None:
    """SO_PEERCRED of a Unix connection; None where the platform has no such option."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


class TcpGate:
    """The Host and key checks every TCP request passes; the key is compared in constant time."""

    def __init__(self, auth: str, key: str) -> None:
        self.auth = auth
        self.key = key.encode()
        self.key_dir = "<the broker's socket directory>"  # for messages; see HttpService
        self.good_hosts: dict[bytes, bool] = {}  # a connection repeats its Host: remember

    def check(self, host: bytes | None, key: bytes | None) -> Problem | None:
        """None when the request may proceed, else the refusal."""
        if host is None:
            return _problem.missing_host()
        if not self.host_ok(host):
            return _problem.host_not_loopback(host.decode("latin-1"))
        if not key:
            return _problem.missing_key(self.auth, self.key_dir)
        if self.auth == "key" and not hmac.compare_digest(key, self.key):
            return _problem.wrong_key(self.key_dir)
        return None

    def host_ok(self, host: bytes) -> bool:
        ok = self.good_hosts.get(host)
        if ok is None:
            ok = is_localhost_name(host.decode("latin-1"))
            if len(self.good_hosts) < 64:  # bounded: only ever a handful of honest names
                self.good_hosts[host] = ok
        return ok


def peer_allowed(config: ProfileConfig, peer: PeerCred | None) -> bool:
    """Whether ``peer`` may take this profile's token (always, unless the profile restricts)."""
    uids, gids = config.allowed_uids, config.allowed_gids
    if uids is None and gids is None:
        return True
    if peer is None:
        return False
    return (uids is not None and peer.uid in uids) or (gids is not None and peer.gid in gids)


class RateLimitedLog:
    """At most ``burst`` log lines per ``window`` seconds; the next line says how many were
    dropped. A flood of refused requests must not flood the journal."""

    def __init__(self, clock: Clock, *, burst: int = 20, window: float = 60.0) -> None:
        self._clock = clock
        self._burst = burst
        self._window = window
        self._window_start = -window
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """True if a line may be written now (then read and reset ``suppressed``)."""
        now = self._clock.monotonic()
        if now - self._window_start >= self._window:
            self._window_start, self._count = now, 0
        if self._count >= self._burst:
            self.suppressed += 1
            return False
        self._count += 1
        return True

    def take_suppressed(self) -> int:
        dropped, self.suppressed = self.suppressed, 0
        return dropped
