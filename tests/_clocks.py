"""The one fake clock the tests share: both clocks move only when the test says so."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FakeClock:
    """Monotonic and wall time (``broker._clock.Clock``) under the test's control."""

    mono: float = 1_000.0
    now: float = 1_800_000_000.0  # wall time, 2027-01-15

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.now += seconds
