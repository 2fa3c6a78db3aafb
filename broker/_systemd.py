"""systemd's two small protocols, on the standard library alone.

* Notification (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments in one datagram
  to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or the abstract namespace when
  it starts with ``@``). The daemon says READY=1 once its listeners are up, RELOADING=1 and
  READY=1 around a reload, STOPPING=1 on the way out, and WATCHDOG=1 from its refresh loop.
* Socket activation (sd_listen_fds(3)): systemd passes listening sockets as file
  descriptors 3, 4, ... and says how many in ``$LISTEN_FDS``, for the process in
  ``$LISTEN_PID``, with names in ``$LISTEN_FDNAMES``.

Outside systemd every call is a silent no-op: no ``$NOTIFY_SOCKET``, nothing is sent; no
``$LISTEN_FDS`` for this pid, no sockets. A failed send never raises: systemd's view of
the daemon is not worth a refresh loop that crashes.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

__all__ = ["InheritedSocket", "Notifier", "listen_fds", "notify", "under_systemd"]

log = structlog.get_logger("broker.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START: fds 0-2 are stdio
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# PID 1 drains its notify socket at once; the bound only matters if it is wedged, and then
# a blocked send must not stall the event loop for long.
_SEND_TIMEOUT = 1.0


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when a systemd service manager started this process."""
    env = _environ(environ)
    return bool(env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"))


# --- notification -------------------------------------------------------------------


def _notify_address(environ: Mapping[str, str]) -> bytes | None:
    """The socket address in ``$NOTIFY_SOCKET``, or None when there is none we can use."""
    raw = environ.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):  # abstract namespace: a leading NUL, no trailing one
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    if raw:  # e.g. "vsock:..." (systemd >= 254, for VMs): not a local daemon's case
        log.debug("systemd.notify_socket_unsupported", notify_socket=raw)
    return None


def _send(address: bytes, state: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("systemd.notify_failed", state=state.split("\n", 1)[0], error=str(exc))
        return False
    return True


def _one_line(text: str) -> str:
    """A newline would start a new assignment: STATUS= text must not be able to add one."""
    return " ".join(text.splitlines())


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=..."``) as one datagram to
    ``$NOTIFY_SOCKET``. False when there is no socket or the send failed; never raises."""
    address = _notify_address(_environ(environ))
    return address is not None and _send(address, state)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and _int_or_none(pid) != os.getpid():
        return None  # the watchdog is meant for another process (our parent, say)
    usec = _int_or_none(environ.get("WATCHDOG_USEC"))
    if usec is None or usec <= 0:
        return None
    return usec / 2 / 1_000_000  # ping twice per period, as sd_watchdog_enabled(3) advises


class Notifier:
    """The daemon's line to systemd, read from the environment once at construction.

    Every method is a no-op outside systemd. ``monotonic_usec`` is the clock for
    RELOADING=1's MONOTONIC_USEC= (tests pass a fixed one).
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        env = _environ(environ)
        self._address = _notify_address(env)
        self._watchdog_interval = _watchdog_interval(env)
        self._monotonic_usec = monotonic_usec

    @property
    def enabled(self) -> bool:
        """True when there is a ``$NOTIFY_SOCKET`` to talk to."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when
        systemd runs no watchdog for this process."""
        return self._watchdog_interval

    def ready(self, status: str) -> None:
        """Startup or reload finished: the listeners are up."""
        self._send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> None:
        """A reload began; READY=1 must follow. MONOTONIC_USEC= lets systemd >= 253 tell
        this reload from an earlier one (Type=notify-reload); older versions ignore it."""
        self._send("RELOADING=1", f"MONOTONIC_USEC={self._monotonic_usec()}")

    def stopping(self) -> None:
        """Shutdown began."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status for ``systemctl status``."""
        self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Still alive: call from the loop whose progress proves it."""
        self._send("WATCHDOG=1")

    def _send(self, *assignments: str) -> None:
        if self._address is not None:
            _send(self._address, "\n".join(assignments))


# --- socket activation --------------------------------------------------------------


@dataclass(frozen=True)
class InheritedSocket:
    """A listening socket passed by systemd. ``family`` tells the Unix socket (AF_UNIX)
    from HTTP on loopback (AF_INET/AF_INET6); ``name`` is the unit's FileDescriptorName=
    (or ``"unknown"``); ``path`` is the AF_UNIX address (``@name`` when abstract)."""

    sock: socket.socket
    name: str
    family: int
    path: str | None

    @property
    def type(self) -> int:
        """The socket type, e.g. ``socket.SOCK_STREAM``."""
        return self.sock.type


def _inherited_fds(environ: Mapping[str, str]) -> range:
    pid = environ.get("LISTEN_PID")
    if pid is None or _int_or_none(pid) != os.getpid():
        return range(0)  # none passed, or passed to another process (our parent, say)
    count = _int_or_none(environ.get("LISTEN_FDS"))
    if count is None or count <= 0:
        return range(0)
    return range(LISTEN_FDS_START, LISTEN_FDS_START + count)


def _fd_names(environ: Mapping[str, str], count: int) -> list[str]:
    raw = environ.get("LISTEN_FDNAMES")
    names = raw.split(":") if raw else []
    return (names + ["unknown"] * count)[:count]  # "unknown" as sd_listen_fds_with_names(3)


def _unix_path(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX:
        return None
    address = sock.getsockname()
    if isinstance(address, bytes):  # Python gives the abstract namespace as bytes
        if address.startswith(b"\0"):
            return "@" + address[1:].decode(errors="backslashreplace")
        return os.fsdecode(address)
    return str(address) or None  # "" for an unnamed socket


def _wrap(fd: int, name: str) -> InheritedSocket | None:
    try:
        os.set_inheritable(fd, False)  # FD_CLOEXEC: no child of ours gets the listener
        sock = socket.socket(fileno=fd)  # detects family, type and protocol from the fd
    except OSError as exc:  # not a socket (ListenFIFO=, a stored fd) or already closed
        log.warning("systemd.listen_fd_unusable", fd=fd, name=name, error=str(exc))
        return None
    return InheritedSocket(sock=sock, name=name, family=sock.family, path=_unix_path(sock))


def _wrap_all(fds: Iterable[int], names: Iterable[str]) -> list[InheritedSocket]:
    wrapped = (_wrap(fd, name) for fd, name in zip(fds, names, strict=True))
    return [inherited for inherited in wrapped if inherited is not None]


def listen_fds(
    *, environ: Mapping[str, str] | None = None, unset: bool = True
) -> list[InheritedSocket]:
    """The listening sockets systemd passed to this process (socket activation), in fd
    order; [] when none were. With ``unset`` (and the real environment) the LISTEN_*
    variables are removed, so that no child process takes them for its own."""
    env = _environ(environ)
    fds = _inherited_fds(env)
    names = _fd_names(env, len(fds))
    if unset and environ is None:
        for key in _LISTEN_VARS:
            os.environ.pop(key, None)
    return _wrap_all(fds, names)
