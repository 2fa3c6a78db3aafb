"""Who may ask: the Host check, the X-Colt-Broker key, Unix peer credentials; with real curl."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _clocks import FakeClock
from _fake_source import FakeSource, profile_config
from _http_harness import KEY, Harness, curl, running
from structlog.testing import capture_logs

from broker._http import HttpService, write_key_files
from broker._metrics import Metrics
from broker._token import fingerprint
from broker.exceptions import ConfigError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def h(sockdir: Path) -> AsyncIterator[Harness]:
    async with running(sockdir) as harness:
        write_key_files(sockdir, KEY)
        yield harness


# --- curl, as the README shows it ------------------------------------------------------------


async def test_curl_over_the_unix_socket(h: Harness) -> None:
    """curl --unix-socket gets a token, no key needed."""
    status, body = await curl(
        "--unix-socket", str(h.socket_path), "http://localhost/v1/token?format=raw"
    )
    assert (status, body) == (200, "token-default-1\n")


async def test_curl_over_tcp_with_curl_headers_file(h: Harness, sockdir: Path) -> None:
    """curl -H @<dir>/curl-headers gets a token over loopback TCP."""
    status, body = await curl(
        "-H", f"@{sockdir}/curl-headers", f"http://127.0.0.1:{h.port}/v1/token/other?format=raw"
    )
    assert (status, body) == (200, "token-other-1\n")


async def test_curl_over_tcp_without_the_header_is_401(h: Harness, sockdir: Path) -> None:
    """Without X-Colt-Broker, TCP answers 401 naming the header and the curl-headers file."""
    status, body = await curl(f"http://127.0.0.1:{h.port}/v1/token")
    assert status == 401
    assert "X-Colt-Broker" in body and f"-H @{sockdir}/curl-headers" in body


async def test_curl_with_a_foreign_host_is_403(h: Harness, sockdir: Path) -> None:
    """A Host that is not a loopback name is refused 403 (DNS rebinding)."""
    status, body = await curl(
        "-H",
        f"@{sockdir}/curl-headers",
        "-H",
        "Host: evil.example",
        f"http://127.0.0.1:{h.port}/v1/token",
    )
    assert status == 403
    assert "'evil.example' is not a loopback name (DNS rebinding protection)" in body


async def test_curl_refresh_with_a_long_token(h: Harness) -> None:
    """curl -d with a JWT-sized body (curl then sends Expect: 100-continue) is answered."""
    long_token = "x" * 1500
    data = f'{{"access_token": "{long_token}"}}'
    status, _ = await curl(
        "--unix-socket", str(h.socket_path), "-H", "Content-Type: application/json", "-d", data,
        "http://localhost/v1/token/default/refresh",
    )  # fmt: skip
    assert status == 200 and h.source.reports[0][0] == "default"


# --- the TCP gate ----------------------------------------------------------------------------


async def test_wrong_key_is_403_and_not_echoed(h: Harness) -> None:
    """A wrong key is 403; neither it nor the right key appears in the answer."""
    async with h.tcp(key="guess-123456") as c:
        r = await c.get("/v1/token")
    assert r.status == 403 and r.json()["type"] == "urn:colt-broker:problem:wrong-key"
    assert b"guess-123456" not in r.body and KEY.encode() not in r.body


async def test_missing_key_401_has_a_challenge(h: Harness) -> None:
    """The 401 carries WWW-Authenticate, as HTTP requires."""
    async with h.tcp() as c:
        r = await c.get("/v1/token", auth=False)
    assert r.status == 401 and "X-Colt-Broker" in r.headers["www-authenticate"]


@pytest.mark.parametrize(
    "path", ["/v1/token", "/v1/status", "/metrics", "/healthz", "/readyz", "/nope"]
)
async def test_every_tcp_path_needs_the_key(h: Harness, path: str) -> None:
    """Every path over TCP, /healthz included, needs the key (product.md: every request)."""
    async with h.tcp() as c:
        assert (await c.get(path, auth=False)).status == 401


async def test_healthz_over_tcp_with_the_key(h: Harness) -> None:
    """/healthz over TCP answers with the key and a loopback Host; a foreign Host is 403."""
    async with h.tcp() as c:
        assert (await c.get("/healthz")).status == 200
    async with h.tcp() as c:
        assert (await c.get("/healthz", host="rebind.example")).status == 403


@pytest.mark.parametrize(
    ("key", "host", "status"),
    [(None, None, 401), ("wrong-key-0", None, 403), (KEY, "evil.example", 403)],
)
async def test_refusal_closes_the_connection(
    h: Harness, key: str | None, host: str | None, status: int
) -> None:
    """A 401/403 from the TCP gate says Connection: close and closes, even with a request
    pipelined behind it, so a client without the key cannot keep connections open."""
    async with h.tcp() as c:
        headers = [] if key is None else [("X-Colt-Broker", key)]
        refused = c.build("GET", "/healthz", auth=False, headers=headers, host=host)
        await c.send(refused + c.build("GET", "/healthz"))
        r = await c.read_response()
        assert (r.status, r.headers["connection"]) == (status, "close")
        assert await c.read_to_eof() == b""  # the pipelined request is not answered


async def test_request_without_host_closes_the_connection(h: Harness) -> None:
    """A TCP request without Host is a 400 that closes the connection."""
    async with h.tcp() as c:
        await c.send(f"GET /v1/token HTTP/1.1\r\nX-Colt-Broker: {KEY}\r\n\r\n".encode())
        r = await c.read_response()
        assert (r.status, r.headers["connection"]) == (400, "close")
        assert await c.read_to_eof() == b""


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8787", "127.0.0.1:1", "127.0.0.2", "[::1]:8787", "api.localhost"],
)
async def test_loopback_hosts_pass(h: Harness, host: str) -> None:
    """Every loopback spelling of Host passes the check."""
    async with h.tcp() as c:
        assert (await c.get("/v1/token", host=host)).status == 200


async def test_http_auth_none_still_needs_the_header(sockdir: Path) -> None:
    """With http_auth = "none" any non-empty X-Colt-Broker will do, but it must be there."""
    async with running(sockdir, http_auth="none") as h:
        async with h.tcp(key="anything") as c:
            assert (await c.get("/v1/token")).status == 200
            missing = await c.get("/v1/token", auth=False)
        assert missing.status == 401 and "any non-empty value" in missing.json()["detail"]
        async with h.tcp() as c:
            empty = await c.get("/v1/token", auth=False, headers=[("X-Colt-Broker", "")])
        assert empty.status == 401


def test_http_auth_is_validated() -> None:
    """A bad http_auth, or "key" without a key, is a configuration error."""
    source = FakeSource(FakeClock())
    bad: Any = "open"  # not one of the Literal values, on purpose
    with pytest.raises(ConfigError, match="http_auth"):
        HttpService(
            source, {}, default_profile=None, http_auth=bad, http_key="k", metrics=Metrics()
        )
    with pytest.raises(ConfigError, match="needs a key"):
        HttpService(
            source, {}, default_profile=None, http_auth="key", http_key="", metrics=Metrics()
        )


# --- Unix peer credentials -------------------------------------------------------------------


async def _get_default(sockdir: Path, **acl: frozenset[int]) -> tuple[int, dict[str, object]]:
    profiles = {"default": profile_config("default", **acl)}
    async with running(sockdir, profiles=profiles) as h, h.unix() as c:
        r = await c.get("/v1/token")
    return r.status, r.json()


async def test_peer_not_in_allowed_uids_is_403(sockdir: Path) -> None:
    """A profile with allowed_uids refuses other uids with a 403 naming the uid."""
    status, body = await _get_default(sockdir, allowed_uids=frozenset({os.getuid() + 1}))
    assert status == 403 and body["type"] == "urn:colt-broker:problem:peer-not-allowed"
    assert f"uid {os.getuid()}" in str(body["detail"])


async def test_peer_in_allowed_uids_is_served(sockdir: Path) -> None:
    """A uid in allowed_uids is served."""
    assert (await _get_default(sockdir, allowed_uids=frozenset({os.getuid()})))[0] == 200


async def test_peer_in_allowed_gids_is_served(sockdir: Path) -> None:
    """A peer whose primary gid is in allowed_gids is served."""
    acl = {"allowed_uids": frozenset({os.getuid() + 1}), "allowed_gids": frozenset({os.getgid()})}
    assert (await _get_default(sockdir, **acl))[0] == 200


async def test_restricted_profile_is_refused_over_tcp(sockdir: Path) -> None:
    """A profile restricted by uid cannot be verified over TCP: 403 pointing at the socket."""
    profiles = {"default": profile_config("default", allowed_uids=frozenset({os.getuid()}))}
    async with running(sockdir, profiles=profiles) as h, h.tcp() as c:
        r = await c.get("/v1/token")
    assert r.status == 403 and f"--unix-socket {sockdir}/broker.sock" in r.json()["detail"]


# --- logs -----------------------------------------------------------------------------------


async def test_first_token_is_logged_once_per_connection(h: Harness) -> None:
    """peer.first_token is logged with the peer's uid/gid/pid, once per connection."""
    with capture_logs() as logs:
        async with h.unix() as c:
            await c.get("/v1/token")
            await c.get("/v1/token")
    firsts = [e for e in logs if e["event"] == "peer.first_token"]
    assert len(firsts) == 1 and firsts[0]["token"] == fingerprint("token-default-1")
    assert (firsts[0]["uid"], firsts[0]["gid"], firsts[0]["pid"]) == (
        os.getuid(),
        os.getgid(),
        os.getpid(),
    )
    assert firsts[0]["log_level"] == "info"
    assert "token-default-1" not in repr(logs)


async def test_refusals_are_logged_rate_limited_without_the_key(h: Harness) -> None:
    """Refusals are warnings, at most a burst per minute, counting the dropped ones; no key."""
    with capture_logs() as logs:
        for _ in range(30):
            async with h.tcp(key="wrong-key-abcdef") as c:
                await c.get("/v1/token")
        h.clock.advance(61)
        async with h.tcp(key="wrong-key-abcdef") as c:
            await c.get("/v1/token")
    refused = [e for e in logs if e["event"] == "http.refused"]
    assert len(refused) == 21 and all(e["log_level"] == "warning" for e in refused)
    assert refused[-1]["suppressed"] == 10
    assert "wrong-key-abcdef" not in repr(logs) and KEY not in repr(logs)
