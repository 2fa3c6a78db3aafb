"""Find the running daemon and exchange one request with it (standard library only).

Order: ``$COLT_BROKER_SOCKET`` (alone, when set), else the user's own daemon's socket, then
the system service's; then loopback TCP (``$COLT_BROKER_URL`` or http://127.0.0.1:8787) with
the key read from ``http-key`` beside a socket. The error names every place tried.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from functools import partial

from broker import _paths
from broker._wire import Endpoint, Response, WireError, peer_uid, request
from broker.exceptions import BrokerUnavailable

START_HINT = (
    "start it with `colt-broker serve` (or `systemctl start colt-broker`), or point "
    "COLT_BROKER_SOCKET / COLT_BROKER_URL at a running one"
)


def call(
    method: str,
    target: str,
    *,
    environ: Mapping[str, str] | None = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One request to the first daemon that answers. Raises BrokerUnavailable."""
    env = os.environ if environ is None else environ
    tried = _bad_settings(env)
    for endpoint, extra in _endpoints(env):
        try:
            return request(
                endpoint,
                method,
                target,
                headers={**(headers or {}), **extra},
                body=body,
                timeout=timeout,
            )
        except (OSError, WireError) as exc:
            tried.append(f"{endpoint.describe()} ({_why(exc)})")
    raise BrokerUnavailable(
        "colt-broker daemon not reachable; tried " + "; ".join(tried) + ". " + START_HINT
    )


def _endpoints(env: Mapping[str, str]) -> list[tuple[Endpoint, dict[str, str]]]:
    found: list[tuple[Endpoint, dict[str, str]]]
    if "COLT_BROKER_SOCKET" in env:  # a socket named explicitly is the user's choice
        found = [(Endpoint(unix=env["COLT_BROKER_SOCKET"]), {})]
    else:
        found = [
            (Endpoint(unix=path, verify=partial(_vet_server, os.path.dirname(path))), {})
            for path in _paths.client_socket_candidates(env)
            if _trusted(path)
        ]
    try:
        tcp = Endpoint.from_url(_paths.client_url(env))
    except WireError:
        return found
    return [*found, (tcp, {"X-Colt-Broker": read_key(env) or "none"})]


def _trusted(socket_path: str) -> bool:
    return _paths.untrusted_dir(os.path.dirname(socket_path)) is None


def _vet_server(directory: str, sock: socket.socket) -> None:
    """After connecting: the daemon must run as us, root, or the owner of the (still trusted)
    socket directory. Checking the directory alone is a race: it can be swapped in between."""
    why = _paths.untrusted_dir(directory)
    if why:
        raise WireError(f"not trusted: {why}")
    uid = peer_uid(sock)
    if uid is None or uid in (os.geteuid(), 0):
        return
    try:
        owner = os.lstat(directory).st_uid
    except OSError:
        owner = None
    if owner != uid:
        raise WireError(f"served by uid {uid}, which owns neither this user nor {directory}")


def _bad_settings(env: Mapping[str, str]) -> list[str]:
    try:
        Endpoint.from_url(_paths.client_url(env))
    except WireError as exc:
        problems = [f"no TCP fallback ({exc})"]
    else:
        problems = []
    if "COLT_BROKER_SOCKET" not in env:
        for path in _paths.client_socket_candidates(env):
            why = _paths.untrusted_dir(os.path.dirname(path))
            if why:
                problems.append(f"unix socket {path} (skipped: {why})")
    return problems


def read_key(env: Mapping[str, str]) -> str | None:
    """The TCP key from the first readable ``http-key`` file, if any."""
    explicit = "COLT_BROKER_KEY_FILE" in env or "COLT_BROKER_SOCKET" in env
    for path in _paths.key_file_candidates(env):
        if not explicit and _paths.untrusted_dir(os.path.dirname(path)):
            continue  # a key planted by another user would only earn a 403
        try:
            with open(path) as file:
                key = file.read().strip()
        except OSError:
            continue
        if key:
            return key
    return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, PermissionError):
        return "permission denied: ask to join the socket's group"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
