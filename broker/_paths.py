"""Where the daemon listens and where clients look for it.

Standard library only, and strings rather than pathlib: ``colt-broker token`` imports this
inside ``$(...)`` in shell loops, where every millisecond of start-up counts.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping

SOCKET_NAME = "broker.sock"
SYSTEM_RUNTIME_DIR = "/run/colt-broker"
DEFAULT_URL = "http://127.0.0.1:8787"
KEY_FILE = "http-key"
CURL_HEADERS_FILE = "curl-headers"
# sun_path holds 108 bytes (104 on macOS) with the terminating NUL.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


def daemon_socket_path(environ: Mapping[str, str]) -> str:
    """The daemon's default socket: systemd's RuntimeDirectory, else the user's runtime dir."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, SOCKET_NAME)
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):  # the XDG spec: ignore a relative path
        return os.path.join(xdg, "colt-broker", SOCKET_NAME)
    # A per-uid directory, created 0750 by the daemon.
    return os.path.join(f"/tmp/colt-broker-{os.getuid()}", SOCKET_NAME)  # noqa: S108


def client_socket_candidates(environ: Mapping[str, str]) -> list[str]:
    """Sockets a client tries, in order: $COLT_BROKER_SOCKET alone if set, else the user's
    own daemon, then the system service's."""
    explicit = environ.get("COLT_BROKER_SOCKET")
    if explicit:
        return [explicit]
    own = daemon_socket_path({k: v for k, v in environ.items() if k != "RUNTIME_DIRECTORY"})
    system = os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    return [own] if own == system else [own, system]


def client_url(environ: Mapping[str, str]) -> str:
    """The loopback URL a client falls back to."""
    return environ.get("COLT_BROKER_URL", DEFAULT_URL).rstrip("/")


def key_file_candidates(environ: Mapping[str, str]) -> list[str]:
    """Where the TCP key may be: $COLT_BROKER_KEY_FILE, else beside each candidate socket."""
    explicit = environ.get("COLT_BROKER_KEY_FILE")
    if explicit:
        return [explicit]
    return [os.path.join(os.path.dirname(s), KEY_FILE) for s in client_socket_candidates(environ)]


def untrusted_dir(directory: str) -> str | None:
    """Why a socket directory could be another user's trap, or None when it is safe.

    Safe: a real directory (not a link), writable by nobody else, owned by us or root, or
    created where only root can create things (systemd's /run/colt-broker belongs to the
    service user, in root's /run). /tmp/colt-broker-<uid> made by someone else is not.
    """
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return None  # nothing there yet: nothing to be tricked by
    except OSError as exc:
        return f"cannot inspect {directory}: {exc.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    if info.st_mode & 0o022:
        return f"{directory} is writable by other users (group or world)"
    if info.st_uid in (os.geteuid(), 0) or _root_only(os.path.dirname(directory)):
        return None
    return f"{directory} belongs to uid {info.st_uid}, not to this user or root"


def _root_only(directory: str) -> bool:
    try:
        info = os.lstat(directory)
    except OSError:
        return False
    return info.st_uid == 0 and not info.st_mode & 0o022
