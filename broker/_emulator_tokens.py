"""The emulator's tokens: HS256 JWTs it mints, verifies and revokes, and their shape overrides.

Claims: ``iss`` "colt-emulator", ``sub`` the client id, ``iat`` and ``exp`` (Unix time from
the injected clock's ``wall()``, as numbers with millisecond precision so that lifetimes of a
second or two stay exact), ``jti`` a UUID. Colt publishes neither claims nor algorithm; this
is a plausible stand-in that the broker must read without verifying.
"""

from __future__ import annotations

import enum
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt

from broker._clock import Clock

ISSUER = "colt-emulator"
_ALGORITHM = "HS256"


class _Marker(enum.Enum):
    MISSING = "MISSING"
    LIFETIME = "LIFETIME"

    def __repr__(self) -> str:
        return self.name


MISSING: Final = _Marker.MISSING
"""``TokenShape(expires_in=MISSING)``: leave ``expires_in`` out of the response."""

LIFETIME: Final = _Marker.LIFETIME
"""``expires_in``'s default: the emulator's token lifetime."""


@dataclass(frozen=True)
class TokenShape:
    """Overrides for parts of a successful token response (defaults: a well-formed one).

    ``expires_in`` is any JSON value, :data:`LIFETIME` or :data:`MISSING`. ``exp_offset`` and
    ``iat_offset`` place the JWT's ``exp``/``iat`` relative to the emulator's wall time now
    (defaults: ``+lifetime`` and 0). ``access_token`` replaces the JWT with any string;
    ``claims`` are merged into the JWT's claims; ``extra`` into the JSON body.
    """

    expires_in: object = LIFETIME
    exp_offset: float | None = None
    iat_offset: float | None = None
    token_type: str = "Bearer"  # noqa: S105  # the OAuth token type, not a secret
    omit_access_token: bool = False
    access_token: str | None = None
    claims: Mapping[str, object] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)


WELL_FORMED = TokenShape()


class TokenRevoked(jwt.InvalidTokenError):
    """The token was revoked with :meth:`TokenMint.revoke` although it has not expired."""


class TokenMint:
    """Mints, verifies and revokes this emulator's tokens."""

    def __init__(self, *, lifetime: float, clock: Clock, key: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._key = key if key is not None else secrets.token_bytes(32)
        self._revoked: set[str] = set()

    @property
    def expires_in(self) -> int | float:
        """The lifetime as ``expires_in`` carries it: an int when whole."""
        return int(self.lifetime) if float(self.lifetime).is_integer() else self.lifetime

    def success_body(self, client_id: str, shape: TokenShape = WELL_FORMED) -> dict[str, object]:
        """The JSON body of a 200 token response for ``client_id``."""
        body: dict[str, object] = {}
        if not shape.omit_access_token:
            body["access_token"] = shape.access_token or self.mint(client_id, shape)
        body["token_type"] = shape.token_type
        if shape.expires_in is not MISSING:
            body["expires_in"] = (
                self.expires_in if shape.expires_in is LIFETIME else shape.expires_in
            )
        return body | dict(shape.extra)

    def mint(self, client_id: str, shape: TokenShape = WELL_FORMED) -> str:
        """A signed JWT for ``client_id``."""
        now = self._clock.wall()
        exp_offset = self.lifetime if shape.exp_offset is None else shape.exp_offset
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": client_id,
            "iat": round(now + (shape.iat_offset or 0.0), 3),
            "exp": round(now + exp_offset, 3),
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims | dict(shape.claims), self._key, algorithm=_ALGORITHM)

    def verify(self, access_token: str) -> dict[str, Any]:
        """The claims of a token this mint issued; raises ``jwt.InvalidTokenError`` if it is
        forged, malformed, expired (``jwt.ExpiredSignatureError``) or revoked (``TokenRevoked``).
        """
        claims: dict[str, Any] = jwt.decode(
            access_token,
            self._key,
            algorithms=[_ALGORITHM],
            issuer=ISSUER,
            # Expiry is checked below against the injected clock, not the system clock.
            options={"verify_exp": False, "verify_iat": False, "require": ["exp", "sub", "jti"]},
        )
        self._check_expiry(claims["exp"])
        if access_token in self._revoked:
            raise TokenRevoked("the token was revoked")
        return claims

    def revoke(self, access_token: str) -> None:
        """From now on, :meth:`verify` refuses ``access_token``."""
        self._revoked.add(access_token)

    def _check_expiry(self, exp: object) -> None:
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise jwt.InvalidTokenError("exp is not a number")
        if exp <= self._clock.wall():
            raise jwt.ExpiredSignatureError("the token has expired")
