"""Listening sockets and the key files beside the Unix socket.

The Unix socket is bound, given its mode and group, and only then made to listen: until
``listen()`` every connect() is refused, so there is no moment when the path accepts a
connection under a mode more open than ``mode``. (Binding under a temporary name and renaming
would do as much, but ``getsockname()`` would keep the temporary name.) A stale socket left
by a crash is removed first; one that still answers belongs to a live daemon and is left
alone; of two daemons racing for the path, the second fails to bind.

The files made here (the socket, ``http-key``, ``curl-headers``) are remembered, so that
``remove_own_files`` at shutdown deletes them only while they are still the ones this
process made: never an inherited socket, nor the files of a daemon started meanwhile (its
socket answers; its key files hold another key). Inode numbers alone would not tell: a
file system reuses a freed one at once.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import resource
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import structlog

from broker._loopback import loopback_ip
from broker._paths import CURL_HEADERS_FILE, KEY_FILE, MAX_SOCKET_PATH
from broker.exceptions import ConfigError

log = structlog.get_logger("broker.http")

BACKLOG = 1024
_NOFILE_WHEN_UNLIMITED = 10240  # macOS: OPEN_MAX, the most it accepts under "unlimited"
_made_sockets: dict[Path, tuple[int, int]] = {}  # path -> (st_dev, st_ino) at bind
_made_files: dict[Path, bytes] = {}  # path -> SHA-256 of the content written


def _gid(group: str, what: str) -> int | None:
    """The numeric id of ``group`` ("" = leave the daemon's own group)."""
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"socket_group {group!r} does not exist (needed for {what}); create it or set "
            'socket_group = "" to keep the daemon\'s own group'
        ) from None


def _is_stale_socket(path: Path) -> bool:
    """True for a socket nobody listens on; raise if ``path`` is live or not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket; remove it or choose another socket_path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return True  # nobody listens: the leftover of a crash
    except OSError as exc:
        if exc.errno != errno.EAGAIN:  # EAGAIN: a live listener with a full backlog
            raise ConfigError(
                f"cannot tell whether {path} is in use ({exc.strerror}); remove it if no "
                "colt-broker runs, or choose another socket_path"
            ) from None
    finally:
        probe.close()
    raise ConfigError(
        f"another colt-broker is already listening on {path}; stop it first "
        "(systemctl stop colt-broker) or choose another socket_path"
    )


def _make_parent(path: Path, gid: int | None, group: str) -> None:
    """Create the socket's directory 0750 (with ``gid``, so the socket's group may traverse
    it). An existing one (e.g. systemd's RuntimeDirectory) is the operator's to set: only a
    group that locks ``gid`` out is reported."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, mode=0o750)
    except FileExistsError:  # the daemon checks who owns it once the socket is bound
        _check_group(parent, gid, group)
        return
    try:
        if gid is not None:
            os.chown(parent, -1, gid)
        os.chmod(parent, 0o750)  # noqa: S103  # group may traverse: the product's layout
    except OSError as exc:
        raise ConfigError(f"cannot set the mode and group of {parent}: {exc.strerror}") from None


def _check_group(directory: Path, gid: int | None, group: str) -> None:
    if gid is None:
        return
    info = directory.stat()
    if info.st_gid != gid and not info.st_mode & 0o001:
        log.warning(
            "socket.directory_group",
            directory=str(directory),
            gid=info.st_gid,
            socket_group=group,
            hint=f"members of socket_group cannot reach the socket: chgrp {group} {directory}",
        )


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket_path {path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path "
            "may have; choose a shorter one"
        )


def open_unix_listener(path: Path, *, mode: int = 0o660, group: str = "") -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` and ``group``.

    The parent directory is created 0750 if missing. Raises ConfigError when a live daemon
    answers at ``path``, when a non-socket file is there, or when ``group`` does not exist.
    """
    _check_length(path)
    gid = _gid(group, f"the socket {path}")
    _make_parent(path, gid, group)
    if _is_stale_socket(path):
        path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_then_listen(sock, path, mode, gid)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_then_listen(sock: socket.socket, path: Path, mode: int, gid: int | None) -> None:
    try:
        sock.bind(str(path))
    except OSError as exc:
        raise ConfigError(f"cannot create the socket {path}: {exc.strerror}") from None
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ConfigError(f"cannot set the mode and group of {path}: {exc.strerror}") from None
    info = path.lstat()
    _made_sockets[path] = (info.st_dev, info.st_ino)
    sock.listen(BACKLOG)


def open_tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on a loopback address (127.0.0.0/8 or ::1) only.

    ``port`` 0 binds an ephemeral port (read it back with ``getsockname()``).
    """
    address = loopback_ip(host)
    if address is None:
        raise ConfigError(
            f"http_host {host!r} is not a loopback address; colt-broker serves tokens on "
            '127.0.0.1 or ::1 only (set http_host = "127.0.0.1")'
        )
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(address), port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host} port {port}: {exc.strerror}; is another colt-broker "
            "running? Set http_port to a free port, or 0 for no TCP listener"
        ) from None
    return sock


def new_http_key() -> str:
    """A fresh key for the ``X-Colt-Broker`` header (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def write_key_files(directory: Path, key: str, *, group: str = "") -> None:
    """Write ``http-key`` (the key) and ``curl-headers`` (``X-Colt-Broker: <key>``), 0640.

    Each file is written under a temporary name and renamed, so a reader never sees half.
    """
    gid = _gid(group, f"the key files in {directory}")
    _atomic_write(directory / KEY_FILE, f"{key}\n", gid)
    _atomic_write(directory / CURL_HEADERS_FILE, f"X-Colt-Broker: {key}\n", gid)


def _atomic_write(path: Path, text: str, gid: int | None) -> None:
    temp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o640)
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink()
        raise
    os.close(fd)
    os.replace(temp, path)
    _made_files[path] = hashlib.sha256(text.encode()).digest()


def remove_own_files(socket_path: Path | None, key_dir: Path) -> None:
    """At a clean stop: remove the socket (unless None: an inherited one is systemd's) and
    the key files in ``key_dir``, so no client reads a key that no longer opens anything.

    Call it once the listeners are closed: a file is removed only while it is still the one
    this process made, and a socket that answers is taken for another daemon's. Failures
    are logged, never raised (the daemon is stopping anyway).
    """
    if socket_path is not None:
        _remove_if(socket_path, _socket_is_ours)
    for name in (KEY_FILE, CURL_HEADERS_FILE):
        _remove_if(key_dir / name, _file_is_ours)


def _remove_if(path: Path, ours: Callable[[Path], bool]) -> None:
    try:
        if ours(path):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("files.remove_failed", path=str(path), error=exc.strerror)


def _socket_is_ours(path: Path) -> bool:
    """The socket we bound, and nobody listens on it (``_is_stale_socket`` raises if live)."""
    made = _made_sockets.pop(path, None)
    info = path.lstat()
    if made != (info.st_dev, info.st_ino):
        return False
    try:
        return _is_stale_socket(path)
    except ConfigError:  # live (another daemon's), or not a socket any more: not ours
        return False


def _file_is_ours(path: Path) -> bool:
    made = _made_files.pop(path, None)
    return made is not None and hashlib.sha256(path.read_bytes()).digest() == made


def nofile_limit() -> int:
    """The soft limit on open descriptors, as a number (an "unlimited" one counted as the
    most a process may ask for where that is the case)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _NOFILE_WHEN_UNLIMITED if soft == resource.RLIM_INFINITY else soft


def raise_nofile_limit() -> int:
    """Raise the soft limit on open descriptors (RLIMIT_NOFILE) to the hard limit, and
    return the soft limit now in force: ``Limits.for_nofile(raise_nofile_limit())``.

    The usual soft limit, 1024, is a relic of select(); the event loop uses epoll/kqueue.
    Where the limit cannot be raised (a seccomp filter, a platform cap) the current one is
    returned, and the connection cap follows it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return nofile_limit()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("nofile.not_raised", soft=soft, hard=hard, error=str(exc))
        return soft
    return target
