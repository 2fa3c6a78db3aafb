"""Listening sockets and the key files beside the Unix socket.

The Unix socket is bound, given its mode and group, and only then made to listen: until
``listen()`` every connect() is refused, so there is no moment when the path accepts a
connection under a mode more open than ``mode``. (Binding under a temporary name and renaming
would do as much, but ``getsockname()`` would keep the temporary name.) A stale socket left
by a crash is removed first; one that still answers belongs to a live daemon and is left
alone; of two daemons racing for the path, the second fails to bind.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

from broker.exceptions import ConfigError

BACKLOG = 1024
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
KEY_FILE, CURL_HEADERS_FILE = "http-key", "curl-headers"


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


def _make_parent(path: Path) -> None:
    # Only a directory we create is forced to 0750: an existing one (e.g. systemd's
    # RuntimeDirectory) is the operator's to set.
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o750)
        os.chmod(parent, 0o750)  # noqa: S103  # group may traverse: the product's layout


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ConfigError(
            f"socket_path {path} is longer than the {_MAX_UNIX_PATH} bytes a Unix socket path "
            "may have; choose a shorter one"
        )


def open_unix_listener(path: Path, *, mode: int = 0o660, group: str = "") -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` and ``group``.

    The parent directory is created 0750 if missing. Raises ConfigError when a live daemon
    answers at ``path``, when a non-socket file is there, or when ``group`` does not exist.
    """
    _check_length(path)
    gid = _gid(group, f"the socket {path}")
    _make_parent(path)
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
    sock.listen(BACKLOG)


def open_tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on a loopback address (127.0.0.0/8 or ::1) only.

    ``port`` 0 binds an ephemeral port (read it back with ``getsockname()``).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
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
        sock.bind((host, port))
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
