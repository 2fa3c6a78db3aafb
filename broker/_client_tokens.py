"""The Python client's token cache and its exchanges with the daemon (standard library only).

The cache maps the profile a caller named to an ``Entry``: the token, its deadline on the
monotonic clock, and the profile name the daemon resolved it to (``"default"`` asks for the
daemon's default profile, whatever its name; the refresh endpoint needs the real one). The
deadline is measured from *before* the request went out, so it errs early, never late.

Entries are immutable tuples and a dict's get and set are atomic, so the hit path in
``broker.client`` reads without a lock. A per-profile lock only makes misses in several
threads at once coalesce into one request to the daemon. Discovery (socket, then TCP with the
key) and the wire format are ``broker._locate``'s, shared with ``colt-broker token``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any, NamedTuple, TypeGuard, TypeVar, TypeVarTuple
from urllib.parse import quote

from broker._locate import call
from broker._status import WALL_TIMES, LastError, ProfileStatus, from_iso
from broker._token import sha256_hex
from broker._wire import Response
from broker.exceptions import BrokerUnavailable, TokenUnavailable

DEFAULT_PROFILE = "default"
MARGIN = 0.5  # seconds beyond min_valid a cached token must have left to be handed out
REQUEST_TIMEOUT = 30.0  # the daemon bounds its own wait for a refresh at 15 s
_JSON = {"Accept": "application/json"}

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


class Entry(NamedTuple):
    token: str
    deadline: float  # time.monotonic() at which the token expires
    profile: str  # the daemon's name for the profile


ENTRIES: dict[str, Entry] = {}
_LOCKS: dict[str, threading.Lock] = {}


def is_fresh(entry: Entry | None, min_valid: float) -> bool:
    """Whether ``entry`` may be handed out to a caller that needs ``min_valid`` seconds."""
    return entry is not None and entry.deadline - time.monotonic() >= min_valid + MARGIN


def clear() -> None:
    """Forget every cached token: the next call of each profile asks the daemon."""
    ENTRIES.clear()


def refill(profile: str, min_valid: float) -> str:
    """The miss path: ask the daemon, one thread per profile at a time, and cache the answer."""
    _check_min_valid(min_valid)
    with _LOCKS.setdefault(profile, threading.Lock()):
        entry = ENTRIES.get(profile)
        if entry is None or not is_fresh(entry, min_valid):  # another thread may have refilled
            entry = fetch(profile, min_valid + MARGIN)
            _keep(profile, entry)
        return entry.token


def report_rejected(profile: str, token: str, min_valid: float) -> str:
    """An API answered 401 to ``token``: tell the daemon and cache the token now current."""
    _check_min_valid(min_valid)
    with _LOCKS.setdefault(profile, threading.Lock()):
        entry = ENTRIES.get(profile)
        if entry is not None and entry.token != token and is_fresh(entry, min_valid):
            return entry.token  # another request already reported it and got a new one
        name = entry.profile if entry is not None else profile
        body = json.dumps({"sha256": sha256_hex(token)}).encode()
        target = f"/v1/token/{quote(name, safe='')}/refresh"
        entry = _exchange("POST", target, profile, body=body)
        ENTRIES[profile] = entry  # replace even a later deadline: that token was rejected
        return entry.token


async def in_worker_thread(fn: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run a blocking exchange in a worker thread, leaving the event loop free.

    anyio rather than asyncio.to_thread: it also runs under trio, and it lets a cancelled
    caller go at once (the worker finishes its bounded request alone). Imported here so that
    a script calling only get_token does not pay for it.
    """
    from anyio import to_thread  # lazy: see the docstring

    return await to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def fetch(profile: str, floor: float) -> Entry:
    """A token with at least ``floor`` seconds left, from the daemon (no cache)."""
    path = "/v1/token" if profile == DEFAULT_PROFILE else f"/v1/token/{quote(profile, safe='')}"
    return _exchange("GET", f"{path}?min_valid={floor:.3f}", profile)


def fetch_status() -> list[ProfileStatus]:
    """Every profile's state, from ``GET /v1/status``."""
    response = call("GET", "/v1/status", headers=_JSON, timeout=REQUEST_TIMEOUT)
    doc = _json(response)
    profiles = doc.get("profiles") if isinstance(doc, dict) else None
    if response.status != 200 or not isinstance(profiles, list):
        raise BrokerUnavailable(f"the broker refused GET /v1/status: {_problem_text(response)}")
    return [profile_status(p) for p in profiles if isinstance(p, dict)]


def profile_status(doc: dict[str, Any]) -> ProfileStatus:
    """One entry of ``/v1/status`` as the engine's own ``ProfileStatus``."""
    values: dict[str, Any] = {f.name: doc.get(f.name) for f in fields(ProfileStatus)}
    for name in WALL_TIMES:  # ISO 8601 on the wire, Unix times in the object
        values[name] = from_iso(values[name])
    values["counters"] = dict(doc.get("counters") or {})
    error = doc.get("last_error")
    if isinstance(error, dict):
        known: dict[str, Any] = {f.name: error.get(f.name) for f in fields(LastError)}
        known["at"] = from_iso(known["at"])
        known["detail"] = dict(error.get("detail") or {})
        values["last_error"] = LastError(**known)
    return ProfileStatus(**values)


def _check_min_valid(min_valid: float) -> None:
    if not (math.isfinite(min_valid) and min_valid >= 0):
        raise ValueError(f"min_valid must be a number of seconds >= 0, not {min_valid!r}")


def _keep(profile: str, entry: Entry) -> None:
    # Of two answers racing in, keep the one that lasts longer.
    current = ENTRIES.get(profile)
    if current is None or current.token == entry.token or current.deadline < entry.deadline:
        ENTRIES[profile] = entry


def _exchange(method: str, target: str, profile: str, *, body: bytes = b"") -> Entry:
    headers = {**_JSON, "Content-Type": "application/json"} if body else _JSON
    started = time.monotonic()
    response = call(method, target, body=body, headers=headers, timeout=REQUEST_TIMEOUT)
    if response.status != 200:
        raise token_error(response, profile)
    return _entry(response, started, profile)


def _entry(response: Response, started: float, profile: str) -> Entry:
    doc = _json(response)
    if isinstance(doc, dict):
        token, expires_in = doc.get("access_token"), doc.get("expires_in")
        if isinstance(token, str) and token and _is_number(expires_in):
            name = doc.get("profile")
            return Entry(token, started + expires_in, name if isinstance(name, str) else profile)
    raise TokenUnavailable(
        f"no token for profile {profile!r}: the answer is not a token document "
        "(is something other than colt-broker listening there?)",
        profile=profile,
        problem={"status": response.status},
    )


def token_error(response: Response, profile: str) -> TokenUnavailable:
    """The broker's problem response as a TokenUnavailable carrying its members."""
    doc = _json(response)
    problem: dict[str, object] = dict(doc) if isinstance(doc, dict) else {}
    problem.setdefault("status", response.status)
    retry_after = _retry_after(response.headers.get("retry-after"))
    message = f"no token for profile {profile!r}: {_problem_text(response, problem)}"
    if retry_after is not None:
        message += f" (retry after {retry_after:g} s)"
    named = problem.get("profile")
    return TokenUnavailable(
        message,
        profile=named if isinstance(named, str) else profile,
        retry_after=retry_after,
        problem=problem,
    )


def _problem_text(response: Response, problem: dict[str, object] | None = None) -> str:
    doc = problem if problem is not None else _json(response)
    if not isinstance(doc, dict):
        return f"HTTP {response.status}"
    title = doc.get("title") or f"HTTP {response.status}"
    detail = doc.get("detail")
    return f"{title}: {detail}" if detail else str(title)


def _json(response: Response) -> object:
    try:
        return response.json()
    except ValueError:  # also UnicodeDecodeError
        return None


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _retry_after(value: str | None) -> float | None:
    # The daemon sends whole seconds; the HTTP-date form is not worth parsing here.
    return float(value) if value and value.strip().isdigit() else None
