"""The token as the broker holds it: immutable, with its deadline on the monotonic clock."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


def fingerprint(access_token: str) -> str:
    """A short hash that names a token in logs and status without revealing it."""
    return sha256_hex(access_token)[:12]


def sha256_hex(access_token: str) -> str:
    """The hex SHA-256 of a token, as consumers name a rejected token to the refresh endpoint."""
    return hashlib.sha256(access_token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Token:
    """One access token. ``expires_at`` is monotonic; ``wall_expires_at`` is Unix time."""

    access_token: str = field(repr=False)
    token_type: str
    obtained_at: float
    expires_at: float
    wall_expires_at: float

    @property
    def lifetime(self) -> float:
        """Seconds the token was valid for when it arrived."""
        return self.expires_at - self.obtained_at

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.access_token)

    @property
    def sha256(self) -> str:
        return sha256_hex(self.access_token)

    def remaining(self, now: float) -> float:
        """Seconds left at monotonic time ``now`` (negative once expired)."""
        return self.expires_at - now

    def __repr__(self) -> str:
        return f"Token(fingerprint={self.fingerprint!r}, expires_at={self.expires_at:.3f})"
