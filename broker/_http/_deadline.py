"""One lazy timer per connection: cheap to move on every request."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

_EARLY = 0.001  # the loop may run a timer this much before its time


class Deadline:
    """Calls ``on_expiry`` once the current deadline passes.

    Moving the deadline later costs nothing: the armed timer fires early and re-arms itself.
    Only an earlier deadline reschedules. So a keep-alive connection that moves its deadline
    on every request makes no timer churn. ``math.inf`` means no deadline.
    """

    __slots__ = ("_loop", "_on_expiry", "_timer", "_timer_at", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._when = self._timer_at = math.inf
        self._timer: asyncio.TimerHandle | None = None

    def set(self, when: float) -> None:
        """Expire at loop time ``when`` (replacing any earlier setting)."""
        self._when = when
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(when, self._fire), when

    def cancel(self) -> None:
        self._when = math.inf
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self._loop.time() < self._when - _EARLY:
            self.set(self._when)  # moved later since the timer was armed
            return
        self._when = math.inf
        self._on_expiry()
