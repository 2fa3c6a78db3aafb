"""POST /v1/token/{profile}/refresh: a consumer reports the token it saw rejected."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _http_harness import Harness, running, short_tmpdir

from broker._token import Token
from broker.exceptions import TokenUnavailable

pytestmark = pytest.mark.anyio


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture
async def h(sockdir: Path) -> AsyncIterator[Harness]:
    async with running(sockdir) as harness:
        yield harness


@pytest.mark.parametrize("form", ["access_token", "sha256"])
async def test_refresh_reports_the_rejected_token(h: Harness, form: str) -> None:
    """The refresh endpoint takes the token or its sha256 and answers the new token."""
    digest = hashlib.sha256(b"token-default-1").hexdigest()
    body = (
        b'{"access_token": "token-default-1"}'
        if form == "access_token"
        else f'{{"sha256": "{digest.upper()}"}}'.encode()
    )
    async with h.unix() as c:
        r = await c.request(
            "POST",
            "/v1/token/default/refresh",
            body=body,
            headers=[("Content-Type", "application/json")],
        )
    assert r.status == 200
    assert r.json()["access_token"] == "token-default-1-renewed"
    assert h.source.reports == [("default", digest)]


async def test_refresh_ignores_other_members(h: Harness) -> None:
    """Members beside the token's name are ignored, so clients may add their own."""
    body = b'{"access_token": "token-default-1", "client": "notebook"}'
    async with h.unix() as c:
        r = await c.request("POST", "/v1/token/default/refresh", body=body)
    assert r.status == 200 and len(h.source.reports) == 1


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"", "application/json", 400),
        (b"{", "application/json", 400),
        (b"[]", "application/json", 400),
        (b'{"sha256": "abc"}', "application/json", 400),
        (b'{"access_token": 5}', "application/json", 400),
        (b'{"access_token": ""}', "application/json", 400),
        (b'{"access_token": "x", "sha256": "' + b"a" * 64 + b'"}', "application/json", 400),
        (b'{"access_token": "x"}', "text/plain", 415),
        (b"\xff\xfe", "application/json", 400),
    ],
)
async def test_refresh_malformed_bodies(
    h: Harness, body: bytes, content_type: str, status: int
) -> None:
    """A refresh body that is not one of the two JSON forms is refused with a problem."""
    async with h.unix() as c:
        r = await c.request(
            "POST", "/v1/token/default/refresh", body=body, headers=[("Content-Type", content_type)]
        )
        assert r.status == status and r.json()["profile"] == "default"
        assert (await c.get("/v1/token")).status == 200  # the connection carries on
    assert h.source.reports == []


async def test_refresh_body_too_large_is_413_and_close(h: Harness) -> None:
    """A refresh body over max_body is 413, and the connection is closed."""
    async with h.unix() as c:
        await c.send(c.build("POST", "/v1/token/default/refresh", body=b"x" * 5000))
        r = await c.read_response()
        assert r.status == 413 and r.headers["connection"] == "close"
        assert await c.read_to_eof() == b""


async def test_refresh_requires_post(h: Harness) -> None:
    """GET on the refresh endpoint is 405 with Allow: POST."""
    async with h.unix() as c:
        r = await c.get("/v1/token/default/refresh")
    assert (r.status, r.headers["allow"]) == (405, "POST")


async def test_refresh_failure_is_503(h: Harness) -> None:
    """A refresh the engine cannot complete is a 503 problem."""

    async def unavailable(profile: str, sha256: str, timeout: float) -> Token:
        raise TokenUnavailable("upstream down", profile=profile, retry_after=3)

    h.source.on_report = unavailable
    async with h.unix() as c:
        r = await c.request("POST", "/v1/token/default/refresh", body=b'{"access_token": "t"}')
    assert (r.status, r.headers["retry-after"]) == (503, "3")
