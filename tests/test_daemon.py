"""The real daemon end to end: ``Daemon`` with its engine and HTTP service, in this process,
in front of the Colt emulator, over a real Unix socket and a real loopback TCP port.

The configuration is read from a TOML file by ``load_config``, as ``serve`` does. Requests go
through ``httpx`` and the real ``curl`` binary; logs go through the daemon's own structlog
pipeline (``configure_logging``) into a buffer that is searched for secrets.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from io import StringIO
from pathlib import Path

import anyio
import httpx
import pytest
import structlog
from _cli_helpers import free_tcp_port, write_secret
from _procs import short_tmpdir
from prometheus_client.parser import text_string_to_metric_families

from broker._config import Config, load_config
from broker._daemon import Daemon
from broker._emulator_http import HttpRequest, Reply
from broker._logging import configure_logging
from broker._persist import TokenStore
from broker._systemd import Notifier
from broker._token import Token
from broker.emulator import Emulator

pytestmark = pytest.mark.anyio

CLIENT_ID = "daemon-test-client"
SECRET = "made-up-daemon-secret-3c9d41"  # made up: the emulator's only client
WRONG_SECRET = "made-up-wrong-secret-81f0e2"  # made up, rejected on purpose
TIMEOUT = 10.0  # seconds: the bound on every wait in this file
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="the curl binary is not installed")


class GatedEmulator(Emulator):
    """An emulator that holds every token request until ``release`` is set."""

    def __init__(self, clients: dict[str, str]) -> None:
        super().__init__(clients)
        self.release = anyio.Event()
        self.held = 0  # token requests that arrived and are held

    async def _token_request(self, request: HttpRequest) -> Reply:
        # Overrides the emulator's private handler: the only way to hold an answer open
        # until the test says so (a Fault's delay is a fixed time, not an event).
        self.held += 1
        with anyio.fail_after(TIMEOUT):
            await self.release.wait()
        return await super()._token_request(request)


@dataclass
class Running:
    """A daemon in front of an emulator, and how to reach it."""

    daemon: Daemon
    emulator: Emulator
    socket_path: Path
    port: int
    logs: StringIO

    @property
    def run_dir(self) -> Path:
        return self.socket_path.parent

    @property
    def key(self) -> str:
        return (self.run_dir / "http-key").read_text().strip()

    def unix(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket_path))
        return httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=TIMEOUT)

    def tcp(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"X-Colt-Broker": self.key},
            timeout=TIMEOUT,
        )


@contextmanager
def logs_into(buffer: StringIO) -> Iterator[None]:
    """The daemon's real log pipeline (redaction, JSON) at debug level, into ``buffer``."""
    saved = structlog.get_config()
    configure_logging("json", "debug", stream=buffer)
    try:
        yield
    finally:
        structlog.configure(**saved)


def write_config(root: Path, token_url: str, port: int, secret: str) -> Path:
    write_secret(root / "default.secret", secret)
    path = root / "config.toml"
    path.write_text(
        f'[broker]\nsocket_path = "{root}/run/broker.sock"\nstate_dir = "{root}/state"\n'
        f"http_port = {port}\n\n"
        f'[profiles.default]\nclient_id = "{CLIENT_ID}"\n'
        f'client_secret_file = "default.secret"\ntoken_url = "{token_url}"\n'
    )
    return path


@asynccontextmanager
async def running_daemon(
    *, secret: str = SECRET, emulator: Emulator | None = None
) -> AsyncIterator[Running]:
    """An emulator knowing CLIENT_ID/SECRET, and a daemon configured with ``secret``."""
    emulator = emulator or Emulator({CLIENT_ID: SECRET})
    logs = StringIO()
    with short_tmpdir() as root, logs_into(logs):
        async with anyio.create_task_group() as tg:
            await tg.start(emulator.run)
            port = free_tcp_port()
            config = load_config(write_config(root, emulator.token_url, port, secret), environ={})
            daemon = await tg.start(Daemon(config).run)
            yield Running(daemon, emulator, config.broker.socket_path, port, logs)
            tg.cancel_scope.cancel()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``condition()`` holds; fail naming ``what`` after TIMEOUT."""
    with anyio.move_on_after(TIMEOUT):
        while not condition():
            await anyio.wait_all_tasks_blocked()
        return
    raise AssertionError(f"timed out after {TIMEOUT} s waiting for {what}")


async def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """Run the real curl with ``-i``; (status, lower-cased headers, body)."""
    assert CURL is not None
    result = await anyio.run_process([CURL, "-sS", "-i", "--max-time", str(TIMEOUT), *args])
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


async def raw_get(socket_path: Path, target: str) -> tuple[int, bytes]:
    """One ``Connection: close`` GET on its own Unix connection: (status, body).

    Raw bytes rather than httpx: httpx's pool makes 200 concurrent connections slow.
    """
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    chunks: list[bytes] = []
    with anyio.fail_after(TIMEOUT):
        async with await anyio.connect_unix(socket_path) as stream:
            await stream.send(request.encode())
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    chunks.append(await stream.receive())
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus samples by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def first_token(run: Running) -> str:
    async with run.unix() as client:
        response = await client.get("/v1/token")
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


# --- one upstream request for many consumers ---------------------------------------------------


async def test_200_concurrent_cold_start_requests_share_one_upstream_request() -> None:
    """200 consumers asking before the first token exists all get it from one upstream request."""
    emulator = GatedEmulator({CLIENT_ID: SECRET})
    async with running_daemon(emulator=emulator) as run:
        engine = run.daemon.engine
        assert engine is not None
        tokens: list[str] = []

        async def consumer() -> None:
            status, body = await raw_get(run.socket_path, "/v1/token")
            assert status == 200, body
            tokens.append(json.loads(body)["access_token"])

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(consumer)
            # No public count of waiting consumers exists; the engine's per-profile one is read.
            waiting = engine._profiles["default"]
            await until(lambda: waiting.waiters == 200, "200 consumers waiting on the engine")
            assert emulator.held == 1 and not tokens  # still a cold start: no token exists
            emulator.release.set()
        assert len(tokens) == 200 and len(set(tokens)) == 1
        assert emulator.count() == 1
        async with run.unix() as client:
            metrics = samples((await client.get("/metrics")).text)
        waiters = {"profile": "default"}.items()
        assert metrics[("colt_broker_refresh_waiters_sum", frozenset(waiters))] == 200


# --- readiness -------------------------------------------------------------------------------


class ProbingNotifier(Notifier):
    """Records, at the very moment READY=1 would be sent, whether the Unix socket accepts a
    connection and what STATUS= says (the daemon calls ``ready`` synchronously)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__({})
        self.socket_path = socket_path
        self.seen: list[tuple[bool, str]] = []

    def ready(self, status: str) -> None:
        self.seen.append((self._connects(), status))

    def _connects(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket_path))  # a listening socket queues it at once
            except OSError:
                return False
            return True


def persist_a_token(config: Config, emulator: Emulator) -> None:
    """Save a fresh emulator token for the default profile, as a previous run would have."""
    issued = emulator.issue(CLIENT_ID)
    lifetime = emulator.verify(issued)["exp"] - time.time()
    now = time.monotonic()
    token = Token(issued, "Bearer", now, now + lifetime, time.time() + lifetime)
    TokenStore(config.broker.state_dir).save(config.profiles["default"], token)


async def test_ready_comes_after_the_socket_listens_and_the_token_is_restored() -> None:
    """READY=1 is sent only once the socket accepts connections and the saved token is back."""
    emulator = Emulator({CLIENT_ID: SECRET})
    with short_tmpdir() as root:
        async with anyio.create_task_group() as tg:
            await tg.start(emulator.run)
            config_file = write_config(root, emulator.token_url, 0, SECRET)
            config = load_config(config_file, environ={})
            persist_a_token(config, emulator)
            notifier = ProbingNotifier(config.broker.socket_path)
            with anyio.fail_after(TIMEOUT):
                await tg.start(Daemon(config, notifier=notifier).run)
            tg.cancel_scope.cancel()
    # STATUS= counting the restored token means the first consumer after READY is served at once.
    assert notifier.seen == [(True, "1/1 profiles hold a valid token")]
    assert emulator.count() == 0, "the restored token should have made a request needless"


# --- curl over each transport ----------------------------------------------------------------


@needs_curl
async def test_curl_gets_a_token_over_the_unix_socket() -> None:
    """``curl --unix-socket`` gets the token document, not cacheable."""
    async with running_daemon() as run:
        status, headers, body = await curl(
            "--unix-socket", str(run.socket_path), "http://localhost/v1/token"
        )
        assert status == 200
        assert headers["cache-control"] == "no-store"
        document = json.loads(body)
        assert document["profile"] == "default"
        assert run.emulator.verify(document["access_token"])["sub"] == CLIENT_ID


@needs_curl
async def test_curl_gets_a_token_over_tcp_with_the_curl_headers_file() -> None:
    """``curl -H @<dir>/curl-headers http://127.0.0.1:PORT/v1/token`` gets the same token."""
    async with running_daemon() as run:
        headers_file = run.run_dir / "curl-headers"
        status, _, body = await curl(
            "-H", f"@{headers_file}", f"http://127.0.0.1:{run.port}/v1/token"
        )
        assert status == 200
        assert json.loads(body)["access_token"] == await first_token(run)


@needs_curl
async def test_curl_over_tcp_without_the_header_is_401_naming_it() -> None:
    """Without ``X-Colt-Broker`` TCP gets a 401 problem naming the header and the file."""
    async with running_daemon() as run:
        status, headers, body = await curl(f"http://127.0.0.1:{run.port}/v1/token")
        assert status == 401
        assert headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert "X-Colt-Broker" in problem["detail"]
        assert f"{run.run_dir}/curl-headers" in problem["detail"]
        assert run.emulator.count() <= 1  # the refusal asked nothing of upstream


@needs_curl
async def test_curl_with_a_foreign_host_is_403() -> None:
    """A Host that is not a loopback name (DNS rebinding) is refused, even with the key."""
    async with running_daemon() as run:
        status, headers, body = await curl(
            "-H",
            f"@{run.run_dir / 'curl-headers'}",
            "-H",
            "Host: attacker.example",
            f"http://127.0.0.1:{run.port}/v1/token",
        )
        assert status == 403
        assert headers["content-type"] == "application/problem+json"
        assert "attacker.example" in json.loads(body)["detail"]
        assert b"eyJ" not in body


@needs_curl
async def test_raw_format_in_shell_substitution_is_the_json_access_token() -> None:
    """``tok=$(curl ...?format=raw)`` in bash holds exactly the JSON's access_token."""
    script = (
        'tok=$(curl -sS --max-time 10 --unix-socket "$1" "http://localhost/v1/token?format=raw")'
        ' && printf "[%s]" "$tok"'
    )
    async with running_daemon() as run:
        token = await first_token(run)
        result = await anyio.run_process(["bash", "-c", script, "bash", str(run.socket_path)])
        assert result.stdout.decode() == f"[{token}]"


# --- what the daemon shows: status, metrics, problems, logs -----------------------------------


async def test_status_shows_no_token_or_secret() -> None:
    """``/v1/status`` over either transport holds neither the token, the secret, nor the key."""
    async with running_daemon() as run:
        token = await first_token(run)
        async with run.unix() as unix, run.tcp() as tcp:
            bodies = [(await c.get("/v1/status")).text for c in (unix, tcp)]
        (profile,) = json.loads(bodies[0])["profiles"]
        assert profile["state"] == "fresh" and profile["valid"] is True
        for body in bodies:
            for secret in (token, SECRET, run.key):
                assert secret not in body


async def test_status_times_are_iso_like_the_token_documents() -> None:
    """``/v1/status`` gives times of day as ISO 8601 UTC, the same ``expires_at`` as the
    token document, and durations as seconds."""
    async with running_daemon() as run:
        await first_token(run)
        async with run.unix() as client:
            document = (await client.get("/v1/token")).json()
            (profile,) = (await client.get("/v1/status")).json()["profiles"]
        assert profile["expires_at"] == document["expires_at"]
        assert profile["expires_at"].endswith("Z")
        refreshed = datetime.fromisoformat(profile["last_refresh"])
        assert abs(refreshed.timestamp() - time.time()) < 60
        assert isinstance(profile["expires_in"], int | float)


async def test_metrics_expose_expiry_and_count_the_upstream_request() -> None:
    """``/metrics``: the token's seconds to expiry, and the one upstream request made."""
    async with running_daemon() as run:
        await first_token(run)
        async with run.unix() as client:
            response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        metrics = samples(response.text)
        default = frozenset({("profile", "default")})
        assert 1700 < metrics[("colt_broker_token_expires_in_seconds", default)] <= 1800
        ok = default | {("status", "200")}
        assert metrics[("colt_broker_upstream_responses_total", ok)] == 1 == run.emulator.count()
        assert metrics[("colt_broker_upstream_request_seconds_count", default)] == 1
        assert metrics[("colt_broker_refreshes_total", default | {("outcome", "ok")})] == 1


async def test_rejected_credentials_give_a_503_problem_with_upstream_detail() -> None:
    """A wrong secret: 503 problem+json with upstream 401, Colt's code, the tracking id the
    emulator saw, and Retry-After; and no fast retry upstream."""
    async with running_daemon(secret=WRONG_SECRET) as run, run.unix() as client:
        response = await client.get("/v1/token")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert int(response.headers["retry-after"]) > 0
        problem = response.json()
        upstream = problem["upstream"]
        assert (problem["status"], problem["profile"]) == (503, "default")
        assert (upstream["status"], upstream["code"]) == (401, "002")
        assert upstream["tracking_id"] == run.emulator.requests[0].tracking_id
        assert run.emulator.count() == 1
        for secret in (WRONG_SECRET, SECRET):
            assert secret not in response.text


async def test_problem_detail_reads_as_separate_sentences() -> None:
    """The advice in a 503's detail starts a new sentence after the upstream error."""
    async with running_daemon(secret=WRONG_SECRET) as run, run.unix() as client:
        detail = (await client.get("/v1/token")).json()["detail"]
    assert ". Colt rejected this profile's client credentials" in detail


async def test_logs_hold_no_secret_key_or_token() -> None:
    """Serving, refusals and a reported refresh, logged at debug: no secret, key or token."""
    async with running_daemon() as run:
        first = await first_token(run)
        async with run.unix() as unix, run.tcp() as tcp:
            await tcp.get("/v1/token")
            await tcp.get("/v1/token", headers={"X-Colt-Broker": "wrong-key-value"})
            report = {"access_token": first}
            refreshed = await unix.post("/v1/token/default/refresh", json=report)
        second = refreshed.json()["access_token"]
        key = run.key
    logs = run.logs.getvalue()
    assert "token.refreshed" in logs and "peer.first_token" in logs  # the capture works
    assert second != first
    for secret in (SECRET, key, first, second, _basic(SECRET)):
        assert secret not in logs


async def test_logs_of_rejected_credentials_hold_no_secret() -> None:
    """The upstream failure is logged with its tracking id, without the secret or Basic header."""
    async with running_daemon(secret=WRONG_SECRET) as run, run.unix() as client:
        await client.get("/v1/token")
    logs = run.logs.getvalue()
    assert "upstream.failed" in logs
    assert str(run.emulator.requests[0].tracking_id) in logs
    for secret in (WRONG_SECRET, _basic(WRONG_SECRET)):
        assert secret not in logs


def _basic(secret: str) -> str:
    """The credential part of the Basic Authorization header the broker sends."""
    return base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
