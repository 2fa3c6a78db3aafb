"""``HttpService``: the HTTP API served on listening sockets, as an anyio component."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import anyio
import structlog
from anyio.abc import TaskStatus

from broker._clock import SYSTEM_CLOCK, Clock
from broker._http._access import TcpGate
from broker._http._app import App
from broker._http._listeners import nofile_limit
from broker._http._pool import Pool
from broker._http._protocol import HttpProtocol
from broker._http._request import Limits, Transport
from broker._metrics import Metrics
from broker._profile import ProfileConfig
from broker._status import TokenSource
from broker.exceptions import ConfigError

log = structlog.get_logger("broker.http")

_SHUTDOWN_WAIT = 1.0  # seconds to let the server object finish closing


class HttpService:
    """The HTTP API (product.md, "HTTP API" and "Who may ask") on any number of sockets.

    ``socket_path`` only improves messages: refusals name ``<dir>/curl-headers`` and the
    socket to use; when it is not given, the first Unix socket served supplies it. Without
    ``limits``, the connection budget follows the process's descriptor limit as it is now
    (``Limits.for_nofile``): raise it first (``raise_nofile_limit``).
    """

    def __init__(
        self,
        source: TokenSource,
        profiles: Mapping[str, ProfileConfig],
        *,
        default_profile: str | None,
        http_auth: Literal["key", "none"],
        http_key: str,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
        limits: Limits | None = None,
        wait_timeout: float = 15.0,
        socket_path: Path | None = None,
    ) -> None:
        if http_auth not in ("key", "none"):
            raise ConfigError(f'http_auth must be "key" or "none", not {http_auth!r}')
        if http_auth == "key" and not http_key:
            raise ConfigError('http_auth = "key" needs a key (broker._http.new_http_key())')
        if limits is None:
            limits = Limits.for_nofile(nofile_limit())
        self._limits = limits
        self._pool = Pool(limits.max_connections, limits.tcp_connections)
        self._socket_path = socket_path
        self._app = App(
            source,
            gate=TcpGate(http_auth, http_key),
            metrics=metrics,
            clock=clock,
            wait_timeout=wait_timeout,
        )
        self._app.update(profiles, default_profile)
        if socket_path is not None:
            self._app.locate(socket_path)

    @property
    def limits(self) -> Limits:
        """What requests may cost and how many connections may be open."""
        return self._limits

    @property
    def open_connections(self) -> int:
        """Connections open right now, across all listeners."""
        return len(self._pool.open)

    def update(self, profiles: Mapping[str, ProfileConfig], default_profile: str | None) -> None:
        """Serve a new set of profiles (configuration reload); open connections carry on."""
        self._app.update(profiles, default_profile)

    async def serve(
        self,
        sock: socket.socket,
        transport: Transport,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve ``sock`` (bound and listening: our own or systemd's) until cancelled.

        ``task_status.started()`` is called once connections are being accepted. On
        cancellation the listener and every connection it accepted are closed.
        """
        if transport == "unix" and self._socket_path is None:
            self._socket_path = Path(sock.getsockname())
            self._app.locate(self._socket_path)
        server = await self._start(sock, transport, tag := object())
        log.info("http.listening", transport=transport, address=_address(sock))
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            server.close()
            mine = [p for p in self._pool.open if p.tag is tag]
            tasks = [task for protocol in mine for task in protocol.close()]
            with anyio.move_on_after(_SHUTDOWN_WAIT, shield=True):
                if tasks:
                    await asyncio.wait(tasks)
                await server.wait_closed()
            log.info("http.stopped", transport=transport)

    async def _start(
        self, sock: socket.socket, transport: Transport, tag: object
    ) -> asyncio.Server:
        if transport not in ("unix", "tcp"):
            raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
        loop = asyncio.get_running_loop()

        def factory() -> HttpProtocol:
            return HttpProtocol(self._app, self._pool, transport, self._limits, tag)

        # The backlog bounds one accept burst (asyncio accepts up to this many at a time).
        backlog = self._limits.backlog
        if transport == "unix":
            return await loop.create_unix_server(factory, sock=sock, backlog=backlog)
        return await loop.create_server(factory, sock=sock, backlog=backlog)


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)
