"""Turn text from the token endpoint into something safe to log: short, printable, secret-free.

Anything the endpoint sends back may echo what we sent (a gateway's debug page can print the
request headers) or hold a token, so every excerpt, message and exception text that leaves the
upstream client goes through :func:`sanitise` first.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

EXCERPT_CHARS = 200
REDACTED = "[redacted]"

# Wider than "three dot-separated parts": a JWT cut in half by a gateway is still a token prefix.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){0,2}")
# An echoed "Authorization: Basic <base64 of id:secret>" or "Bearer <token>". The credential
# must hold a digit, capital or symbol after its first character, so that prose such as
# "Basic authentication" stays readable.
_AUTH_SCHEME = re.compile(
    r"\b([Bb]asic|[Bb]earer|BASIC|BEARER)\s+"
    r"[A-Za-z0-9._~+/=-](?=[A-Za-z0-9._~+/=-]*[0-9A-Z._~+/=-])[A-Za-z0-9._~+/=-]{7,}"
)
# token=..., "access_token": "...", client_secret=... in form, JSON or query syntax.
_KEY_VALUE = re.compile(
    r"""(?ix)
    ( (?:access_token|refresh_token|id_token|client_secret|password|secret|token)
      ["']? \s* [:=] \s* ["']? )
    [^\s"'&,;<>]+
    """
)
# C0/C1 controls (whitespace among them is handled by _SPACE first), zero-width and bidi marks.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_SPACE = re.compile(r"\s+")
_SCRIPT = re.compile(r"(?is)<(script|style)\b.*?</\1\s*>")
_TAG = re.compile(r"<[^>]*>")


def sanitise(text: str, secrets: Iterable[str | None] = (), limit: int = EXCERPT_CHARS) -> str:
    """``text`` with secrets and tokens replaced, controls dropped, whitespace collapsed, cut short.

    Redaction runs before and after normalising, so a secret survives neither as written nor
    once stray control characters around it are gone.
    """
    known = [s for s in secrets if s]  # an empty secret would match everywhere
    text = _redact(text, known)
    text = _SPACE.sub(" ", _CONTROL.sub("", _SPACE.sub(" ", text))).strip()
    return truncate(_redact(text, known), limit)


def excerpt(body: bytes, secrets: Iterable[str | None] = ()) -> str | None:
    """A short, sanitised rendering of a response body; markup is stripped from HTML pages."""
    text = body.decode("utf-8", errors="replace")
    if text.lstrip().startswith("<"):
        text = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", text)))
    return sanitise(text, secrets) or None


def truncate(text: str, limit: int) -> str:
    """At most ``limit`` characters, marking a cut with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _JWT.sub(REDACTED, text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m[1]} {REDACTED}", text)
    return _KEY_VALUE.sub(lambda m: m[1] + REDACTED, text)
