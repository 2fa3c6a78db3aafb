"""POST /v1/token/{profile}/refresh: a consumer reports the token it saw rejected."""

from __future__ import annotations

import hashlib

import pytest
from _http_harness import Harness, curl
from structlog.testing import capture_logs

from broker._token import Token
from broker.exceptions import TokenUnavailable

pytestmark = pytest.mark.anyio


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


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "application/json"]
)
async def test_refresh_body_is_json_whatever_the_content_type(
    h: Harness, content_type: str | None
) -> None:
    """The body is read as JSON whatever Content-Type says (curl -d sends a form type)."""
    headers = [] if content_type is None else [("Content-Type", content_type)]
    async with h.unix() as c:
        r = await c.request(
            "POST", "/v1/token/default/refresh", body=b'{"access_token": "x"}', headers=headers
        )
    assert r.status == 200 and len(h.source.reports) == 1


async def test_curl_d_without_a_content_type(h: Harness) -> None:
    """`curl -d '{"sha256": "..."}'` as a user types it, with no -H, is accepted."""
    digest = hashlib.sha256(b"token-default-1").hexdigest()
    status, body = await curl(
        "--unix-socket", str(h.socket_path), "-d", f'{{"sha256": "{digest}"}}',
        "http://localhost/v1/token/default/refresh?format=raw",
    )  # fmt: skip
    assert (status, body) == (200, "token-default-1-renewed\n")
    assert h.source.reports == [("default", digest)]


async def test_report_is_logged_at_debug_by_fingerprint(h: Harness) -> None:
    """The serving layer logs a report at debug (the engine logs the refresh), naming the
    token by its fingerprint under ``token``."""
    digest = hashlib.sha256(b"token-default-1").hexdigest()
    with capture_logs() as logs:
        async with h.unix() as c:
            await c.request(
                "POST", "/v1/token/default/refresh", body=b'{"access_token": "token-default-1"}'
            )
    (reported,) = [e for e in logs if e["event"] == "token.reported"]
    assert (reported["log_level"], reported["token"]) == ("debug", digest[:12])
    assert "token-default-1" not in repr(logs)


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
        (b"\xff\xfe", "application/json", 400),
        (b"access_token=token-default-1", "application/x-www-form-urlencoded", 400),
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
