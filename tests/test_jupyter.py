"""broker.jupyter in a real (in-process) IPython shell against a real daemon."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from _daemon import InProcessDaemon, in_process_daemon
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from broker._status import LastError, ProfileStatus
from broker.client import clear_cache, get_token
from broker.jupyter import MaskedToken, StatusCard, status_card


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessDaemon]:
    clear_cache()
    with in_process_daemon() as running:
        for name, value in running.environ.items():
            monkeypatch.setenv(name, value)
        yield running
    clear_cache()


@pytest.fixture
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file in the user's ~/.ipython
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "broker.jupyter")
    yield shell
    InteractiveShell.clear_instance()


def _shown(shell: InteractiveShell, value: object) -> dict[str, str]:
    """What a notebook would store for ``value`` as a cell's result: mime type -> text."""
    assert shell.display_formatter is not None
    data, _ = shell.display_formatter.format(value)  # type: ignore[no-untyped-call]  # IPython: untyped
    return {k: v for k, v in data.items() if isinstance(v, str)}


def test_colt_token_returns_the_token_without_showing_it(
    daemon: InProcessDaemon, shell: InteractiveShell
) -> None:
    """`%colt_token` is the token as a str; what a notebook saves is a masked fingerprint."""
    value = shell.run_line_magic("colt_token", "")
    token = get_token()
    assert isinstance(value, MaskedToken)
    assert value == token and str(value) == token and f"Bearer {value}" == f"Bearer {token}"
    assert json.loads(json.dumps(value)) == token
    shown = _shown(shell, value)
    assert all(token not in text for text in shown.values())
    assert shown["text/plain"].startswith("<token sha256:") and "valid 29m" in shown["text/plain"]
    assert token not in repr([value])


def test_colt_token_show_prints_it(
    daemon: InProcessDaemon, shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    """`%colt_token --show` prints the token, on request only, and returns nothing."""
    assert shell.run_line_magic("colt_token", "default --show --min-valid 30") is None
    printed = capsys.readouterr().out.splitlines()  # the in-process daemon logs there too
    assert printed[-1] == get_token()


def test_colt_token_refuses_bad_arguments(shell: InteractiveShell) -> None:
    """A bad option is a UsageError (no traceback in a notebook), not a SystemExit."""
    with pytest.raises(UsageError, match="--min-valid"):
        shell.run_line_magic("colt_token", "--min-valid soon")


def test_colt_status_renders_a_card(daemon: InProcessDaemon, shell: InteractiveShell) -> None:
    """`%colt_status` gives an HTML card and a plain-text table of the daemon's profiles."""
    get_token()  # the daemon holds a token once it has answered
    card = shell.run_line_magic("colt_status", "")
    assert isinstance(card, StatusCard)
    shown = _shown(shell, card)
    assert "<b>default</b>" in shown["text/html"] and "fresh" in shown["text/html"]
    assert re.search(r">(29|30)m \d\ds<", shown["text/html"]), "time left"
    assert shown["text/plain"].splitlines()[0].split()[:2] == ["PROFILE", "STATE"]


def test_status_card_escapes_what_it_shows() -> None:
    """Names and upstream messages are escaped: the card cannot inject markup."""
    error = LastError(kind="throttled", summary="<script>alert(1)</script>", at=0.0)
    state = ProfileStatus(
        profile="<i>p</i>", account="a", state="failed", valid=False, token_fingerprint=None,
        expires_in=None, expires_at=None, last_refresh=None, next_refresh_in=None,
        retry_after=42.0, last_error=error,
    )  # fmt: skip
    page = StatusCard([state])._repr_html_()
    assert "<script>" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page and "no valid token" in page and "retry in 42s" in page


def test_status_card_from_python(daemon: InProcessDaemon) -> None:
    """status_card() works without IPython: one row per profile."""
    card = status_card()
    assert [p.profile for p in card.profiles] == ["default"]
    assert "default" in repr(card)
