"""One account's upstream budget: Colt's 429s and our own per-minute and per-day caps.

Colt counts requests per company account, so every profile of an account shares one gate.
The gate is pure: it is told when requests happen and asked, with ``now``, when the next
may go. Windows slide; a request is counted when it is sent, whatever its outcome.
"""

from __future__ import annotations

from collections import deque

from broker.exceptions import Throttled

MINUTE = 60.0
DAY = 86_400.0


class AccountGate:
    """Decides when the next token request of one account may be sent."""

    def __init__(self, account: str, *, per_minute: int, per_day: int) -> None:
        self.account = account
        self.per_minute = per_minute
        self.per_day = per_day
        self.throttled_until = float("-inf")
        self.throttle_error: Throttled | None = None  # the 429 that set throttled_until
        self._sent: deque[float] = deque()  # send times within the last day, oldest first

    def earliest(self, now: float, *, discretionary: bool = False) -> float:
        """The first moment at or after ``now`` when a request may be sent.

        A discretionary request (one a consumer asked for ahead of the schedule) may use only
        four fifths of the daily budget: the rest is kept for scheduled refreshes, so a client
        storm cannot leave the account without tokens for the rest of the day."""
        self._forget_before(now - DAY)
        per_day = max(1, self.per_day * 4 // 5) if discretionary else self.per_day
        return max(
            now,
            self.throttled_until,
            self._window_opens(MINUTE, self.per_minute),
            self._window_opens(DAY, per_day),
        )

    def record(self, now: float) -> None:
        """A request is being sent at ``now``."""
        self._sent.append(now)

    def throttle(self, until: float, error: Throttled | None = None) -> None:
        """Upstream said 429: nothing goes out for this account before ``until``."""
        if until >= self.throttled_until:
            self.throttled_until = until
            self.throttle_error = error

    def sent_within(self, now: float, window: float) -> int:
        """How many requests went out in the ``window`` seconds before ``now``."""
        return sum(1 for t in self._sent if t > now - window)

    def _window_opens(self, window: float, cap: int) -> float:
        # With `cap` requests inside the window, the next may go when the cap-th newest leaves it.
        if len(self._sent) < cap:
            return float("-inf")
        oldest_that_counts = self._sent[-cap]
        return oldest_that_counts + window

    def _forget_before(self, horizon: float) -> None:
        while self._sent and self._sent[0] <= horizon:
            self._sent.popleft()
