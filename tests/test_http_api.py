"""The HTTP API as users script against it: endpoints, bodies, headers, problems."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from _fake_source import profile_config
from _http_harness import Harness, running
from prometheus_client.parser import text_string_to_metric_families

from broker._token import Token
from broker.exceptions import (
    CredentialsRejected,
    Throttled,
    TokenUnavailable,
    UpstreamDetail,
)

pytestmark = pytest.mark.anyio


# --- GET /v1/token ---------------------------------------------------------------------------


async def test_token_json_body_and_headers(h: Harness) -> None:
    """GET /v1/token serves the default profile's token as the documented JSON, no-store."""
    h.clock.advance(10.7)
    async with h.unix() as c:
        r = await c.get("/v1/token")
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert "date" in r.headers
    assert r.json() == {
        "access_token": "token-default-1",
        "token_type": "Bearer",
        "expires_in": 1789,  # 1800 - 10.7, floored
        "expires_at": "2027-01-15T08:30:00Z",  # wall 1_800_000_000 + 1800
        "profile": "default",
    }


async def test_named_profile(h: Harness) -> None:
    """GET /v1/token/{profile} serves that profile's token."""
    async with h.unix() as c:
        r = await c.get("/v1/token/other")
    assert (r.status, r.json()["access_token"], r.json()["profile"]) == (
        200,
        "token-other-1",
        "other",
    )


async def test_percent_encoded_profile_name(sockdir: Path) -> None:
    """A profile name with special characters may be percent-encoded in the path."""
    async with running(sockdir, profiles={"a b": profile_config("a b")}) as h, h.unix() as c:
        r = await c.get("/v1/token/a%20b")
    assert (r.status, r.json()["profile"]) == (200, "a b")


async def test_unknown_profile_is_404_naming_the_profiles(h: Harness) -> None:
    """An unknown profile is a 404 problem that lists the configured profiles."""
    async with h.unix() as c:
        r = await c.get("/v1/token/nope")
    assert r.status == 404
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "urn:colt-broker:problem:unknown-profile"
    assert body["profile"] == "nope"
    assert "default, other" in body["detail"]


async def test_no_default_profile_is_404_naming_the_profiles(sockdir: Path) -> None:
    """Without a default profile, GET /v1/token is a 404 problem that lists the profiles."""
    async with running(sockdir, default_profile=None) as h, h.unix() as c:
        r = await c.get("/v1/token")
    assert r.status == 404
    assert r.json()["type"] == "urn:colt-broker:problem:no-default-profile"
    assert "default, other" in r.json()["detail"]


@pytest.mark.parametrize(
    ("path", "accept"),
    [
        ("/v1/token?format=raw", None),
        ("/v1/token", "text/plain"),
        ("/v1/token/default", "text/plain"),
    ],
)
async def test_raw_format(h: Harness, path: str, accept: str | None) -> None:
    """?format=raw or Accept: text/plain gives the token alone, newline-terminated."""
    headers = [("Accept", accept)] if accept else []
    async with h.unix() as c:
        r = await c.get(path, headers=headers)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.body == b"token-default-1\n"


async def test_format_json_wins_over_accept(h: Harness) -> None:
    """?format=json gives JSON even to a client that prefers text/plain."""
    async with h.unix() as c:
        r = await c.get("/v1/token?format=json", headers=[("Accept", "text/plain")])
    assert r.json()["access_token"] == "token-default-1"


@pytest.mark.parametrize(
    "query", ["min_valid=-1", "min_valid=abc", "min_valid=nan", "min_valid=inf", "format=xml"]
)
async def test_bad_query_is_400(h: Harness, query: str) -> None:
    """A bad min_valid or format is a 400 problem that says what is accepted."""
    async with h.unix() as c:
        r = await c.get(f"/v1/token?{query}")
    assert r.status == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert ("min_valid must be" in r.json()["detail"]) or ("format must be" in r.json()["detail"])


async def test_head_token_has_headers_only(h: Harness) -> None:
    """HEAD /v1/token answers the GET's headers, Content-Length included, with no body."""
    async with h.unix() as c:
        full = await c.get("/v1/token")
        head = await c.request("HEAD", "/v1/token")
        after = await c.get("/v1/token")  # the connection is still in step
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == full.headers["content-length"]
    assert after.status == 200


async def test_token_wrong_method_is_405_with_allow(h: Harness) -> None:
    """POST /v1/token is 405 with Allow: GET, HEAD."""
    async with h.unix() as c:
        r = await c.request("POST", "/v1/token", body=b"{}")
    assert (r.status, r.headers["allow"]) == (405, "GET, HEAD")


async def test_unknown_path_is_404_problem(h: Harness) -> None:
    """An unknown path is a 404 problem listing the endpoints."""
    async with h.unix() as c:
        r = await c.get("/v2/nothing")
    assert r.status == 404
    assert "/v1/token" in r.json()["detail"]


# --- the cached bytes follow the token and the clock ----------------------------------------


async def test_cached_response_tracks_time_and_token(h: Harness) -> None:
    """expires_in counts down with the clock, and a new token is served at once."""
    async with h.unix() as c:
        first = (await c.get("/v1/token")).json()
        again = (await c.get("/v1/token")).json()
        h.clock.advance(5.2)
        later = (await c.get("/v1/token")).json()
        h.source.issue("default", "token-default-2", lifetime=600)
        renewed = (await c.get("/v1/token")).json()
    assert first == again and first["expires_in"] == 1800
    assert later["expires_in"] == 1794
    assert (renewed["access_token"], renewed["expires_in"]) == ("token-default-2", 600)


async def test_expired_token_is_never_served(h: Harness) -> None:
    """A token past its expiry is not served even if the source offers it."""
    h.source.min_valid = -10_000  # a source that would hand out anything
    h.clock.advance(1801)
    async with h.unix() as c:
        r = await c.get("/v1/token")
    assert r.status == 503


# --- waiting for the engine ------------------------------------------------------------------


async def test_min_valid_already_satisfied_does_not_wait(h: Harness) -> None:
    """A min_valid the current token meets is served without asking the engine."""
    async with h.unix() as c:
        r = await c.get("/v1/token?min_valid=600")
    assert r.status == 200 and h.source.get_calls == []


async def test_min_valid_waits_for_a_refresh_without_blocking_others(h: Harness) -> None:
    """A request needing a refresh waits for it, while other connections are served at once."""
    release = h.hold_refreshes()
    async with h.unix() as waiting, h.unix() as other:
        await waiting.send(waiting.build("GET", "/v1/token?min_valid=1800.5"))
        with anyio.fail_after(2, shield=False):
            quick = await other.get("/v1/token")
        assert quick.json()["access_token"] == "token-default-1"
        release.set()
        slow = await waiting.read_response()
    assert slow.json()["access_token"] == "token-default-2"
    assert h.source.get_calls == [("default", 1800.5, 2.0)]


async def test_cold_start_waits_for_the_first_token(sockdir: Path) -> None:
    """With no token yet, a request waits for the engine's first one."""
    async with running(sockdir, issue=False) as h, h.unix() as c:

        async def first(profile: str, min_valid: float | None, timeout: float) -> Token:
            return h.source.issue(profile, "token-first")

        h.source.on_get = first
        r = await c.get("/v1/token")
    assert r.json()["access_token"] == "token-first"


async def test_wait_failure_is_503_with_retry_after_and_upstream_detail(h: Harness) -> None:
    """When the engine gives up, the 503 problem carries Retry-After and Colt's detail."""
    detail = UpstreamDetail(
        status=429, reason="Too many requests", message="quota exceeded", tracking_id="trk-1"
    )

    async def throttled(profile: str, min_valid: float | None, timeout: float) -> Token:
        cause = Throttled("token endpoint throttled the account", detail)
        raise TokenUnavailable("throttled", profile=profile, retry_after=12.2, cause=cause)

    h.source.on_get = throttled
    async with h.unix() as c:
        r = await c.get("/v1/token?min_valid=1801")
    assert r.status == 503
    assert r.headers["retry-after"] == "13"
    body = r.json()
    assert body["type"] == "urn:colt-broker:problem:throttled"
    assert body["profile"] == "default"
    assert body["upstream"] == {
        "status": 429,
        "reason": "Too many requests",
        "message": "quota exceeded",
        "tracking_id": "trk-1",
    }


async def test_credentials_rejected_problem(h: Harness) -> None:
    """A credentials failure names Colt's code and tells the operator to fix the secret."""
    detail = UpstreamDetail(
        status=401, code="401-002", reason="Authentication error", tracking_id="t-9"
    )

    async def rejected(profile: str, min_valid: float | None, timeout: float) -> Token:
        cause = CredentialsRejected("credentials rejected", detail)
        raise TokenUnavailable("credentials rejected", profile=profile, cause=cause)

    h.source.on_get = rejected
    h.source.tokens["default"] = None
    async with h.unix() as c:
        r = await c.get("/v1/token")
    body = r.json()
    assert (r.status, body["type"]) == (503, "urn:colt-broker:problem:credentials-rejected")
    assert body["upstream"]["code"] == "401-002" and body["upstream"]["tracking_id"] == "t-9"
    assert "client_id" in body["detail"] and "retry-after" not in r.headers


async def test_silent_engine_is_cut_off(sockdir: Path) -> None:
    """An engine that never answers cannot hold a request past wait_timeout (503)."""
    async with running(sockdir, wait_timeout=0.2) as h, h.unix() as c:

        async def never(profile: str, min_valid: float | None, timeout: float) -> Token:
            await anyio.sleep_forever()
            raise AssertionError

        h.source.on_get = never
        r = await c.get("/v1/token?min_valid=1801")
        assert r.status == 503 and "0.2 seconds" in r.json()["detail"]
        assert (await c.get("/v1/token")).status == 200


@pytest.mark.parametrize(
    ("retry_after", "next_refresh_in", "header"),
    [(7.3, 100.0, "8"), (None, 41.5, "42"), (None, 0.0, "1"), (0.2, None, "1"), (None, None, None)],
)
async def test_silent_engine_503_says_when_to_ask_again(
    sockdir: Path, retry_after: float | None, next_refresh_in: float | None, header: str | None
) -> None:
    """When the service's own bound cuts a wait off, Retry-After comes from the profile's
    status (its wait for upstream, else its next refresh), rounded up, never 0."""
    async with running(sockdir, wait_timeout=0.1) as h, h.unix() as c:

        async def never(profile: str, min_valid: float | None, timeout: float) -> Token:
            await anyio.sleep_forever()
            raise AssertionError

        h.source.on_get = never
        if retry_after is not None:
            h.source.retry_after["default"] = retry_after
        if next_refresh_in is not None:
            h.source.next_refresh_in["default"] = next_refresh_in
        h.source.retry_after["other"] = 999.0  # another profile's status is not mixed in
        r = await c.get("/v1/token?min_valid=1801")
    assert (r.status, r.headers.get("retry-after")) == (503, header)


async def test_min_valid_beyond_the_lifetime_is_400(h: Harness) -> None:
    """A min_valid no token can ever meet (the engine's client_error) is the client's to
    change: 400 min-valid-too-large saying to ask for less, without Retry-After."""

    async def too_long(profile: str, min_valid: float | None, timeout: float) -> Token:
        raise TokenUnavailable(
            f"profile {profile!r}: tokens from the token endpoint live 1800 s, less than the "
            "99999 s asked for; ask for less (min_valid)",
            profile=profile,
            retry_after=5,
            client_error=True,
        )

    h.source.on_get = too_long
    async with h.unix() as c:
        r = await c.get("/v1/token?min_valid=99999")
    body = r.json()
    assert (r.status, body["type"]) == (400, "urn:colt-broker:problem:min-valid-too-large")
    assert "99999" in body["detail"] and "ask for less" in body["detail"]
    assert "will not help" in body["detail"]
    assert body["profile"] == "default" and "retry-after" not in r.headers


async def test_source_key_error_is_404(h: Harness) -> None:
    """A configured profile the engine does not know is a 404, not a crash."""
    h.source.tokens.pop("other")
    async with h.unix() as c:
        r = await c.get("/v1/token/other")
    assert r.status == 404


async def test_handler_bug_is_500_and_others_carry_on(h: Harness) -> None:
    """An unexpected exception answers 500 on that connection; new connections work."""
    h.source.fail_current = RuntimeError("boom")
    async with h.unix() as c:
        r = await c.get("/v1/token")
        assert r.status == 500 and r.json()["type"] == "urn:colt-broker:problem:internal-error"
        assert await c.read_to_eof() == b""
    h.source.fail_current = None
    async with h.unix() as c:
        assert (await c.get("/v1/token")).status == 200


async def test_update_replaces_profiles(h: Harness) -> None:
    """update() serves a new profile set: added profiles appear, removed ones are 404."""
    h.source.issue("third", "token-third-1")
    h.service.update({"third": profile_config("third")}, "third")
    async with h.unix() as c:
        assert (await c.get("/v1/token")).json()["access_token"] == "token-third-1"
        assert (await c.get("/v1/token/other")).status == 404


# --- status, health, readiness, metrics ------------------------------------------------------


async def test_status_lists_every_profile(h: Harness) -> None:
    """GET /v1/status lists every profile's status, and never a token."""
    async with h.unix() as c:
        r = await c.get("/v1/status")
    profiles = r.json()["profiles"]
    assert [p["profile"] for p in profiles] == ["default", "other"]
    assert profiles[0]["valid"] is True and profiles[0]["state"] == "fresh"
    assert b"token-default-1" not in r.body


async def test_healthz(h: Harness) -> None:
    """GET /healthz is 200 {"status": "ok"}; HEAD works too."""
    async with h.unix() as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.request("HEAD", "/healthz")).status == 200


async def test_readyz_follows_token_validity(h: Harness) -> None:
    """/readyz is 200 when every profile holds a valid token, else 503 with per-profile detail."""
    async with h.unix() as c:
        ready = await c.get("/readyz")
        h.source.tokens["other"] = None
        not_ready = await c.get("/readyz")
    assert ready.status == 200 and ready.json()["status"] == "ready"
    assert not_ready.status == 503
    assert not_ready.json()["profiles"]["other"] == {
        "valid": False,
        "state": "empty",
        "expires_in": None,
    }
    assert not_ready.json()["profiles"]["default"]["valid"] is True


async def test_status_endpoints_are_get_only(h: Harness) -> None:
    """POST to a status endpoint is 405 with Allow: GET, HEAD."""
    async with h.unix() as c:
        r = await c.request("POST", "/healthz", body=b"{}")
    assert (r.status, r.headers["allow"]) == (405, "GET, HEAD")


async def test_metrics_exposition(h: Harness) -> None:
    """GET /metrics is Prometheus text that counts requests and shows token state."""
    async with h.unix() as c:
        await c.get("/v1/token")
        await c.get("/v1/token/nope")
        r = await c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    requests = {
        (s.labels["profile"], s.labels["transport"], s.labels["status"]): s.value
        for s in families["colt_broker_http_requests"].samples
    }
    assert requests[("default", "unix", "200")] == 1
    assert requests[("_unknown", "unix", "404")] == 1
    valid = {s.labels["profile"]: s.value for s in families["colt_broker_token_valid"].samples}
    assert valid == {"default": 1.0, "other": 1.0}
    peers = families["colt_broker_peer_connections"].samples
    assert peers and peers[0].value >= 1
