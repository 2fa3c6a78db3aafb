"""The Colt emulator, spoken to over real loopback HTTP as the broker will speak to it."""

from __future__ import annotations

import base64
import select
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import httpx
import jwt
import pytest
from _clocks import FakeClock

from broker.emulator import (
    MISSING,
    TOKEN_PATH,
    Emulator,
    Fault,
    RecordedRequest,
    TokenRevoked,
    TokenShape,
)

pytestmark = pytest.mark.anyio

CLIENT, SECRET = "client-a", "made-up-secret-a"
OTHER, OTHER_SECRET = "client-b", "made-up-secret-b"
FORM = "application/x-www-form-urlencoded"
GOOD_BODY = b"grant_type=client_credentials"
NUMBERS = "/numberManagement/v1/numbers"

# Colt's published error table: (HTTP status, code, reason, message).
TABLE: dict[str, tuple[int, str, str, str]] = {
    "400-001": (
        400,
        "001",
        "Validation not met",
        "The request is missing authorization parameter.",
    ),
    "400-002": (400, "002", "Validation not met", "The request is missing grant_type."),
    "400-003": (400, "003", "Validation not met", "The request is missing content_type header"),
    "400-004": (400, "004", "Validation not met", "The request is missing APIGWTrackingId."),
    "400-005": (400, "005", "Validation not met", "Invalid input parameter"),
    "400-006": (
        400,
        "006",
        "Validation not met",
        "The authorization grant type is not supported by authorization server",
    ),
    "401-001": (401, "001", "Authentication error", "The authorization parameter is missing."),
    "401-002": (401, "002", "Authentication error", "The authorization parameter is not valid."),
    "415-001": (
        415,
        "001",
        "Validation not met",
        "The format of the posted body is not supported by the endpoint.",
    ),
}


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def good_headers(client_id: str = CLIENT, secret: str = SECRET) -> dict[str, str]:
    return {
        "Authorization": basic(client_id, secret),
        "Content-Type": FORM,
        "APIGWTrackingId": str(uuid.uuid4()),
    }


def make(clock: FakeClock | None = None, **kwargs: object) -> Emulator:
    clients = {CLIENT: SECRET, OTHER: OTHER_SECRET}
    return Emulator(clients, clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]  # kwargs are the constructor's own


@asynccontextmanager
async def serving(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator listening on loopback, and a client pointed at it."""
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.run)
        # Plain HTTP on loopback: verify=False spares loading CA certificates in every test.
        async with httpx.AsyncClient(base_url=emulator.base_url, timeout=5, verify=False) as client:
            yield client
        tg.cancel_scope.cancel()


async def post_token(
    client: httpx.AsyncClient,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    body: bytes = GOOD_BODY,
    url: str = TOKEN_PATH,
) -> httpx.Response:
    return await client.post(url, headers=headers or good_headers(), content=body)


def port_of(emulator: Emulator) -> int:
    return int(emulator.base_url.rsplit(":", 1)[1])


def raw_token_request() -> bytes:
    head = (
        f"POST {TOKEN_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {basic(CLIENT, SECRET)}\r\nContent-Type: {FORM}\r\n"
        f"APIGWTrackingId: raw-1\r\nContent-Length: {len(GOOD_BODY)}\r\n\r\n"
    )
    return head.encode() + GOOD_BODY


async def exchange(emulator: Emulator, data: bytes) -> tuple[bytes, str]:
    """Send raw bytes; everything received, and how the stream ended: "rst" or "fin"."""
    received = b""
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", port_of(emulator)) as stream:
            await stream.send(data)
            while True:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    return received, "fin"
                except anyio.BrokenResourceError:
                    return received, "rst"


# --- success ----------------------------------------------------------------------------


async def test_good_request_gets_a_verifiable_jwt_with_the_lifetime() -> None:
    """A well-formed request gets a Bearer JWT for that client, valid for the lifetime."""
    clock = FakeClock()
    emulator = make(clock)
    async with serving(emulator) as client:
        response = await post_token(client)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 1800
    assert isinstance(body["expires_in"], int)
    claims = emulator.verify(body["access_token"])
    assert claims["sub"] == CLIENT
    assert claims["iss"] == "colt-emulator"
    assert claims["iat"] == pytest.approx(clock.now)
    assert claims["exp"] - claims["iat"] == 1800


async def test_fractional_lifetime_is_exact_in_expires_in_and_exp() -> None:
    """A short fractional lifetime shows as a float expires_in and exp - iat."""
    emulator = make(token_lifetime=2.5)
    async with serving(emulator) as client:
        body = (await post_token(client)).json()
    claims = emulator.verify(body["access_token"])
    assert body["expires_in"] == 2.5
    assert claims["exp"] - claims["iat"] == pytest.approx(2.5)


async def test_request_is_recorded_without_authorization() -> None:
    """Each token request is recorded with client id, tracking id and status, no secret."""
    emulator = make()
    headers = good_headers()
    async with serving(emulator) as client:
        await post_token(client, headers)
        await post_token(client, good_headers(OTHER, "wrong"))
    first, second = emulator.requests
    assert (first.client_id, first.tracking_id, first.status) == (
        CLIENT,
        headers["APIGWTrackingId"],
        200,
    )
    assert first.params == ("grant_type",)
    assert first.method == "POST"
    assert "authorization" not in first.headers
    assert SECRET not in repr(first)
    assert (second.client_id, second.status) == (OTHER, 401)
    assert emulator.count() == 2
    assert emulator.count(client_id=CLIENT, status=200) == 1
    assert emulator.count(status=401) == 1


# --- validation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A good token request with one thing wrong."""

    expect: str
    drop: tuple[str, ...] = ()
    set: dict[str, str] = field(default_factory=dict)
    add: tuple[tuple[str, str], ...] = ()
    body: bytes = GOOD_BODY
    query: str = ""

    def headers(self) -> list[tuple[str, str]]:
        headers = {k: v for k, v in good_headers().items() if k not in self.drop} | self.set
        return [*headers.items(), *self.add]


BAD_REQUESTS = [
    pytest.param(Bad("400-001", drop=("Authorization",)), id="400-001-no-authorization"),
    pytest.param(Bad("400-003", drop=("Content-Type",)), id="400-003-no-content-type"),
    pytest.param(Bad("415-001", set={"Content-Type": "application/json"}), id="415-001-json"),
    pytest.param(Bad("400-002", body=b""), id="400-002-empty-body"),
    pytest.param(Bad("400-002", body=b"scope=read"), id="400-002-no-grant-type"),
    pytest.param(Bad("400-004", drop=("APIGWTrackingId",)), id="400-004-no-tracking-header"),
    pytest.param(Bad("400-005", body=GOOD_BODY + b"&scope=read"), id="400-005-scope"),
    pytest.param(
        Bad("400-005", body=GOOD_BODY + b"&client_id=a&client_secret=b"),
        id="400-005-credentials-in-body",
    ),
    pytest.param(Bad("400-005", body=GOOD_BODY + b"&" + GOOD_BODY), id="400-005-repeated"),
    pytest.param(Bad("400-005", query="?x=1"), id="400-005-query"),
    pytest.param(
        Bad("400-005", add=(("Authorization", basic(OTHER, OTHER_SECRET)),)),
        id="400-005-two-authorizations",
    ),
    pytest.param(Bad("400-006", body=b"grant_type=password"), id="400-006-grant-type"),
    pytest.param(Bad("401-002", set={"Authorization": "Bearer abc"}), id="401-002-not-basic"),
    pytest.param(Bad("401-001", set={"Authorization": "Basic"}), id="401-001-empty-basic"),
    pytest.param(Bad("401-001", set={"Authorization": "Basic Og=="}), id="401-001-empty-pair"),
    pytest.param(Bad("401-001", set={"Authorization": "Basic !!!"}), id="401-001-not-base64"),
    pytest.param(
        Bad("401-001", set={"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()}),
        id="401-001-no-colon",
    ),
    pytest.param(
        Bad("401-002", set={"Authorization": basic(CLIENT, "wrong")}), id="401-002-secret"
    ),
    pytest.param(Bad("401-002", set={"Authorization": basic("nobody", SECRET)}), id="401-002-id"),
]


@pytest.mark.parametrize("bad", BAD_REQUESTS)
async def test_each_error_row_answers_its_malformed_request(bad: Bad) -> None:
    """Each row of Colt's error table is produced by the request it describes."""
    emulator = make()
    async with serving(emulator) as client:
        response = await post_token(client, bad.headers(), bad.body, TOKEN_PATH + bad.query)
    status, code, reason, message = TABLE[bad.expect]
    body = response.json()
    assert (response.status_code, body["status"], body["code"]) == (status, status, code)
    assert (body["reason"], body["message"]) == (reason, message)
    assert isinstance(body["details"], str)
    assert body["details"]
    assert emulator.requests[-1].status == status


async def test_first_failing_check_in_table_order_answers() -> None:
    """A request wrong in several ways gets the earliest check's error (400-004 here)."""
    headers = {"Authorization": "Bearer x", "Content-Type": FORM}
    async with serving(make()) as client:
        response = await post_token(client, headers, b"grant_type=password&scope=x")
    assert (response.status_code, response.json()["code"]) == (400, "004")


async def test_missing_tracking_header_names_the_configured_header() -> None:
    """400-004 names the first configured tracking header; any configured one is accepted."""
    emulator = make(tracking_headers=("x-tracking-id", "APIGWTrackingId"))
    async with serving(emulator) as client:
        ok = await post_token(client)
        headers = good_headers()
        del headers["APIGWTrackingId"]
        missing = await post_token(client, headers)
    assert ok.status_code == 200
    assert missing.json()["message"] == "The request is missing x-tracking-id."


async def test_configured_extra_parameter_is_accepted() -> None:
    """accepted_params lets a parameter such as scope through instead of 400-005."""
    async with serving(make(accepted_params=("scope",))) as client:
        response = await post_token(client, body=GOOD_BODY + b"&scope=read")
    assert response.status_code == 200


async def test_rotated_secret_is_refused_from_then_on() -> None:
    """Changing a client's secret in `clients` makes the old one a 401-002."""
    emulator = make()
    async with serving(emulator) as client:
        before = await post_token(client)
        emulator.clients[CLIENT] = "rotated-made-up-secret"
        after = await post_token(client)
    assert before.status_code == 200
    assert (after.status_code, after.json()["code"]) == (401, "002")


async def test_token_path_refuses_other_methods() -> None:
    """GET on the token path is 405 with Allow: POST, and is still recorded."""
    emulator = make()
    async with serving(emulator) as client:
        response = await client.get(TOKEN_PATH)
    assert (response.status_code, response.headers["allow"]) == (405, "POST")
    assert emulator.count(status=405) == 1


# --- quota ------------------------------------------------------------------------------


async def test_quota_answers_429_with_retry_after_until_the_window_slides() -> None:
    """Beyond the quota per client and window: 429 with Retry-After; served again later."""
    clock = FakeClock()
    emulator = make(clock, quota=2, quota_window=60.0, retry_after=7.2)
    async with serving(emulator) as client:
        statuses = [(await post_token(client)).status_code for _ in range(3)]
        throttled = await post_token(client)
        other = await post_token(client, good_headers(OTHER, OTHER_SECRET))
        clock.advance(60.0)
        later = await post_token(client)
    assert statuses == [200, 200, 429]
    body = throttled.json()
    assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "8")
    assert (body["reason"], body["message"]) == ("Too many requests", "quota exceeded")
    assert (other.status_code, later.status_code) == (200, 200)


async def test_quota_without_retry_after_sends_no_header() -> None:
    """retry_after=None: the 429 carries no Retry-After header."""
    async with serving(make(quota=1, retry_after=None)) as client:
        await post_token(client)
        throttled = await post_token(client)
    assert throttled.status_code == 429
    assert "retry-after" not in throttled.headers


# --- faults -----------------------------------------------------------------------------


async def test_injected_status_uses_colt_body_then_is_consumed() -> None:
    """A status fault answers with Colt's body for it, `times` times, then tokens again."""
    emulator = make()
    emulator.inject(Fault(status=503, times=2), Fault(status=500, code="002"))
    async with serving(emulator) as client:
        answers = [await post_token(client) for _ in range(4)]
    assert [r.status_code for r in answers] == [503, 503, 500, 200]
    assert answers[0].json()["details"] == "Backend unavailable."
    assert answers[2].json()["message"] == "O Auth server failed."
    assert emulator.faults_pending == 0
    assert emulator.count(status=503) == 2


async def test_faults_apply_before_validation() -> None:
    """An injected fault answers even a request that validation would refuse."""
    emulator = make()
    emulator.inject(Fault(status=503))
    async with serving(emulator) as client:
        response = await post_token(client, {"X-Nothing": "1"})
    assert response.status_code == 503


async def test_raw_body_and_headers_reach_the_client() -> None:
    """A fault's raw body (HTML) and extra headers are sent as given."""
    html = b"<html><body>Bad gateway</body></html>"
    emulator = make()
    emulator.inject(Fault(status=502, body=html, headers={"Content-Type": "text/html"}))
    emulator.inject(Fault(status=429, headers={"Retry-After": "Wed, 21 Oct 2037 07:28:00 GMT"}))
    emulator.inject(Fault(status=200, body=b'{"access_token": "abc", "expi'))
    async with serving(emulator) as client:
        gateway, throttled, truncated = [await post_token(client) for _ in range(3)]
    assert (gateway.status_code, gateway.content) == (502, html)
    assert gateway.headers["content-type"] == "text/html"
    assert throttled.headers["retry-after"] == "Wed, 21 Oct 2037 07:28:00 GMT"
    assert (truncated.status_code, truncated.content) == (200, b'{"access_token": "abc", "expi')


async def test_delay_holds_the_answer_back() -> None:
    """A delayed answer arrives after the delay, and a shorter client timeout fires."""
    emulator = make()
    emulator.inject(Fault(delay=0.05), Fault(delay=30))
    async with serving(emulator) as client:
        started = anyio.current_time()
        slow = await post_token(client)
        elapsed = anyio.current_time() - started
        with pytest.raises(httpx.ReadTimeout):
            await client.post(TOKEN_PATH, headers=good_headers(), content=GOOD_BODY, timeout=0.05)
    assert slow.status_code == 200
    assert elapsed >= 0.05


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("reset", httpx.ReadError),
        ("reset_mid_body", httpx.ReadError),
        ("close", httpx.RemoteProtocolError),
    ],
)
async def test_connection_faults_surface_as_httpx_errors(
    action: str, error: type[httpx.TransportError]
) -> None:
    """reset/reset_mid_body/close break the response in a way httpx reports."""
    emulator = make()
    emulator.inject(Fault(action=action))  # type: ignore[arg-type]  # parametrised literal
    async with serving(emulator) as client:
        with pytest.raises(error):
            await post_token(client)
        assert (await post_token(client)).status_code == 200
    assert emulator.requests[0].status == (200 if action == "reset_mid_body" else None)


async def test_reset_is_an_rst_before_any_byte() -> None:
    """reset aborts the connection (RST, not FIN) without sending anything."""
    emulator = make()
    emulator.inject(Fault(action="reset"))
    async with serving(emulator):
        assert await exchange(emulator, raw_token_request()) == (b"", "rst")


async def test_close_is_a_fin_before_any_byte() -> None:
    """close ends the connection cleanly (FIN) without sending anything."""
    emulator = make()
    emulator.inject(Fault(action="close"))
    async with serving(emulator):
        assert await exchange(emulator, raw_token_request()) == (b"", "fin")


async def test_reset_mid_body_sends_headers_and_half_the_body_then_rst() -> None:
    """reset_mid_body: status line, Content-Length, exactly half the body, then RST."""
    emulator = make()
    emulator.inject(Fault(action="reset_mid_body"))
    async with serving(emulator):
        received, ending = await exchange(emulator, raw_token_request())
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(line for line in head.split(b"\r\n") if line.startswith(b"content-length"))[15:]
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    assert ending == "rst"
    assert len(body) == length // 2 > 0


async def test_token_shape_alters_the_success_body() -> None:
    """A token shape can drop or change expires_in, token_type, the token and its claims."""
    emulator = make()
    emulator.inject(
        Fault(token=TokenShape(expires_in=MISSING, token_type="bearer", extra={"scope": "x"})),
        Fault(token=TokenShape(expires_in="1800", exp_offset=-5.0)),
        Fault(token=TokenShape(omit_access_token=True)),
    )
    async with serving(emulator) as client:
        missing, stale, tokenless = [(await post_token(client)).json() for _ in range(3)]
    assert "expires_in" not in missing
    assert missing["token_type"] == "bearer"
    assert missing["scope"] == "x"
    assert stale["expires_in"] == "1800"
    with pytest.raises(jwt.ExpiredSignatureError):
        emulator.verify(stale["access_token"])
    assert "access_token" not in tokenless
    assert tokenless["expires_in"] == 1800


async def test_rule_decides_per_request_after_the_queue() -> None:
    """The rule is asked per request once the injected queue is empty."""
    emulator = make()

    def rule(request: RecordedRequest) -> Fault | None:
        return Fault(status=503) if request.tracking_id == "flaky" else None

    emulator.set_rule(rule)
    emulator.inject(Fault(status=500))
    async with serving(emulator) as client:
        queued = await post_token(client, {**good_headers(), "APIGWTrackingId": "flaky"})
        ruled = await post_token(client, {**good_headers(), "APIGWTrackingId": "flaky"})
        fine = await post_token(client)
        emulator.set_rule(None)
        unruled = await post_token(client, {**good_headers(), "APIGWTrackingId": "flaky"})
    assert [queued.status_code, ruled.status_code, fine.status_code] == [500, 503, 200]
    assert unruled.status_code == 200


async def test_a_failing_rule_answers_500_and_the_server_lives_on() -> None:
    """A rule that raises yields a 500 for that request only."""
    emulator = make()

    def rule(request: RecordedRequest) -> Fault | None:
        raise RuntimeError("test rule broke")

    emulator.set_rule(rule)
    async with serving(emulator) as client:
        broken = await post_token(client)
        emulator.set_rule(None)
        fine = await post_token(client)
    assert (broken.status_code, fine.status_code) == (500, 200)


# --- resource API -----------------------------------------------------------------------


async def test_resource_api_accepts_a_live_token_and_refuses_others() -> None:
    """The resource API serves a live token and 401s missing/foreign/revoked/expired ones."""
    clock = FakeClock()
    emulator, foreign = make(clock), make(clock)
    async with serving(emulator) as client:
        token = (await post_token(client)).json()["access_token"]
        revoked = (await post_token(client)).json()["access_token"]
        emulator.revoke(revoked)

        async def get(value: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {value}"} if value is not None else {}
            return await client.get(NUMBERS, headers=headers)

        good = await get(token)
        refused = [await get(t) for t in (None, foreign.issue(CLIENT), revoked, "junk")]
        clock.advance(1800.0)
        expired = await get(token)
    assert good.status_code == 200
    assert good.json()["numbers"]
    assert [r.status_code for r in [*refused, expired]] == [401] * 5
    assert [r.json()["code"] for r in refused] == ["001", "002", "002", "002"]
    assert "expired" in expired.json()["details"]
    assert emulator.resource_requests == 6


async def test_verify_raises_for_revoked_and_expired_tokens() -> None:
    """verify() refuses a revoked token and one past its exp on the emulator's clock."""
    clock = FakeClock()
    emulator = make(clock, token_lifetime=2.0)
    async with serving(emulator) as client:
        first, second = [(await post_token(client)).json()["access_token"] for _ in range(2)]
    emulator.revoke(first)
    with pytest.raises(TokenRevoked):
        emulator.verify(first)
    clock.advance(2.0)
    with pytest.raises(jwt.ExpiredSignatureError):
        emulator.verify(second)


# --- the HTTP server --------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection() -> None:
    """Several requests from one client share one connection; Connection: close ends it."""
    emulator = make()
    async with serving(emulator) as client:
        for _ in range(3):
            assert (await post_token(client)).status_code == 200
        closing = await post_token(client, {**good_headers(), "Connection": "close"})
        again = await post_token(client)
    assert (closing.status_code, again.status_code) == (200, 200)
    assert emulator.connections == 2


GARBAGE = [
    pytest.param(b"\x00\x01\x02 not http at all\r\n\r\n", id="binary"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", id="bad-length"),
    pytest.param(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", id="bad-header"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_garbage_gets_400_and_the_next_client_is_served(garbage: bytes) -> None:
    """A request that is not HTTP gets 400 and a close; the server keeps serving others."""
    emulator = make()
    async with serving(emulator) as client:
        received, ending = await exchange(emulator, garbage)
        assert (await post_token(client)).status_code == 200
    assert received.startswith(b"HTTP/1.1 400 ")
    assert ending == "fin"


async def test_client_vanishing_mid_request_does_not_hurt_the_server() -> None:
    """A client that disconnects mid-body or mid-delay leaves the server serving."""
    emulator = make()
    emulator.inject(Fault(delay=30))
    async with serving(emulator) as client:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", port_of(emulator)) as stream:
                await stream.send(raw_token_request()[:-5])
            async with await anyio.connect_tcp("127.0.0.1", port_of(emulator)) as stream:
                await stream.send(raw_token_request())
                await anyio.wait_all_tasks_blocked()
        assert (await post_token(client)).status_code == 200


def test_command_line_prints_its_token_url_and_serves() -> None:
    """`python -m broker.emulator` prints a token URL that answers with a token."""
    command = [sys.executable, "-m", "broker.emulator", "--port", "0", "--lifetime", "5"]
    command += ["--client-id", CLIENT, "--client-secret", SECRET]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 20)
            assert ready, "the emulator printed no URL within 20 s"
            url = process.stdout.readline().strip()
            response = httpx.post(url, headers=good_headers(), content=GOOD_BODY, timeout=5)
        finally:
            process.terminate()
    assert url.endswith(TOKEN_PATH)
    assert (response.status_code, response.json()["expires_in"]) == (200, 5)
