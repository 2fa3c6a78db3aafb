"""Structured logs that never show a secret or a whole token.

``configure_logging`` is called once by the entry point; modules log through
``structlog.get_logger()`` with stable dotted event names (``token.refreshed``).

The ``redact`` processor runs last before the renderer, after exceptions are rendered to
text, so everything that reaches the output has been through it:

1. values under secret-like keys (``client_secret``, ``authorization``, ``token``, ...) are
   replaced: a token string by ``sha256:<fingerprint>``, anything else by ``[redacted]``;
2. every string registered with ``register_secret`` is replaced wherever it appears;
3. ``Authorization: Basic/Bearer <x>`` keeps its scheme and loses ``<x>``;
4. anything that looks like a JWT becomes ``<token sha256:<fingerprint>>``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from broker._token import Token, fingerprint

__all__ = ["configure_logging", "redact", "redact_text", "register_secret", "reset_secrets"]

LogFormat = Literal["auto", "json", "console"]

REDACTED = "[redacted]"
_MIN_SECRET_LEN = 4
_MAX_DEPTH = 8  # deeper structures are logged as their (scrubbed) repr: no runaway recursion

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Key names are compared lower-cased with "-" read as "_", so "X-Colt-Broker" matches.
_SECRET_KEYS = frozenset(
    {"client_secret", "secret", "password", "authorization", "key", "http_key", "x_colt_broker"}
)
_TOKEN_KEYS = frozenset({"access_token", "token"})
_SECRET_SUFFIXES = ("_secret", "_password")
_TOKEN_SUFFIXES = ("_token",)

# Three base64url segments, the first a JSON header ("eyJ" is base64 for '{"'). The
# signature may be empty (unsecured JWTs); matches shorter than 20 characters are kept.
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_MIN_JWT_LEN = 20
# "Authorization: Bearer x", "authorization=Basic x", "'Authorization': 'Bearer x'", ...
_AUTH_RE = re.compile(
    r"""(authorization["']?\s*[:=,]\s*["']?\s*(?:basic|bearer)\s+)([^\s"',;]+)""", re.IGNORECASE
)
# A bare scheme followed by something credential-sized (RFC 7235 token68): catches
# '-H "Bearer x"' without eating prose such as "Basic authentication".
_SCHEME_RE = re.compile(r"\b((?:basic|bearer)\s+)([A-Za-z0-9._~+/-]{16,}=*)", re.IGNORECASE)
_FINGERPRINT_RE = re.compile(r"(?:sha256:)?([0-9a-f]{12})")

_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_secrets_re: re.Pattern[str] | None = None


def configure_logging(
    fmt: LogFormat = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Route every structlog logger to ``stream`` (default stderr), redacted, at ``level``.

    ``auto`` means JSON when the stream is not a terminal or when running under systemd
    (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set), a readable console format otherwise.
    Calling it again replaces the previous configuration.
    """
    out = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    use_json = _wants_json(fmt, out, env)
    structlog.configure(
        processors=_processors(use_json, colors=_isatty(out) and "NO_COLOR" not in env),
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        # Module-level loggers must follow a reconfiguration (tests, SIGHUP); a log line is
        # never on the serving hot path, so the small saving of caching is not worth it.
        cache_logger_on_first_use=False,
    )


def register_secret(value: str) -> None:
    """Replace ``value`` by ``[redacted]`` in every later log line (shorter than 4: ignored).

    Its URL-encoded form is registered too, as it appears in form bodies.
    """
    global _secrets, _secrets_re  # noqa: PLW0603  # one process-wide registry, swapped atomically
    if len(value) < _MIN_SECRET_LEN:
        return
    variants = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    with _secrets_lock:
        if variants <= _secrets:
            return
        _secrets = _secrets | variants
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in ordered))


def reset_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets, _secrets_re  # the registry lives at module level, see register_secret
    with _secrets_lock:
        _secrets, _secrets_re = frozenset(), None


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """The structlog processor: scrub secrets and tokens from every key and value."""
    return {key: _scrub_item(key, value, 0) for key, value in event_dict.items()}


def redact_text(text: str) -> str:
    """``text`` with registered secrets, credentials after an auth scheme and JWTs replaced."""
    pattern = _secrets_re
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _AUTH_RE.sub(_replace_credential, text)
    text = _SCHEME_RE.sub(_replace_credential, text)
    return _JWT_RE.sub(_replace_jwt, text)


def _processors(use_json: bool, *, colors: bool) -> list[Processor]:
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=colors)
    )
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Tracebacks become plain text here so that ``redact`` scrubs them as well.
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]


def _wants_json(fmt: str, stream: TextIO, environ: Mapping[str, str]) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    if fmt != "auto":
        raise ValueError(f"log_format must be auto, json or console, not {fmt!r}")
    under_systemd = "JOURNAL_STREAM" in environ or "INVOCATION_ID" in environ
    return under_systemd or not _isatty(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _level_number(level: str) -> int:
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"log_level must be debug, info, warning or error, not {level!r}"
        ) from None


def _scrub_item(key: object, value: Any, depth: int) -> Any:
    if isinstance(key, str):
        kind = _key_kind(key)
        if kind == "token":
            return _mask_token(value)
        if kind == "secret":
            return None if value is None else REDACTED
    return _scrub_value(value, depth)


def _scrub_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {k: _scrub_item(k, v, depth + 1) for k, v in value.items()}
    if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        return [_scrub_value(v, depth + 1) for v in value]
    # Renderers would repr() it anyway; doing it here lets the repr be scrubbed too.
    return redact_text(repr(value))


def _key_kind(key: str) -> Literal["token", "secret", None]:
    name = key.lower().replace("-", "_")
    if name in _TOKEN_KEYS or name.endswith(_TOKEN_SUFFIXES):
        return "token"
    if name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES):
        return "secret"
    return None


def _mask_token(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Token):
        return f"sha256:{value.fingerprint}"
    if not isinstance(value, str) or not value:
        return REDACTED
    if match := _FINGERPRINT_RE.fullmatch(value):  # already a fingerprint: keep it readable
        return f"sha256:{match.group(1)}"
    return f"sha256:{fingerprint(value)}"


def _replace_credential(match: re.Match[str]) -> str:
    prefix, credential = match.group(1), match.group(2)
    if credential.startswith((REDACTED, "<token")):  # already replaced by an earlier rule
        return match.group(0)
    if prefix.rstrip().lower().endswith("bearer"):
        return f"{prefix}<token sha256:{fingerprint(credential)}>"
    return prefix + REDACTED


def _replace_jwt(match: re.Match[str]) -> str:
    text = match.group(0)
    if len(text) < _MIN_JWT_LEN:
        return text
    return f"<token sha256:{fingerprint(text)}>"
