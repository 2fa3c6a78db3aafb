"""Capped, jittered exponential backoff, as a pure function of the attempt number."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """``base * 2**(n-1)`` capped at ``cap``, spread by "equal jitter" (half fixed, half random).

    Half of the delay stays fixed so that a run of bad luck cannot turn backoff into a tight loop;
    the random half keeps many brokers (or profiles) from retrying in step.
    """

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, u: float) -> float:
        """Seconds to wait after the ``attempt``-th failure in a row; ``u`` is uniform in [0, 1)."""
        exponent = min(max(attempt - 1, 0), 32)  # bound the power: 2**32 s is already past any cap
        ceiling = min(self.cap, self.base * 2.0**exponent)
        return ceiling / 2 + ceiling / 2 * u
