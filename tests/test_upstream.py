"""The Colt upstream client: request shape, response classification, transport failures."""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import socket
import ssl
import uuid
from collections.abc import Callable, Coroutine, Iterator
from email.utils import formatdate
from typing import Any

import anyio
import httpx
import jwt
import pytest
from anyio.abc import SocketStream
from hypothesis import given, settings
from hypothesis import strategies as st

from broker._profile import ProfileConfig, Secret
from broker._upstream import (
    FetchResult,
    build_token_request,
    classify_response,
    fetch_token,
    new_tracking_id,
    parse_retry_after,
)
from broker.exceptions import (
    CredentialsRejected,
    RequestRejected,
    Throttled,
    UpstreamError,
    UpstreamUnavailable,
)

SECRET = "made-up-secret"
URL = "https://auth.example.test/token"
PROFILE = ProfileConfig(
    name="default", client_id="cid", secret=Secret(SECRET, "test"), token_url=URL
)
TID = "3b4b7c43-9a52-4c6e-8f0e-5f1f3c0d2a11"
NOW_WALL = 1_700_000_000.0
NOW_MONO = 5_000.0
JWT_KEY = "made-up-hmac-key-of-at-least-32-bytes"  # pyjwt warns about shorter HMAC keys

Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]
)


def make_jwt(**claims: Any) -> str:
    return jwt.encode(claims, JWT_KEY, algorithm="HS256")


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def profile(**changes: Any) -> ProfileConfig:
    return dataclasses.replace(PROFILE, **changes)


def classify(status: int, content: bytes, headers: dict[str, str] | None = None) -> FetchResult:
    return classify_response(
        status,
        httpx.Headers(headers or {}),
        content,
        tracking_id=TID,
        received_mono=NOW_MONO,
        received_wall=NOW_WALL,
        secret=SECRET,
        tracking_header="APIGWTrackingId",
    )


def classify_error(status: int, content: bytes, headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(UpstreamError) as info:
        classify(status, content, headers)
    return info.value


def ok_body(lifetime: float = 1800, **extra: Any) -> bytes:
    token = make_jwt(iat=int(NOW_WALL), exp=int(NOW_WALL + lifetime))
    return body(access_token=token, token_type="Bearer", expires_in=lifetime, **extra)


class ScriptedClock:
    """Monotonic readings from a script; the wall clock reads NOW_WALL."""

    def __init__(self, *readings: float) -> None:
        self._readings: Iterator[float] = iter(readings)

    def monotonic(self) -> float:
        return next(self._readings)

    def wall(self) -> float:
        return NOW_WALL


async def fetch(handler: Handler, prof: ProfileConfig = PROFILE, **kw: Any) -> FetchResult:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with anyio.fail_after(5):
            return await fetch_token(client, prof, **kw)


# --- the request --------------------------------------------------------------------------


def test_request_is_a_form_post_with_only_the_grant_type() -> None:
    """The request POSTs grant_type=client_credentials as a form, asking for JSON."""
    request = build_token_request(PROFILE, TID)
    assert (request.method, str(request.url)) == ("POST", URL)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    assert request.content == b"grant_type=client_credentials"


def test_credentials_travel_only_as_http_basic() -> None:
    """The Authorization header decodes to client_id:secret; the body holds no credential."""
    request = build_token_request(PROFILE, TID)
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"cid:{SECRET}"
    assert SECRET.encode() not in request.content
    assert b"cid" not in request.content


def test_basic_credentials_are_sent_raw_not_form_encoded() -> None:
    """Reserved characters in a secret reach the server as written (curl -u compatible)."""
    request = build_token_request(profile(secret=Secret("a+b/c=d %e:f", "test")), TID)
    encoded = request.headers["authorization"].removeprefix("Basic ")
    assert base64.b64decode(encoded).decode() == "cid:a+b/c=d %e:f"


def test_tracking_header_name_is_configurable() -> None:
    """The tracking id goes in the header the profile names, and only there."""
    default = build_token_request(PROFILE, TID)
    renamed = build_token_request(profile(tracking_header="x-tracking-id"), TID)
    assert default.headers["APIGWTrackingId"] == TID
    assert renamed.headers["x-tracking-id"] == TID
    assert "APIGWTrackingId" not in renamed.headers


def test_empty_tracking_header_sends_none() -> None:
    """tracking_header = "" turns the Colt header off for a plain RFC 6749 endpoint."""
    request = build_token_request(profile(tracking_header=""), TID)
    assert TID not in request.headers.values()


def test_scope_is_sent_only_when_set() -> None:
    """scope joins the form only when the profile sets one (Colt refuses extra parameters)."""
    with_scope = build_token_request(profile(scope="numbers billing"), TID)
    assert with_scope.content == b"grant_type=client_credentials&scope=numbers+billing"
    assert build_token_request(profile(scope=""), TID).content == b"grant_type=client_credentials"


def test_request_carries_the_upstream_timeout_for_httpx() -> None:
    """httpx's own timeouts are the profile's upstream_timeout, a backstop to fail_after."""
    request = build_token_request(profile(upstream_timeout=3.5), TID)
    assert request.extensions["timeout"] == httpx.Timeout(3.5).as_dict()


def test_new_tracking_ids_are_fresh_uuid4s() -> None:
    """Each tracking id is a new UUID4."""
    first, second = new_tracking_id(), new_tracking_id()
    assert first != second
    assert uuid.UUID(first).version == 4


@pytest.mark.anyio
async def test_each_fetch_sends_a_fresh_tracking_id() -> None:
    """Every fetch sends a new UUID in the tracking header and reports it in the result."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["APIGWTrackingId"])
        return httpx.Response(200, content=ok_body())

    results = [await fetch(handler), await fetch(handler)]
    assert [r.tracking_id for r in results] == seen
    assert len(set(seen)) == 2
    assert all(uuid.UUID(t).version == 4 for t in seen)


@pytest.mark.anyio
async def test_client_auth_and_redirect_settings_are_overridden() -> None:
    """A client's own auth never replaces our Basic header, and a redirect is not followed."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(307, headers={"Location": "https://evil.test/steal?x=1"})

    transport = httpx.MockTransport(handler)
    async with httpx.AsyncClient(transport=transport, auth=("x", "y"), follow_redirects=True) as c:
        with pytest.raises(RequestRejected, match=r"redirect to https://evil\.test/steal:"):
            await fetch_token(c, PROFILE)
    assert len(calls) == 1
    assert (
        calls[0].headers["authorization"]
        == build_token_request(PROFILE, TID).headers["authorization"]
    )


# --- success ------------------------------------------------------------------------------


def test_success_gives_a_token_with_a_monotonic_deadline() -> None:
    """A 200 body yields the token, its deadline counted from the response's arrival."""
    result = classify(200, ok_body(1800))
    token = result.token
    assert (token.obtained_at, token.expires_at) == (NOW_MONO, NOW_MONO + 1800)
    assert token.wall_expires_at == NOW_WALL + 1800
    assert token.token_type == "Bearer"
    assert (result.tracking_id, result.lifetime_source, result.clock_skew) == (TID, "expires_in", 0)


@pytest.mark.anyio
async def test_fetch_times_the_exchange_with_the_injected_clock() -> None:
    """fetch_token reads the injected clock: arrival sets the deadline, duration spans all."""
    clock = ScriptedClock(100.0, 100.25, 100.5)
    result = await fetch(lambda _: httpx.Response(200, content=ok_body()), clock=clock)
    assert result.token.obtained_at == 100.25
    assert result.token.expires_at == 100.25 + 1800
    assert result.duration == 0.5


@pytest.mark.parametrize(
    ("given_type", "kept"),
    [("bearer", "bearer"), ("BEARER", "BEARER"), ("BearerToken", "BearerToken"), (None, "Bearer")],
)
def test_token_type_is_kept_as_given_or_defaults_to_bearer(given_type: Any, kept: str) -> None:
    """token_type keeps its case; a missing or non-string one becomes "Bearer"."""
    fields: dict[str, Any] = {"access_token": "opaque", "expires_in": 60}
    if given_type is not None:
        fields["token_type"] = given_type
    assert classify(200, body(**fields)).token.token_type == kept
    assert classify(200, body(**fields | {"token_type": 5})).token.token_type == "Bearer"


def test_extra_fields_in_the_body_are_ignored() -> None:
    """RFC 6749 §5.1 bodies with extra fields are accepted."""
    result = classify(200, ok_body(scope="all", issued_at="now", refresh_token_expires_in=0))
    assert result.token.lifetime == 1800


@pytest.mark.parametrize(
    ("expires_in", "lifetime", "source"),
    [
        (1800, 1800, "expires_in"),
        (1799.5, 1799.5, "expires_in"),
        ("1800", 1800, "expires_in"),
        (" 900 ", 900, "expires_in"),
        (10**9, 86400, "expires_in+capped"),
    ],
)
def test_expires_in_decides_an_opaque_tokens_lifetime(
    expires_in: Any, lifetime: float, source: str
) -> None:
    """expires_in (number or numeric string) is the lifetime, capped at 24 h."""
    result = classify(200, body(access_token="opaque-token", expires_in=expires_in))
    assert (result.token.lifetime, result.lifetime_source, result.clock_skew) == (
        lifetime,
        source,
        None,
    )


@pytest.mark.parametrize("expires_in", ["missing", 0, -5, "abc", "nan", True, None, [1800]])
def test_opaque_token_without_a_valid_expires_in_is_refused(expires_in: Any) -> None:
    """Without JWT claims, a missing, zero, negative or non-numeric expires_in is unusable."""
    fields: dict[str, Any] = {"access_token": "opaque-token"}
    if expires_in != "missing":
        fields["expires_in"] = expires_in
    error = classify_error(200, body(**fields))
    assert isinstance(error, UpstreamUnavailable)
    assert "usable lifetime" in error.summary


@pytest.mark.parametrize(
    ("claims", "expires_in", "lifetime", "source", "skew"),
    [
        # The JWT says less than expires_in: the shorter figure wins.
        ({"iat": 0, "exp": 600}, 1800, 600, "jwt", 0),
        # Our clock is an hour ahead: exp looks past, yet the token has its full life.
        ({"iat": -3600, "exp": -1800}, 1800, 1800, "expires_in", -3600),
        # Issuer's clock two minutes ahead of ours: reported, not applied.
        ({"iat": 120, "exp": 1920}, 1800, 1800, "expires_in", 120),
        ({"iat": 0, "exp": 1200}, None, 1200, "jwt", 0),
        ({"iat": 0, "exp": 10 * 86400}, None, 86400, "jwt+capped", 0),
        ({"exp": 900}, None, 900, "jwt_exp", None),
        ({"exp": 1900}, 1800, 1800, "expires_in", 100),
    ],
)
def test_jwt_claims_cross_check_the_lifetime(
    claims: dict[str, int], expires_in: int | None, lifetime: float, source: str, skew: float | None
) -> None:
    """exp/iat are read unverified; relative figures win and skew is reported."""
    token = make_jwt(**{k: int(NOW_WALL) + v for k, v in claims.items()})
    fields: dict[str, Any] = {"access_token": token}
    if expires_in is not None:
        fields["expires_in"] = expires_in
    result = classify(200, body(**fields))
    assert (result.token.lifetime, result.lifetime_source, result.clock_skew) == (
        lifetime,
        source,
        skew,
    )


@pytest.mark.parametrize(
    ("claims", "expires_in"),
    [({"iat": 0, "exp": -1}, 1800), ({"exp": -60}, None), ({"iat": 0}, None)],
)
def test_jwt_that_is_dead_on_arrival_is_refused(claims: dict[str, int], expires_in: Any) -> None:
    """exp before iat, or exp past with nothing else to go on, leaves no usable lifetime."""
    token = make_jwt(**{k: int(NOW_WALL) + v for k, v in claims.items()})
    fields: dict[str, Any] = {"access_token": token}
    if expires_in is not None:
        fields["expires_in"] = expires_in
    assert "usable lifetime" in classify_error(200, body(**fields)).summary


@pytest.mark.parametrize(
    "content", [b"<html>OK</html>", b"[1, 2]", b'{"access_token": "eyJabc.def', b"", b"\xff\xfe"]
)
def test_200_whose_body_is_not_a_json_object_is_unavailable(content: bytes) -> None:
    """A 200 with HTML, a list, truncated JSON or nothing is a transient upstream failure."""
    error = classify_error(200, content)
    assert isinstance(error, UpstreamUnavailable)
    assert error.detail.status == 200
    assert error.summary == "200 with a body that is not a JSON object"


def test_200_with_a_bare_text_body_is_described_not_quoted() -> None:
    """A 200 whose body is bare text (perhaps the token itself) is described, never quoted."""
    error = classify_error(200, b"opaque-bare-token-123", {"Content-Type": "text/plain"})
    assert error.detail.excerpt == "21 bytes, text/plain"


@pytest.mark.parametrize(
    "fields", [{}, {"access_token": ""}, {"access_token": 123}, {"accessToken": "opaque-xyz"}]
)
def test_200_without_access_token_is_unavailable(fields: dict[str, Any]) -> None:
    """A 200 without a usable access_token names the fields it had, never their values."""
    error = classify_error(200, body(expires_in=1800, **fields))
    assert isinstance(error, UpstreamUnavailable)
    assert error.summary == "200 without access_token"
    assert "expires_in" in (error.detail.excerpt or "")
    assert "opaque-xyz" not in str(error.detail)


def test_access_token_that_could_inject_a_header_is_refused() -> None:
    """A token with CR/LF or spaces never reaches a consumer's Authorization header."""
    error = classify_error(200, body(access_token="abc\r\nX-Evil: 1", expires_in=60))
    assert isinstance(error, UpstreamUnavailable)
    assert "header" in error.summary


# --- Colt's error table -------------------------------------------------------------------

COLT_TABLE = [
    (400, "001", "Validation not met", "The request is missing authorization parameter.",
     RequestRejected),
    (400, "002", "Validation not met", "The request is missing grant_type.", RequestRejected),
    (400, "003", "Validation not met", "The request is missing content_type header",
     RequestRejected),
    (400, "004", "Validation not met", "The request is missing APIGWTrackingId.", RequestRejected),
    (400, "005", "Validation not met", "Invalid input parameter", RequestRejected),
    (400, "006", "Validation not met",
     "The authorization grant type is not supported by authorization server", RequestRejected),
    (401, "001", "Authentication error", "The authorization parameter is missing.",
     CredentialsRejected),
    (401, "002", "Authentication error", "The authorization parameter is not valid.",
     CredentialsRejected),
    (415, "001", "Validation not met",
     "The format of the posted body is not supported by the endpoint.", RequestRejected),
    (429, None, "Too many requests", "quota exceeded", Throttled),
    (500, "001", "Internal error", "An unknown internal error occurred", UpstreamUnavailable),
    (500, "002", "internal error", "O Auth server failed.", UpstreamUnavailable),
    (503, "001", "service unavailable", "The service is temporarily unavailable",
     UpstreamUnavailable),
]  # fmt: skip


@pytest.mark.parametrize(("status", "code", "reason", "message", "expected"), COLT_TABLE)
def test_every_row_of_colts_error_table_maps_to_a_typed_error(
    status: int, code: str | None, reason: str, message: str, expected: type[UpstreamError]
) -> None:
    """Each documented status/code becomes its error class with Colt's fields kept."""
    fields = {"code": code, "reason": reason, "message": message, "details": message}
    error = classify_error(status, body(**{k: v for k, v in fields.items() if v is not None}))
    assert type(error) is expected
    detail = error.detail
    assert (detail.status, detail.code, detail.reason, detail.message) == (
        status,
        code,
        reason,
        message,
    )
    assert detail.tracking_id == TID
    assert TID in str(error)


@pytest.mark.parametrize(
    "content",
    [
        body(code="004", message="The request is missing APIGWTrackingId."),
        body(code=4),
        body(code="400-004"),
        body(Code="004", Status=400),
        body(error={"code": "004", "reason": "Validation not met"}),
        body(errors=[{"code": "400-004"}]),
        body(fault={"code": "4"}),
    ],
)
def test_code_forms_and_wrappers_all_read_as_colts_code(content: bytes) -> None:
    """Flat, wrapped, numeric and status-prefixed codes normalise to "004"."""
    error = classify_error(400, content)
    assert isinstance(error, RequestRejected)
    assert error.detail.code == "004"
    assert "'APIGWTrackingId'" in error.summary
    assert "x-tracking-id" in error.summary


def test_code_prefixed_with_another_status_is_kept_as_given() -> None:
    """A code whose prefix contradicts the HTTP status is not silently rewritten."""
    assert classify_error(400, body(code="401-002")).detail.code == "401-002"


@pytest.mark.parametrize(
    ("status", "error_code", "expected"),
    [
        (400, "invalid_client", CredentialsRejected),
        (401, "invalid_client", CredentialsRejected),
        (400, "unauthorized_client", CredentialsRejected),
        (400, "unsupported_grant_type", RequestRejected),
        (400, "invalid_scope", RequestRejected),
    ],
)
def test_rfc_6749_error_bodies_are_understood(
    status: int, error_code: str, expected: type[UpstreamError]
) -> None:
    """RFC 6749 §5.2 error/error_description map like Colt's table."""
    error = classify_error(status, body(error=error_code, error_description="nope"))
    assert type(error) is expected
    assert (error.detail.code, error.detail.message) == (error_code, "nope")


def test_apigee_fault_bodies_are_understood() -> None:
    """Apigee's {"fault": {"faultstring", "detail": {"errorcode"}}} yields code and message."""
    fault = {"faultstring": "Invalid client", "detail": {"errorcode": "oauth.v2.InvalidClient"}}
    error = classify_error(401, body(fault=fault))
    assert isinstance(error, CredentialsRejected)
    assert (error.detail.code, error.detail.message) == ("oauth.v2.InvalidClient", "Invalid client")


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"retry-after": formatdate(NOW_WALL + 90, usegmt=True)}, 90.0),
        ({}, None),
    ],
)
def test_429_is_throttled_with_retry_after(headers: dict[str, str], retry_after: Any) -> None:
    """429 becomes Throttled, carrying Retry-After in seconds (from seconds or a date)."""
    error = classify_error(429, body(reason="Too many requests"), headers)
    assert isinstance(error, Throttled)
    assert error.detail.retry_after == retry_after


def test_retry_after_on_a_503_is_kept() -> None:
    """A 503's Retry-After is kept too, for the engine's backoff."""
    assert classify_error(503, b"", {"Retry-After": "7"}).detail.retry_after == 7.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        (formatdate(NOW_WALL + 30, usegmt=True), 30.0),
        (formatdate(NOW_WALL - 30, usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("9" * 400, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    """Retry-After: seconds or HTTP-date, never negative, garbage ignored."""
    parsed = parse_retry_after(value, NOW_WALL)
    if value == "Wed, 21 Oct 2015 07:28:00":  # zone-less date: read as GMT, long past
        assert parsed == 0.0
    else:
        assert parsed == seconds


@pytest.mark.parametrize(
    ("status", "expected_summary"),
    [
        (301, "unexpected redirect from the token endpoint"),
        (404, "check token_url"),
        (405, "does not take POST"),
    ],
)
def test_a_wrong_token_url_is_a_configuration_error(status: int, expected_summary: str) -> None:
    """Redirects, 404 and 405 say token_url is wrong: retried in minutes, not seconds."""
    error = classify_error(status, b"")
    assert type(error) is RequestRejected
    assert expected_summary in error.summary


@pytest.mark.parametrize(
    ("status", "expected_summary"),
    [
        (408, "gave up waiting"),
        (418, "unexpected HTTP 418"),
        (502, "gateway"),
        (504, "gateway timed out"),
        (599, "failed"),
        (201, "unexpected HTTP 201"),
    ],
)
def test_other_statuses_are_unavailable(status: int, expected_summary: str) -> None:
    """408, 5xx and any other unexpected status are transient failures."""
    error = classify_error(status, b"")
    assert type(error) is UpstreamUnavailable
    assert expected_summary in error.summary


def test_html_gateway_page_keeps_a_short_readable_excerpt() -> None:
    """A gateway's HTML page is kept as a short excerpt of its text, without markup."""
    page = (
        b"<html><head><title>502 Bad Gateway</title><style>h1{color:red}</style></head>"
        b"<body><h1>502 Bad Gateway</h1>" + b"<p>filler</p>" * 100 + b"</body></html>"
    )
    error = classify_error(502, page)
    excerpt = error.detail.excerpt
    assert excerpt is not None
    assert excerpt.startswith("502 Bad Gateway 502 Bad Gateway filler")
    assert len(excerpt) <= 200
    assert "<" not in excerpt
    assert "color" not in excerpt
    assert (error.detail.code, error.detail.message) == (None, None)


@pytest.mark.parametrize("content", [b"", b'{"code": "001", "mess', b"{}", b"[]"])
def test_empty_or_truncated_error_bodies_fall_back_to_the_status(content: bytes) -> None:
    """An error body with nothing readable still yields a typed error from the status."""
    error = classify_error(500, content)
    assert type(error) is UpstreamUnavailable
    assert error.detail.status == 500
    assert error.detail.code is None


def test_excerpts_are_sanitised() -> None:
    """Excerpts drop controls, collapse whitespace, redact JWTs, secrets and Basic credentials."""
    token = make_jwt(iat=1, exp=2)
    basic = base64.b64encode(f"cid:{SECRET}".encode()).decode()
    page = (
        f"oops\x1b[31m\n\n\t {token} secret={SECRET} Authorization: Basic {basic} "
        f"raw {SECRET} access_token=opaque123 " + "x" * 500
    ).encode()
    excerpt = classify_error(500, page).detail.excerpt
    assert excerpt is not None
    assert len(excerpt) <= 200
    assert excerpt.startswith(
        "oops[31m [redacted] secret=[redacted] Authorization: Basic [redacted]"
    )
    for leaked in (SECRET, token, token.split(".")[1], basic, "opaque123", "\x1b", "  "):
        assert leaked not in excerpt


def test_prose_about_basic_authentication_is_not_redacted() -> None:
    """Redaction leaves Colt's wording such as "other than Basic authentication" readable."""
    error = classify_error(401, body(code="002", message="Use Basic authentication only"))
    assert error.detail.message == "Use Basic authentication only"


# --- secrets never leak -------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 401, 429, 500, 502])
def test_errors_never_show_the_secret_or_a_whole_token(status: int) -> None:
    """Whatever the endpoint echoes, no error text holds the secret or a whole token."""
    token = make_jwt(iat=1, exp=2)
    basic = base64.b64encode(f"cid:{SECRET}".encode()).decode()
    echo = {"code": SECRET, "reason": token, "message": f"Basic {basic} {SECRET}"}
    for content in (body(**echo), body(error=echo), f"<p>{token} {SECRET}</p>".encode()):
        error = classify_error(status, content)
        for text in (str(error), repr(error), json.dumps(error.detail.as_dict())):
            assert SECRET not in text
            assert token not in text
            assert basic not in text


def test_fetch_result_repr_hides_the_token() -> None:
    """A FetchResult's repr shows a fingerprint, never the token."""
    result = classify(200, ok_body())
    assert result.token.access_token not in repr(result)
    assert result.token.fingerprint in repr(result)


@settings(max_examples=150, deadline=None)
@given(
    status=st.integers(100, 599),
    content=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda a, b: a + SECRET.encode() + b, st.binary(max_size=40), st.binary(max_size=40)
        ),
        st.dictionaries(
            st.sampled_from(["code", "reason", "message", "error", "access_token", "expires_in"]),
            st.one_of(st.none(), st.integers(), st.text(max_size=30), st.just(SECRET)),
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_any_response_classifies_without_crashing_or_leaking(status: int, content: bytes) -> None:
    """Any status and body gives a FetchResult or an UpstreamError whose text is secret-free."""
    error: UpstreamError | None = None
    try:
        classify(status, content, {"Retry-After": "junk", "Location": SECRET})
    except UpstreamError as exc:
        error = exc
    if error is not None:
        assert SECRET not in str(error)
        assert SECRET not in json.dumps(error.detail.as_dict())


# --- transport failures -------------------------------------------------------------------


def chained(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


TLS_FAILURE = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
TRANSPORT_FAILURES = [
    (httpx.ConnectError("[Errno 111] Connection refused"), f"connection refused by {URL}"),
    (
        chained(httpx.ConnectError("All connection attempts failed"), ConnectionRefusedError()),
        f"connection refused by {URL}",
    ),
    (httpx.ConnectError("[Errno -2] Name or service not known"), f"cannot connect to {URL}"),
    (
        chained(httpx.ConnectError("lookup failed"), socket.gaierror(-2, "Name not known")),
        f"cannot resolve the host of {URL}",
    ),
    (httpx.ConnectTimeout("timed out"), f"connecting to {URL} timed out"),
    (httpx.ReadTimeout("timed out"), f"{URL} timed out (ReadTimeout)"),
    (httpx.ReadError("[Errno 104] Connection reset by peer"), "connection reset or lost with"),
    (httpx.WriteError("Broken pipe"), "connection reset or lost with"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), f"connection reset by {URL}"),
    (httpx.RemoteProtocolError("peer closed connection"), f"{URL} broke off the HTTP exchange"),
    (chained(httpx.ConnectError("handshake"), TLS_FAILURE), f"TLS error with {URL}: [SSL: CERT"),
    (ssl.SSLError(1, "[SSL] record layer failure"), f"TLS error with {URL}"),
    (httpx.ProxyError("proxy said no"), f"transport error with {URL}: ProxyError"),
    (httpx.DecodingError("bad gzip"), f"transport error with {URL}: DecodingError"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "OSError: [Errno 101] Network is"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("failure", "summary"), TRANSPORT_FAILURES)
async def test_transport_failures_are_unavailable(failure: Exception, summary: str) -> None:
    """Refusals, resets, timeouts, TLS and protocol errors become UpstreamUnavailable."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    with pytest.raises(UpstreamUnavailable) as info:
        await fetch(handler, tracking_id=TID)
    assert summary in info.value.summary
    assert info.value.detail.tracking_id == TID
    assert info.value.retryable


@pytest.mark.anyio
async def test_an_unusable_token_url_is_a_typed_error() -> None:
    """A token_url httpx cannot parse raises RequestRejected, not a raw httpx error."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    with pytest.raises(RequestRejected, match="token_url is not a usable URL"):
        await fetch(handler, profile(token_url="http://[::1/token"))


@pytest.mark.anyio
async def test_a_silent_endpoint_times_out_after_upstream_timeout() -> None:
    """An endpoint that never answers fails after upstream_timeout seconds, not later."""

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with pytest.raises(UpstreamUnavailable, match=r"timed out after 0\.05s"):
        await fetch(handler, profile(upstream_timeout=0.05))


@pytest.mark.anyio
async def test_outside_cancellation_propagates() -> None:
    """Cancelling the caller cancels the fetch; it is not turned into an UpstreamError."""
    entered = anyio.Event()
    outcome: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def run() -> None:
        try:
            await fetch(handler)
        except UpstreamError:
            outcome.append("converted")
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await entered.wait()
            tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]


@pytest.mark.anyio
async def test_oversized_bodies_are_cut_but_still_classified() -> None:
    """A huge error page keeps its status and a short excerpt; a huge 200 is unusable."""
    page = b"<p>" + b"x" * 2_000_000 + b"</p>"
    with pytest.raises(UpstreamUnavailable) as info:
        await fetch(lambda _: httpx.Response(502, content=page))
    assert info.value.detail.status == 502
    assert len(info.value.detail.excerpt or "") <= 200
    with pytest.raises(UpstreamUnavailable, match="not a JSON object"):
        await fetch(lambda _: httpx.Response(200, content=b'{"a": "' + page + b'"}'))


@pytest.mark.anyio
async def test_refused_loopback_connection_is_unavailable() -> None:
    """A real refused connection names the endpoint it tried."""
    with socket.socket() as bound:  # bound but not listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/token"
        async with httpx.AsyncClient(trust_env=False) as client:
            with anyio.fail_after(5), pytest.raises(UpstreamUnavailable) as info:
                await fetch_token(client, profile(token_url=url))
    assert info.value.summary == f"connection refused by {url}"


TRUNCATED = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a'


@pytest.mark.anyio
@pytest.mark.parametrize("reply", [TRUNCATED, b""], ids=["truncated-body", "closed-silently"])
async def test_loopback_server_breaking_off_is_unavailable(reply: bytes) -> None:
    """A real server that closes mid-response or without one gives UpstreamUnavailable."""

    async def serve(stream: SocketStream) -> None:
        async with stream:
            received = b""
            while b"grant_type=client_credentials" not in received:
                received += await stream.receive()
            if reply:
                await stream.send(reply)

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            async with httpx.AsyncClient(trust_env=False) as client:
                with anyio.fail_after(5), pytest.raises(UpstreamUnavailable) as info:
                    await fetch_token(client, profile(token_url=f"http://127.0.0.1:{port}/t"))
            tg.cancel_scope.cancel()
    assert "broke off the HTTP exchange" in info.value.summary
