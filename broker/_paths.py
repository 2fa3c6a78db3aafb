"""Where the daemon listens and where clients look for it. Standard library only: the
``colt-broker token`` path imports this and must start fast."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "broker.sock"
SYSTEM_RUNTIME_DIR = Path("/run/colt-broker")
DEFAULT_URL = "http://127.0.0.1:8787"
KEY_FILE = "http-key"
CURL_HEADERS_FILE = "curl-headers"


def daemon_socket_path(environ: Mapping[str, str]) -> Path:
    """The daemon's default socket: systemd's RuntimeDirectory, else the user's runtime dir."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / SOCKET_NAME
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: ignore a relative path
        return Path(xdg) / "colt-broker" / SOCKET_NAME
    return Path(f"/tmp/colt-broker-{os.getuid()}") / SOCKET_NAME  # noqa: S108  # per-uid dir, created 0750 and owner-checked


def client_socket_candidates(environ: Mapping[str, str]) -> list[Path]:
    """Sockets a client tries, in order: $COLT_BROKER_SOCKET alone if set, else the user's
    own daemon, then the system service's."""
    explicit = environ.get("COLT_BROKER_SOCKET")
    if explicit:
        return [Path(explicit)]
    found = [daemon_socket_path({k: v for k, v in environ.items() if k != "RUNTIME_DIRECTORY"})]
    system = SYSTEM_RUNTIME_DIR / SOCKET_NAME
    return found if system in found else [*found, system]


def client_url(environ: Mapping[str, str]) -> str:
    """The loopback URL a client falls back to."""
    return environ.get("COLT_BROKER_URL", DEFAULT_URL).rstrip("/")


def key_file_candidates(environ: Mapping[str, str]) -> list[Path]:
    """Where the TCP key may be: $COLT_BROKER_KEY_FILE, else beside each candidate socket."""
    explicit = environ.get("COLT_BROKER_KEY_FILE")
    if explicit:
        return [Path(explicit)]
    return [sock.parent / KEY_FILE for sock in client_socket_candidates(environ)]
