"""The fault matrix's harness: one engine against one emulator, with one fault switched on.

A :class:`Scenario` is an emulator on loopback and an engine over it whose HTTP client records
when each token request leaves the broker (``attempts``), so that even a refused connection,
which the emulator never sees, is counted. ``CASES`` at the bottom is the table of faults, each
with what the broker must make of it; ``test_faults.py`` runs it one fault at a time (what
consumers and status see) and ``test_faults_windows.py`` all faults at once over a window of
real time (what upstream sees over time).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus

from broker._engine import Engine
from broker._profile import ProfileConfig, Secret
from broker._status import ProfileStatus
from broker._token import Token
from broker.emulator import MISSING, Emulator, Fault, TokenShape

PROFILE = "default"
CLIENT_ID = "cid-faults"
SECRET = "made-up-secret-for-fault-tests"  # made up, for tests
BASIC_CREDENTIALS = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
OPAQUE = "opaque-made-up-token-5f2c9d0e7a1b"  # a made-up non-JWT token
U = 0.0  # the jitter source's one draw: backoff at its shortest, the worst case for rate
MIN_VALID = 0.5
TIMEOUT = 0.3  # upstream_timeout
HANG = 1.0  # how long a hanging upstream keeps the request: well past TIMEOUT
LIFETIME = 20.0  # tokens outlive a one-fault test; the window tests use shorter ones
COLD, HELD = "cold", "held"
ASYNCIO: tuple[str, dict[str, Any]] = ("asyncio", {})
UVLOOP: tuple[str, dict[str, Any]] = ("asyncio", {"use_uvloop": True})

# Plain loopback HTTP needs no TLS, but httpx builds a context (loading the CA bundle, ~20 ms of
# CPU) per client unless handed one: sixty clients at once would spend a second on that.
TLS = ssl.create_default_context()

# Any emulator token (a JWT's header and payload), whole or in part.
JWT_PREFIX = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def profile(token_url: str, **overrides: Any) -> ProfileConfig:
    """A profile for the emulator, scaled for short times; account caps as the product's."""
    base = ProfileConfig(
        name=PROFILE,
        client_id=CLIENT_ID,
        secret=Secret(SECRET, "test"),
        token_url=token_url,
        account="acct",
        min_valid=MIN_VALID,
        refresh_ahead=0.3,
        refresh_jitter=0.05,
        upstream_timeout=TIMEOUT,
    )
    return replace(base, **overrides)


@dataclass
class Scenario:
    """One emulator, one engine over it, and what the broker sent."""

    case: Case
    emu: Emulator
    engine: Engine
    config: ProfileConfig
    attempts: list[float]  # monotonic send time of every token request the broker made
    upstream: anyio.CancelScope
    upstream_done: anyio.Event
    start_engine: Callable[[], Awaitable[None]]
    lifetime: float  # what the emulator's tokens live
    held: Token | None = None

    async def start_fault(self) -> None:
        await self.case.start(self)

    async def stop_upstream(self) -> None:
        """Close the emulator's listener and connections: from now on, connections are refused."""
        self.upstream.cancel()
        with anyio.fail_after(2):
            await self.upstream_done.wait()

    def status(self) -> ProfileStatus:
        return self.engine.status()[0]


async def _serve(
    emu: Emulator,
    scope: anyio.CancelScope,
    done: anyio.Event,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await emu.run(task_status=task_status)
    finally:
        done.set()


@asynccontextmanager
async def scenario(
    case: Case,
    *,
    lifetime: float = LIFETIME,
    upstream_timeout: float = TIMEOUT,
    names: Iterable[str] = (PROFILE,),
) -> AsyncIterator[Scenario]:
    """The emulator running and the engine ready to start (``await s.start_engine()``).

    ``names``: the engine's profiles, all of one account and client id; ``config`` is the first.
    """
    emu = Emulator({CLIENT_ID: SECRET}, token_lifetime=lifetime, **case.emulator)
    attempts: list[float] = []

    async def record(_request: httpx.Request) -> None:
        attempts.append(time.monotonic())

    hooks = {"request": [record]}
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(event_hooks=hooks, verify=TLS) as http,
    ):
        upstream, done = anyio.CancelScope(), anyio.Event()
        await tg.start(_serve, emu, upstream, done)
        config = profile(emu.token_url, upstream_timeout=upstream_timeout, **case.profile)
        configs = {name: replace(config, name=name) for name in names}
        config = next(iter(configs.values()))
        engine = Engine(configs, http=http, rng=lambda: U)

        async def start_engine() -> None:
            await tg.start(engine.run)

        yield Scenario(case, emu, engine, config, attempts, upstream, done, start_engine, lifetime)
        tg.cancel_scope.cancel()


# -- checks ------------------------------------------------------------------------------------


async def consume(s: Scenario, get: Awaitable[Token]) -> Token:
    """Await a consumer call and check that what it served was valid at that moment."""
    before = time.monotonic()
    token = await get
    check_valid(s, token, before)
    return token


def check_valid(s: Scenario, token: Token, before: float) -> None:
    """``token``, served between ``before`` and now, had at least min_valid left then."""
    now = time.monotonic()
    # The engine judged the token at some moment in [before, now]: allow exactly that much.
    left = token.remaining(now) + (now - before)
    floor = s.config.min_valid
    assert left >= floor, f"served with {left:.3f} s left, less than min_valid ({floor} s)"
    if s.case.verifiable:
        s.emu.verify(token.access_token)  # the issuer agrees it has not expired


def check_secret_free(texts: Iterable[str], tokens: Iterable[str] = ()) -> None:
    """No secret, Basic credentials, or whole token (not even a JWT's head) in ``texts``."""
    forbidden = [SECRET, BASIC_CREDENTIALS, OPAQUE, *tokens]
    for text in texts:
        leaked = [f for f in forbidden if f in text]
        assert not leaked, f"a secret or token leaked into: {text[:300]}"
        assert not JWT_PREFIX.search(text), f"a JWT leaked into: {text[:300]}"


# The retry policy as the product and the lifecycle's docstring state it, spelled out here
# rather than read from broker._lifecycle, so that a change to it shows: (base, cap) of each
# exponential backoff, with "equal jitter" (half fixed, half drawn); a 429 waits its
# Retry-After, at least 1 s and at most an hour, or a minute when it names none.
BACKOFF = {
    "upstream_unavailable": (1.0, 60.0),  # transient: 1, 2, 4 s ... capped at a minute
    "credentials_rejected": (300.0, 3600.0),  # minutes, never a tight loop
    "request_rejected": (300.0, 3600.0),
    "no_progress": (30.0, 600.0),  # upstream answers, but with nothing better
    "too_short_lived": (30.0, 600.0),
}
THROTTLE_DEFAULT, THROTTLE_MIN, THROTTLE_MAX = 60.0, 1.0, 3600.0


def backoff(case: Case) -> Callable[[int], float]:
    """The wait after the n-th failure in a row of ``case``'s kind, jitter drawn as ``U``."""
    if case.kind == "throttled":  # a 429 says how long; it does not grow
        asked = THROTTLE_DEFAULT if case.wait is None else case.wait
        wait = min(max(asked, THROTTLE_MIN), THROTTLE_MAX)
        return lambda _n: wait
    base, cap = BACKOFF[case.kind or ""]
    return lambda n: min(cap, base * 2 ** (n - 1)) * (1 + U) / 2


def first_delay(case: Case) -> float:
    """The wait after the first failure of ``case``'s kind."""
    return backoff(case)(1)


# -- the table ---------------------------------------------------------------------------------

Start = Callable[[Scenario], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    """One fault and what the broker must make of it.

    ``kind`` is the error kind consumers and status see (None: a token is served, lifetime
    ``lifetime``); ``status``/``code``/``says``/``excerpt`` are what the error keeps of it;
    ``wait`` is the throttle a 429 imposes.
    """

    id: str
    start: Start
    kind: str | None
    status: int | None = None
    code: str | None = None
    says: str = ""
    excerpt: str | None = None
    wait: float | None = None
    wait_slack: float = 0.0  # an HTTP-date Retry-After is whole seconds
    lifetime: float | None = None
    skew: float | None = None  # the clock skew a served token's JWT shows, to be logged
    hangs: bool = False  # each attempt lasts the whole upstream_timeout
    where: tuple[str, ...] = (COLD, HELD)
    uvloop: bool = False  # also run on uvloop (a representative subset)
    verifiable: bool = True  # the token is one the emulator can verify against its clock
    emulator: Mapping[str, Any] = field(default_factory=dict)
    profile: Mapping[str, Any] = field(default_factory=dict)
    xfail: Mapping[str, str] = field(default_factory=dict)  # situation -> engine bug

    def __str__(self) -> str:
        return self.id

    @property
    def refused(self) -> bool:
        """The fault is a closed port: upstream never sees the broker's requests."""
        return self.start is _refuse


def matrix(cases: Iterable[Case], situation: str) -> list[Any]:
    """pytest params (case, anyio_backend) for ``situation``: asyncio always, uvloop for some."""
    params = []
    for case in cases:
        if situation not in case.where:
            continue
        bug = case.xfail.get(situation)
        marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
        params.append(pytest.param(case, ASYNCIO, id=f"{case.id}-asyncio", marks=marks))
        if case.uvloop:
            params.append(pytest.param(case, UVLOOP, id=f"{case.id}-uvloop", marks=marks))
    return params


def _always(fault: Fault | Callable[[Emulator], Fault]) -> Start:
    """Every token request from now on meets ``fault`` (built from the emulator if callable)."""

    async def start(s: Scenario) -> None:
        chosen = fault if isinstance(fault, Fault) else fault(s.emu)
        s.emu.set_rule(lambda _request: chosen)

    return start


async def _refuse(s: Scenario) -> None:
    await s.stop_upstream()


async def _rotate_secret(s: Scenario) -> None:
    s.emu.clients[CLIENT_ID] = "rotated-made-up-secret"  # the broker's secret is revoked


async def _as_configured(s: Scenario) -> None:
    """The profile itself is wrong (``Case.profile``): nothing to switch on."""


async def _repeat_held(s: Scenario) -> None:
    assert s.held is not None
    same = TokenShape(access_token=s.held.access_token)
    s.emu.set_rule(lambda _request: Fault(token=same))


def _page(status: int, *, echo: bool = False) -> Fault:
    """A gateway's HTML error page; ``echo``: one that prints the request's credentials."""
    phrase = HTTPStatus(status).phrase
    debug = f"<pre>Authorization: Basic {BASIC_CREDENTIALS}\nsecret={SECRET}</pre>" if echo else ""
    html = f"<html><head><title>{status} {phrase}</title></head><body><h1>{phrase}</h1>{debug}"
    return Fault(status=status, body=html.encode(), headers={"Content-Type": "text/html"})


def _truncated_json(emu: Emulator) -> Fault:
    whole = json.dumps({"access_token": emu.issue(CLIENT_ID), "expires_in": 20}).encode()
    return Fault(status=200, body=whole[: len(whole) // 2])


def _retry_at_date(emu: Emulator) -> Fault:
    when = formatdate(time.time() + 30, usegmt=True)
    return Fault(status=429, headers={"Retry-After": when})


def _shape(**shape: Any) -> Fault:
    return Fault(token=TokenShape(**shape))


def _starter(fault: Fault | Start) -> Start:
    return _always(fault) if isinstance(fault, Fault) else fault


def unavailable(id: str, fault: Fault | Start, says: str, **kw: Any) -> Case:
    """A transient failure: back off 1, 2, 4 s (jittered), keep serving a valid token."""
    return Case(id, _starter(fault), "upstream_unavailable", says=says, **kw)


def rejected(key: str, kind: str, says: str, **kw: Any) -> Case:
    """A row of Colt's error table that blames our request or credentials: retry in minutes."""
    status, _, code = key.partition("-")
    fault = Fault(status=int(status), code=code)
    return Case(f"colt-{key}", _always(fault), kind, int(status), code, says, **kw)


def throttled(id: str, fault: Fault | Start, wait: float | None, **kw: Any) -> Case:
    """A 429: not one request of the account until ``wait`` seconds have passed."""
    return Case(id, _starter(fault), "throttled", 429, says="throttled", wait=wait, **kw)


def served(id: str, fault: Fault, lifetime: float | None = None, **kw: Any) -> Case:
    """Odd but usable: the token is served, believed to live ``lifetime`` (None: as issued)."""
    return Case(id, _always(fault), None, lifetime=lifetime, **kw)


_GATEWAY = {500: "failed internally", 502: "a gateway", 503: "unavailable", 504: "gateway timed"}
_COLT_CODE = {500: "001", 503: "001"}  # Colt's body for a bare 500/503; none for 502/504
RESET = "connection reset by"
# fmt: off
CASES: list[Case] = [
    # -- the wire -----------------------------------------------------------------------------
    unavailable("hangs past upstream_timeout", Fault(delay=HANG), "timed out after", hangs=True,
                uvloop=True),
    served("answers just within upstream_timeout", Fault(delay=TIMEOUT / 3)),
    unavailable("connection refused", _refuse, "connection refused by", uvloop=True),
    unavailable("reset before any byte", Fault(action="reset"), RESET, uvloop=True),
    unavailable("closed before any byte", Fault(action="close"), "broke off", uvloop=True),
    unavailable("reset in a 200 body", Fault(action="reset_mid_body"), RESET, uvloop=True),
    unavailable("reset in a 503 body", Fault(status=503, action="reset_mid_body"), RESET),
    # -- 5xx with Colt's JSON, a gateway's HTML page, or nothing ------------------------------
    *(unavailable(f"{status} json", Fault(status=status), says, status=status,
                  code=_COLT_CODE.get(status), uvloop=status == 503)
      for status, says in _GATEWAY.items()),
    *(unavailable(f"{status} html", _page(status), says, status=status,
                  excerpt=HTTPStatus(status).phrase, uvloop=status == 502)
      for status, says in _GATEWAY.items()),
    *(unavailable(f"{status} empty", Fault(status=status, body=b""), says, status=status)
      for status, says in _GATEWAY.items()),
    unavailable("502 page echoing the credentials", _page(502, echo=True), "a gateway",
                status=502, excerpt="Bad Gateway"),
    # -- a 200 that holds no usable token -----------------------------------------------------
    unavailable("200 html", _page(200), "not a JSON object", status=200, uvloop=True),
    unavailable("200 bare text (the token?)", Fault(status=200, body=OPAQUE.encode(),
                headers={"Content-Type": "text/plain"}), "not a JSON object", status=200),
    unavailable("200 truncated json", _always(_truncated_json), "not a JSON object", status=200),
    unavailable("200 without access_token", _shape(omit_access_token=True),
                "without access_token", status=200),
    unavailable("200 access_token with a space", _shape(access_token="two words"),
                "cannot go in a header", status=200),
    # -- expires_in: a JWT's exp - iat stands in for a bad one; an opaque token has nothing ---
    served("expires_in missing, jwt", _shape(expires_in=MISSING), uvloop=True),
    served("expires_in zero, jwt", _shape(expires_in=0)),
    served("expires_in negative, jwt", _shape(expires_in=-60)),
    served("expires_in huge, jwt", _shape(expires_in=10**9)),
    served("expires_in a string, jwt", _shape(expires_in=str(LIFETIME))),
    *(unavailable(f"expires_in {name}, opaque", _shape(expires_in=value, access_token=OPAQUE),
                  "without a usable lifetime", status=200)
      for name, value in (("missing", MISSING), ("zero", 0), ("negative", -60))),
    served("expires_in huge, opaque (24 h cap)", _shape(expires_in=10**9, access_token=OPAQUE),
           lifetime=24 * 3600.0, verifiable=False),
    Case("lifetime below min_valid", _always(_shape(expires_in=MIN_VALID * 0.6)),
         "too_short_lived", says="less than", status=200),
    # -- the JWT's exp and iat against expires_in ---------------------------------------------
    unavailable("jwt exp in the past", _shape(exp_offset=-60), "without a usable lifetime",
                status=200),
    served("jwt exp far in the future", _shape(exp_offset=10**7)),
    served("expires_in longer than the jwt says", _shape(expires_in=3600), uvloop=True),
    served("issuer clock 1 h ahead", _shape(iat_offset=3600, exp_offset=3600 + LIFETIME),
           skew=3600),
    served("issuer clock 1 h behind", _shape(iat_offset=-3600, exp_offset=LIFETIME - 3600),
           skew=-3600, verifiable=False),
    served("jwt exp 1 h past expires_in, no iat",
           _shape(exp_offset=3600 + LIFETIME, claims={"iat": None}), skew=3600),
    # -- 429 ------------------------------------------------------------------------------------
    throttled("429 retry-after seconds", Fault(status=429, headers={"Retry-After": "30"}), 30,
              uvloop=True),
    throttled("429 retry-after http-date", _always(_retry_at_date), 30, wait_slack=1.0),
    throttled("429 without retry-after", Fault(status=429), None),
    throttled("429 retry-after 0", Fault(status=429, headers={"Retry-After": "0"}), 0),
    throttled("429 retry-after absurd", Fault(status=429, headers={"Retry-After": "999999"}),
              999999),
    Case("429 from the emulator's quota", _as_configured, "throttled", 429, says="throttled",
         wait=30, where=(HELD,), emulator={"quota": 1, "retry_after": 30}),
    # -- Colt's error table ---------------------------------------------------------------------
    rejected("400-001", "request_rejected", "no client credentials"),
    rejected("400-002", "request_rejected", "no grant_type"),
    rejected("400-003", "request_rejected", "no Content-Type"),
    rejected("400-004", "request_rejected", "tracking header 'APIGWTrackingId'"),
    rejected("400-005", "request_rejected", "unsupported or duplicate parameters"),
    rejected("400-006", "request_rejected", "grant type is not supported"),
    rejected("401-001", "credentials_rejected", "saw no client credentials"),
    rejected("401-002", "credentials_rejected", "wrong, revoked", uvloop=True),
    rejected("415-001", "request_rejected", "body's format"),
    *(unavailable(f"colt-{key}", Fault(status=int(key[:3]), code=key[4:]), says,
                  status=int(key[:3]), code=key[4:])
      for key, says in (("500-001", "failed internally"), ("500-002", "failed internally"),
                        ("503-001", "unavailable"))),
    Case("secret revoked upstream (real 401-002)", _rotate_secret, "credentials_rejected", 401,
         "002", "wrong, revoked"),
    Case("tracking header misnamed (real 400-004)", _as_configured, "request_rejected", 400,
         "004", "tracking header 'x-tracking-id'", where=(COLD,),
         profile={"tracking_header": "x-tracking-id"}),
    Case("scope refused (real 400-005)", _as_configured, "request_rejected", 400, "005",
         "unset scope", where=(COLD,), profile={"scope": "read"}),
    Case("error body quoting the secret", _always(Fault(status=400, body=json.dumps(
         {"code": "005", "message": f"bad client_secret={SECRET}"}).encode())),
         "request_rejected", 400, "005", "unsupported or duplicate parameters"),
    # -- other answers --------------------------------------------------------------------------
    # A wrong token_url is configuration: retried in minutes, like a refused request.
    Case("302 redirect (not followed)", _always(Fault(status=302, body=b"",
         headers={"Location": "http://elsewhere.invalid/steal"})), "request_rejected",
         status=302, says="unexpected redirect"),
    Case("404 (wrong token_url)", _always(Fault(status=404)), "request_rejected", status=404,
         says="check token_url"),
    Case("the held token again", _repeat_held, "no_progress", says="already hold", status=200,
         where=(HELD,)),
]
# fmt: on
