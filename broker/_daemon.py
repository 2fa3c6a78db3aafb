"""``colt-broker serve``: compose configuration, engine, listeners and signals into the daemon.

Start-up order matters to users: the listeners are bound and the persisted tokens restored
before the daemon says it is ready, so the first consumer after READY is served at once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.abc
import httpx
import structlog

from broker import _paths
from broker._config import Config, find_config_file, load_config
from broker._engine import Engine
from broker._http import (
    HttpService,
    Transport,
    new_http_key,
    open_tcp_listener,
    open_unix_listener,
    raise_nofile_limit,
    remove_own_files,
    write_key_files,
)
from broker._logging import configure_logging, register_secret
from broker._loop import backend_options
from broker._loopback import is_loopback_address
from broker._metrics import Metrics
from broker._persist import TokenStore
from broker._systemd import InheritedSocket, Notifier, listen_fds
from broker.exceptions import ConfigError

log = structlog.get_logger("broker.daemon")


@dataclass(frozen=True)
class Listener:
    sock: socket.socket
    transport: Transport
    where: str


def open_listeners(config: Config, inherited: list[InheritedSocket]) -> list[Listener]:
    """Sockets passed by systemd socket activation, else our own: the Unix socket, and
    loopback TCP unless http_port is 0."""
    if inherited:
        return [_adopt(s) for s in inherited]
    b = config.broker
    found: list[Listener] = []
    try:
        if b.http_port:  # first: a taken port must not leave a socket file behind
            sock = open_tcp_listener(b.http_host, b.http_port)
            host, port = sock.getsockname()[:2]
            found.append(Listener(sock, "tcp", f"{host}:{port}"))
        unix = open_unix_listener(b.socket_path, mode=b.socket_mode, group=b.socket_group)
        found.insert(0, Listener(unix, "unix", str(b.socket_path)))
        _refuse_untrusted(b.socket_path.parent)
    except BaseException:
        for listener in found:
            listener.sock.close()
        if any(x.transport == "unix" for x in found):
            remove_own_files(b.socket_path, b.socket_path.parent)
        raise
    return found


def _refuse_untrusted(directory: Path) -> None:
    """Checked after binding, on the directory really used: checking before would leave a
    moment in which another user could plant one."""
    why = _paths.untrusted_dir(str(directory))
    if why:
        raise ConfigError(
            f"refusing to listen in {directory}: {why}; set socket_path to a directory only "
            "this user can write"
        )


def _adopt(inherited: InheritedSocket) -> Listener:
    if inherited.family == socket.AF_UNIX:
        return Listener(inherited.sock, "unix", inherited.path or "?")
    if inherited.family in (socket.AF_INET, socket.AF_INET6):
        host, port = inherited.sock.getsockname()[:2]
        if not is_loopback_address(host):
            raise ConfigError(
                f"systemd passed a socket on {host}:{port}, not a loopback address: "
                "ListenStream= must be 127.0.0.1:PORT or [::1]:PORT"
            )
        return Listener(inherited.sock, "tcp", f"{host}:{port}")
    raise ConfigError(f"systemd passed a socket of an unsupported family ({inherited.family})")


def _key_dir(config: Config, listeners: list[Listener]) -> Path:
    """The key files live beside the Unix socket clients use."""
    for listener in listeners:
        if listener.transport == "unix" and listener.where.startswith("/"):
            return Path(listener.where).parent
    return config.broker.socket_path.parent


def _upstream_client() -> httpx.AsyncClient:
    # Per-profile timeouts are applied around each request (broker._upstream); this one only
    # bounds a connection that would otherwise hang forever.
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0), follow_redirects=False)


class Daemon:
    """The running broker: one engine, one HTTP service, several listeners."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        inherited: list[InheritedSocket] | None = None,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.notifier = notifier or Notifier({})
        self._inherited = inherited or []
        self._reload = reload
        self.http_key = new_http_key()
        self.engine: Engine | None = None
        self.service: HttpService | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; READY=1 once every listener is up and tokens are restored."""
        config = self.config
        _register_secrets(config, self.http_key)
        nofile = raise_nofile_limit()  # before HttpService sizes its connection cap from it
        listeners = open_listeners(config, self._inherited)
        key_dir = _key_dir(config, listeners)
        write_key_files(key_dir, self.http_key, group=config.broker.socket_group)
        own_socket = None if self._inherited else config.broker.socket_path
        try:
            await self._serve(listeners, key_dir, nofile, task_status)
        finally:
            for listener in listeners:
                listener.sock.close()
            remove_own_files(own_socket, key_dir)

    async def _serve(
        self,
        listeners: list[Listener],
        key_dir: Path,
        nofile: int,
        task_status: anyio.abc.TaskStatus[Daemon],
    ) -> None:
        config = self.config
        async with _upstream_client() as http, anyio.create_task_group() as tg:
            self.engine = engine = Engine(
                config.profiles,
                http=http,
                store=TokenStore(config.broker.state_dir),
                observer=self.metrics,
                heartbeat=self._heartbeat,
                heartbeat_interval=self.notifier.watchdog_interval or 10.0,
            )
            self.metrics.bind_status(engine.status)
            self.service = service = HttpService(
                engine,
                config.profiles,
                default_profile=config.default_profile,
                http_auth=config.broker.http_auth,
                http_key=self.http_key,
                metrics=self.metrics,
            )
            await tg.start(engine.run)
            for listener in listeners:
                await tg.start(service.serve, listener.sock, listener.transport)
            log.info(
                "broker.ready",
                profiles=list(config.profiles),
                listeners=[f"{x.transport}:{x.where}" for x in listeners],
                key_file=str(key_dir / _paths.KEY_FILE),
                inherited=bool(self._inherited),
                max_connections=service.limits.max_connections,
                nofile=nofile,
            )
            self.notifier.ready(self._summary())
            task_status.started(self)

    def _heartbeat(self) -> None:
        self.notifier.watchdog()
        self.notifier.status(self._summary())

    def _summary(self) -> str:
        if self.engine is None:
            return "starting"
        states = self.engine.status()
        valid = sum(1 for s in states if s.valid)
        return f"{valid}/{len(states)} profiles hold a valid token"

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration; a bad one is logged and the old stays in force."""
        if self._reload is None or self.engine is None or self.service is None:
            log.warning("config.reload_unsupported", hint="restart the daemon to reload")
            return
        self.notifier.reloading()
        try:
            config = await anyio.to_thread.run_sync(self._reload)
        except ConfigError as exc:
            log.error("config.reload_failed", error=str(exc), hint="the old configuration stays")
        else:
            self._apply(config)
            await self.engine.update(config.profiles)
            self.service.update(config.profiles, config.default_profile)
            log.info("config.reloaded", profiles=list(config.profiles))
        self.notifier.ready(self._summary())

    def _apply(self, config: Config) -> None:
        if config.broker != self.config.broker:
            log.warning("config.restart_needed", hint="[broker] changes take effect on restart")
        for warning in config.warnings:
            log.warning("config.warning", message=warning)
        for profile in config.profiles.values():
            register_secret(profile.secret.reveal())
        self.config = replace(config, broker=self.config.broker)


def _register_secrets(config: Config, key: str) -> None:
    register_secret(key)
    for profile in config.profiles.values():
        register_secret(profile.secret.reveal())


async def _serve(config: Config, demo: bool, reload: Callable[[], Config] | None) -> None:
    notifier = Notifier()
    # Signals are caught from before READY until every task has ended: a SIGHUP right after
    # READY is a reload, not a death, and a second SIGTERM cannot cut a state write short.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:
            if demo:
                config = await _start_demo(tg, config)
                reload = None  # the demo's configuration is made, not read
            daemon = Daemon(config, notifier=notifier, inherited=listen_fds(), reload=reload)
            await tg.start(daemon.run)
            await _until_stopped(daemon, signals)
            notifier.stopping()
            log.info("broker.stopping")
            tg.cancel_scope.cancel()


async def _until_stopped(daemon: Daemon, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            await daemon.reload()
            continue
        log.info("broker.signal", signal=signal.Signals(signum).name)
        return


async def _start_demo(tg: anyio.abc.TaskGroup, config: Config) -> Config:
    from broker.emulator import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Emulator

    emulator = Emulator({DEMO_CLIENT_ID: DEMO_CLIENT_SECRET})
    await tg.start(emulator.run)
    log.info("demo.emulator", token_url=emulator.token_url, client_id=DEMO_CLIENT_ID)
    return config_for_demo(config, emulator.token_url)


def config_for_demo(base: Config, token_url: str) -> Config:
    """The demo's configuration: one profile, `default`, against the embedded emulator."""
    from broker._profile import ProfileConfig, Secret
    from broker.emulator import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET

    profile = ProfileConfig(
        name="default",
        client_id=DEMO_CLIENT_ID,
        secret=Secret(DEMO_CLIENT_SECRET, "demo (made up)"),
        token_url=token_url,
        account="demo",
    )
    broker = replace(base.broker, state_dir=base.broker.state_dir / "demo")
    return replace(base, broker=broker, profiles={"default": profile}, warnings=())


def load_for_serve(config_path: Path | None, demo: bool, environ: Mapping[str, str]) -> Config:
    """The configuration `serve` runs with; the demo needs none (a file may still set [broker])."""
    path = find_config_file(config_path, environ)
    if path is None and not demo:
        raise ConfigError(
            "no configuration file: pass --config PATH, set COLT_BROKER_CONFIG, or create "
            "~/.config/colt-broker/config.toml or /etc/colt-broker/config.toml from "
            "config.example.toml; or try the product with `colt-broker serve --demo`"
        )
    if demo:
        # The demo brings its own profile; a file may still set [broker]. Its profiles'
        # secrets are not read: the demo never uses them.
        stand_in = {
            "client_id": "demo",
            "client_secret_env": "UNUSED",
            "token_url": "http://127.0.0.1/",
        }
        return load_config(
            path, environ=environ, load_secrets=False, overrides={"profiles": {"default": stand_in}}
        )
    return load_config(path, environ=environ)


def serve_command(config_path: Path | None, *, demo: bool) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    environ = dict(os.environ)
    try:
        config = load_for_serve(config_path, demo, environ)
    except ConfigError as exc:
        sys.stderr.write(f"colt-broker: configuration error: {exc}\n")
        return 2
    configure_logging(config.broker.log_format, config.broker.log_level)
    for warning in config.warnings:
        log.warning("config.warning", message=warning)

    def reload() -> Config:
        return load_for_serve(config_path, demo, dict(os.environ))

    try:
        anyio.run(_serve, config, demo, reload, backend_options=backend_options())
    except KeyboardInterrupt:
        return 0
    except (ConfigError, BaseExceptionGroup) as exc:
        # Listeners are opened inside the task group, so a taken port or socket arrives
        # wrapped in an exception group: still the operator's to fix, not a traceback.
        error = _config_error_in(exc)
        if error is None:
            raise
        log.error("broker.start_failed", error=str(error))
        sys.stderr.write(f"colt-broker: cannot start: {error}\n")
        return 2
    return 0


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """The ConfigError in ``exc`` or anywhere in its exception groups, if any."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _config_error_in(inner)
            if found is not None:
                return found
    return None


__all__ = ["Daemon", "config_for_demo", "serve_command"]
