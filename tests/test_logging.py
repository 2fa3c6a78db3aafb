"""Logging: JSON or console by context, level filtering, and redaction of secrets and tokens."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from broker._logging import (
    configure_logging,
    redact,
    redact_text,
    register_secret,
    reset_secrets,
)
from broker._token import Token, fingerprint

SECRET = "made-up-Secret/42+x"  # not a credential: a marker to look for
# A syntactically valid, made-up JWT: {"alg":"HS256","typ":"JWT"} . {"sub":"demo"} . signature
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJkZW1vIn0."
    "c2lnbmF0dXJlLW5vdC1yZWFsLWp1c3QtZm9yLXRlc3Rz"
)
JWT_SHOWN = f"<token sha256:{fingerprint(JWT)}>"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

log = structlog.get_logger()  # created before any configuration, as in product modules


class TtyStream(io.StringIO):
    """An in-memory stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    reset_secrets()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def log_json(**kw: Any) -> dict[str, Any]:
    """Configure JSON output to a fresh stream, log one info line and return it parsed."""
    stream = io.StringIO()
    configure_logging("json", stream=stream, environ={})
    log.info(kw.pop("event", "test.event"), **kw)
    [line] = json_lines(stream)
    return line


def raise_and_log(message: str) -> None:
    try:
        raise RuntimeError(message)
    except RuntimeError:
        log.exception("upstream.failed", profile="default")


# -- output format -----------------------------------------------------------------------


def test_auto_is_json_when_not_a_tty() -> None:
    """A stream that is not a terminal (a pipe, a file) gets one JSON object per line."""
    stream = io.StringIO()
    configure_logging(stream=stream, environ={})
    log.info("token.refreshed", profile="default")
    [line] = json_lines(stream)
    assert line["event"] == "token.refreshed"
    assert line["profile"] == "default"


def test_auto_is_console_on_a_tty() -> None:
    """On a terminal the output is the readable console format, not JSON."""
    stream = TtyStream()
    configure_logging(stream=stream, environ={"NO_COLOR": "1"})
    log.info("token.refreshed", profile="default")
    text = stream.getvalue()
    assert not text.startswith("{")
    assert "token.refreshed" in text
    assert "profile=default" in text
    assert not ANSI.search(text), "NO_COLOR must switch colours off"


def test_console_on_a_tty_has_colours() -> None:
    """Without NO_COLOR a terminal gets coloured output."""
    stream = TtyStream()
    configure_logging(stream=stream, environ={})
    log.info("token.refreshed")
    assert ANSI.search(stream.getvalue())


@pytest.mark.parametrize("variable", ["JOURNAL_STREAM", "INVOCATION_ID"])
def test_auto_is_json_under_systemd_even_on_a_tty(variable: str) -> None:
    """Under systemd (journal or a unit invocation) auto picks JSON whatever the stream is."""
    stream = TtyStream()
    configure_logging(stream=stream, environ={variable: "8:12345"})
    log.info("token.refreshed")
    assert json_lines(stream)[0]["event"] == "token.refreshed"


def test_explicit_format_overrides_detection() -> None:
    """fmt='json' on a terminal and fmt='console' on a pipe do what they say."""
    tty = TtyStream()
    configure_logging("json", stream=tty, environ={})
    log.info("a.event")
    assert json_lines(tty)[0]["event"] == "a.event"
    pipe = io.StringIO()
    configure_logging("console", stream=pipe, environ={})
    log.info("b.event")
    assert not pipe.getvalue().startswith("{")
    assert not ANSI.search(pipe.getvalue()), "no colours where no terminal is"


def test_json_line_has_timestamp_level_event_and_fields() -> None:
    """A JSON line has an ISO UTC timestamp, the level, the event and every bound field."""
    stream = io.StringIO()
    configure_logging("json", stream=stream, environ={})
    log.bind(profile="default").warning("upstream.failed", status=503, tracking_id="t-1")
    [line] = json_lines(stream)
    stamp = dt.datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - stamp) < dt.timedelta(minutes=5)
    assert line["level"] == "warning"
    assert line["event"] == "upstream.failed"
    assert (line["profile"], line["status"], line["tracking_id"]) == ("default", 503, "t-1")


def test_level_filters_lower_levels() -> None:
    """At level 'warning' info and debug lines are dropped; warning and error pass."""
    stream = io.StringIO()
    configure_logging("json", "WARNING", stream=stream, environ={})
    log.debug("x.debug")
    log.info("x.info")
    log.warning("x.warning")
    log.error("x.error")
    assert [line["event"] for line in json_lines(stream)] == ["x.warning", "x.error"]


def test_debug_level_shows_debug() -> None:
    """At level 'debug' (any case) debug lines are written."""
    stream = io.StringIO()
    configure_logging("json", "Debug", stream=stream, environ={})
    log.debug("x.debug")
    assert json_lines(stream)[0]["level"] == "debug"


@pytest.mark.parametrize(("fmt", "level"), [("yaml", "info"), ("auto", "verbose")])
def test_bad_format_or_level_is_refused(fmt: Any, level: str) -> None:
    """An unknown format or level raises ValueError naming the setting."""
    with pytest.raises(ValueError, match=r"log_format|log_level"):
        configure_logging(fmt, level, stream=io.StringIO(), environ={})


def test_configure_again_replaces_the_previous_configuration() -> None:
    """A second call redirects existing loggers and applies the new level; nothing doubles."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first, environ={})
    log.info("one.event")
    configure_logging("json", "error", stream=second, environ={})
    configure_logging("json", "error", stream=second, environ={})
    log.info("two.dropped")
    log.error("three.event")
    assert [line["event"] for line in json_lines(first)] == ["one.event"]
    assert [line["event"] for line in json_lines(second)] == ["three.event"]


def test_redact_runs_last_before_the_renderer() -> None:
    """Exceptions are rendered to text before redact runs, and redact is just before rendering."""
    configure_logging("json", stream=io.StringIO(), environ={})
    processors = structlog.get_config()["processors"]
    assert processors[-2] is redact
    assert processors.index(structlog.processors.format_exc_info) < len(processors) - 2


# -- registered secrets ------------------------------------------------------------------


def test_registered_secret_in_event_text_is_redacted() -> None:
    """A registered secret inside the event text is replaced by [redacted]."""
    register_secret(SECRET)
    line = log_json(event=f"config.loaded with {SECRET} inside")
    assert line["event"] == "config.loaded with [redacted] inside"


def test_registered_secret_in_nested_values_is_redacted() -> None:
    """A registered secret is replaced inside nested dicts, lists and tuples."""
    register_secret(SECRET)
    stream = io.StringIO()
    configure_logging("json", stream=stream, environ={})
    log.info("check.done", detail={"files": [f"/etc/{SECRET}.txt", (1, SECRET)]})
    assert SECRET not in stream.getvalue()
    assert json_lines(stream)[0]["detail"] == {"files": ["/etc/[redacted].txt", [1, "[redacted]"]]}


def test_registered_secret_url_encoded_is_redacted() -> None:
    """The URL-encoded form of a registered secret (as in a form body) is replaced too."""
    register_secret(SECRET)
    line = log_json(body="grant_type=client_credentials&client_secret=made-up-Secret%2F42%2Bx")
    assert line["body"] == "grant_type=client_credentials&client_secret=[redacted]"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_registered_secret_in_exception_is_redacted(fmt: Any) -> None:
    """The rendered exception (message and traceback) loses a registered secret."""
    register_secret(SECRET)
    stream = io.StringIO()
    configure_logging(fmt, stream=stream, environ={})
    raise_and_log(f"token endpoint said: bad secret {SECRET}")
    text = stream.getvalue()
    assert SECRET not in text
    assert "RuntimeError: token endpoint said: bad secret [redacted]" in text
    assert "Traceback (most recent call last)" in text


def test_exception_object_as_a_value_is_redacted() -> None:
    """An arbitrary object is logged as its repr, scrubbed like any text."""
    register_secret(SECRET)
    line = log_json(error=ValueError(f"bad {SECRET}"))
    assert line["error"] == "ValueError('bad [redacted]')"


def test_short_secrets_are_ignored() -> None:
    """Secrets under 4 characters are not registered (they would shred ordinary text)."""
    register_secret("abc")
    assert log_json(event="abc.def")["event"] == "abc.def"


def test_secret_containing_another_is_redacted_whole() -> None:
    """With overlapping secrets registered, the longer one is replaced in one piece."""
    register_secret("made-up")
    register_secret(SECRET)
    assert redact_text(f"x {SECRET} y") == "x [redacted] y"


# -- tokens ------------------------------------------------------------------------------


def test_jwt_in_free_text_becomes_a_fingerprint() -> None:
    """A JWT anywhere in free text is replaced by its short hash, never shown whole."""
    line = log_json(note=f"upstream sent {JWT}, ok", detail=[{"raw": f"body={JWT}"}])
    assert line["note"] == f"upstream sent {JWT_SHOWN}, ok"
    assert line["detail"] == [{"raw": f"body={JWT_SHOWN}"}]


def test_short_eyj_text_is_kept() -> None:
    """Text that merely starts like a JWT but is too short to be one stays as it is."""
    assert redact_text("eyJa.b.c and eyJ") == "eyJa.b.c and eyJ"


@pytest.mark.parametrize("key", ["token", "access_token", "Access_Token", "refresh_token"])
def test_token_key_gets_a_fingerprint(key: str) -> None:
    """A string under a token key is shown as sha256:<12 hex> of that string."""
    opaque = "opaque-token-value-without-structure"
    assert log_json(**{key: opaque})[key] == f"sha256:{fingerprint(opaque)}"


def test_token_key_keeps_a_fingerprint_and_names_a_token_object() -> None:
    """A fingerprint already under a token key stays; a Token object shows its fingerprint."""
    token = Token(JWT, "Bearer", obtained_at=0.0, expires_at=1800.0, wall_expires_at=1800.0)
    line = log_json(token=token.fingerprint, nested={"access_token": token})
    assert line["token"] == f"sha256:{token.fingerprint}"
    assert line["nested"] == {"access_token": f"sha256:{token.fingerprint}"}


@pytest.mark.parametrize(
    "key",
    ["client_secret", "secret", "Password", "authorization", "key", "http_key", "X-Colt-Broker"],
)
def test_secret_keys_are_redacted(key: str) -> None:
    """Values under secret-like keys become [redacted], at the top level and nested."""
    line = log_json(**{key: "some-value-1234"}, headers={key: "some-value-1234"})
    assert line[key] == "[redacted]"
    assert line["headers"] == {key: "[redacted]"}


def test_ordinary_keys_are_kept() -> None:
    """Keys that only resemble secret names (token_type, token_url, secret_file) are kept."""
    fields = {"token_type": "Bearer", "token_url": "https://x/t", "secret_file": "/etc/s"}
    line = log_json(**fields)
    assert {k: line[k] for k in fields} == fields


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Authorization: Basic bWFkZTp1cA==", "Authorization: Basic [redacted]"),
        ("authorization=basic bWFkZTp1cA==;", "authorization=basic [redacted];"),
        ("{'Authorization': 'Basic bWFkZTp1cA=='}", "{'Authorization': 'Basic [redacted]'}"),
        ("Authorization: Bearer xyz", f"Authorization: Bearer <token sha256:{fingerprint('xyz')}>"),
        (f"Authorization: Bearer {JWT}", f"Authorization: Bearer {JWT_SHOWN}"),
        ('-H "Basic bWFkZTp1cDEyMzQ1Njc4OQ=="', '-H "Basic [redacted]"'),
    ],
)
def test_authorization_credentials_are_redacted(text: str, shown: str) -> None:
    """After an Authorization Basic/Bearer scheme the credential is replaced."""
    assert log_json(note=text)["note"] == shown


def test_prose_about_auth_schemes_is_kept() -> None:
    """Words after 'Basic' or 'Bearer' in prose are not mistaken for credentials."""
    text = "only Basic authentication is supported; Bearer tokens are sent to resources"
    assert redact_text(text) == text


def test_capture_with_redact_shows_no_secret_or_token() -> None:
    """Run through capture_logs with the product's processors, no event holds a secret or JWT."""
    register_secret(SECRET)
    with capture_logs(processors=[structlog.processors.format_exc_info, redact]) as events:
        log.info("token.refreshed", access_token=JWT, note=f"got {JWT}")
        log.warning("upstream.failed", client_secret=SECRET, detail={"body": f"s={SECRET}"})
        raise_and_log(f"{SECRET} {JWT}")
    assert [e["event"] for e in events] == ["token.refreshed", "upstream.failed", "upstream.failed"]
    assert events[0]["access_token"] == f"sha256:{fingerprint(JWT)}"
    for event in events:
        assert SECRET not in repr(event)
        assert JWT not in repr(event)
