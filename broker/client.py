"""Get Colt access tokens from the local colt-broker daemon.

::

    from broker.client import ColtAuth, get_token

    token = get_token()                       # a str, valid for at least 60 s
    with httpx.Client(auth=ColtAuth()) as api:  # adds the token; on a 401, reports it and
        api.get("https://...")                  # retries once with the new one

``get_token`` and ``await aget_token`` work in scripts, in threads, and inside a running event
loop (a notebook cell, an asyncio or anyio program): neither calls ``asyncio.run``. They find
the daemon through ``$COLT_BROKER_SOCKET`` / ``$COLT_BROKER_URL`` and the default paths, as
``colt-broker token`` does, and keep each profile's token in this process until less than
``min_valid`` (plus half a second) would be left, asking the daemon nothing in between.

The profile ``"default"`` is the daemon's default profile (the one named ``default``, or its
only profile), like ``colt-broker token`` without an argument.

Errors: ``BrokerUnavailable`` (no daemon answered; the message names every socket and URL
tried and how to start one) and ``TokenUnavailable`` (the daemon answered with a problem; the
exception carries its members in ``.problem``, plus ``.retry_after`` and ``.profile``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from broker import _client_tokens as _tokens
from broker._status import ProfileStatus as ProfileState
from broker.exceptions import BrokerUnavailable, TokenUnavailable

if TYPE_CHECKING:
    from broker._client_auth import ColtAuth

__all__ = [
    "BrokerUnavailable",
    "ColtAuth",
    "ProfileState",
    "TokenUnavailable",
    "aget_token",
    "clear_cache",
    "get_token",
    "status",
]

# Bound once: the cache hit is a dict lookup and one clock read (the goal is <= 2 us a call).
_entries = _tokens.ENTRIES
_monotonic = time.monotonic
_MARGIN = _tokens.MARGIN


def get_token(profile: str = "default", min_valid: float = 60) -> str:
    """An access token for ``profile`` that stays valid at least ``min_valid`` seconds.

    Served from this process's cache when it can be, else from the daemon (blocking, up to
    30 s while the daemon waits for a refresh). Thread-safe; safe inside a running event loop.
    Raises BrokerUnavailable, TokenUnavailable, or ValueError for a negative ``min_valid``.
    """
    entry = _entries.get(profile)
    floor = min_valid + _MARGIN
    # `floor >= _MARGIN` refuses a negative (or NaN) min_valid here, which could otherwise be
    # answered with an expired token from the cache; refill() then says what is wrong.
    if entry is not None and entry.deadline - _monotonic() >= floor >= _MARGIN:
        return entry.token
    return _tokens.refill(profile, min_valid)


async def aget_token(profile: str = "default", min_valid: float = 60) -> str:
    """``get_token`` for coroutines: a miss waits in a worker thread, not on the event loop.

    Works under asyncio (including a notebook's loop and uvloop) and trio, through anyio.
    Cancelling the caller returns at once; the worker finishes its bounded request alone.
    """
    entry = _entries.get(profile)
    floor = min_valid + _MARGIN
    if entry is not None and entry.deadline - _monotonic() >= floor >= _MARGIN:
        return entry.token
    return await _tokens.in_worker_thread(_tokens.refill, profile, min_valid)


def status() -> list[ProfileState]:
    """Every profile's state as the daemon sees it (never a token or secret)."""
    return _tokens.fetch_status()


def clear_cache() -> None:
    """Forget this process's cached tokens; the next call of each profile asks the daemon."""
    _tokens.clear()


def __getattr__(name: str) -> object:
    # ColtAuth subclasses httpx.Auth; importing httpx costs ~50 ms that get_token users skip.
    if name == "ColtAuth":
        from broker._client_auth import ColtAuth  # lazy: see above

        return ColtAuth
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
