"""Jupyter helpers: ``%load_ext broker.jupyter``.

- ``%colt_token [PROFILE] [--min-valid SECONDS] [--show]``: the token as the cell's value. It
  is a ``str``, so it works wherever a token does, but its repr is masked
  (``<token sha256:1a2b3c4d5e6f... valid 29m>``): the saved notebook never holds it. ``--show``
  prints it instead, when you really want it in the output.
- ``%colt_status`` (or ``status_card()``): every profile's state as a small HTML card in a
  notebook, or a plain-text table in a terminal.

This module does not import IPython: it registers its magics on the shell it is handed.
"""

from __future__ import annotations

import argparse
import html
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from broker import _client_tokens as _tokens
from broker._cli_client import render_table
from broker._token import fingerprint
from broker.client import ProfileState, get_token, status

__all__ = ["MaskedToken", "StatusCard", "load_ipython_extension", "status_card"]


class _Shell(Protocol):
    def register_magic_function(
        self, func: Callable[[str], object], magic_kind: str = ..., magic_name: str | None = ...
    ) -> None: ...


def load_ipython_extension(ipython: _Shell) -> None:
    """Register ``%colt_token`` and ``%colt_status`` (called by ``%load_ext broker.jupyter``)."""
    ipython.register_magic_function(colt_token, "line", "colt_token")
    ipython.register_magic_function(colt_status, "line", "colt_status")


class MaskedToken(str):
    """An access token whose repr never shows it; ``str()`` and f-strings give the token."""

    deadline: float | None

    def __new__(cls, token: str, deadline: float | None = None) -> MaskedToken:
        masked = super().__new__(cls, token)
        masked.deadline = deadline
        return masked

    def __repr__(self) -> str:
        left = "" if self.deadline is None else " " + _validity(self.deadline - time.monotonic())
        return f"<token sha256:{fingerprint(str(self))}...{left}>"


def colt_token(line: str) -> MaskedToken | None:
    """``%colt_token [PROFILE] [--min-valid SECONDS] [--show]``."""
    args = _parse_token_args(line)
    token = get_token(args.profile, args.min_valid)
    if args.show:
        print(token)
        return None
    entry = _tokens.ENTRIES.get(args.profile)
    return MaskedToken(token, entry.deadline if entry and entry.token == token else None)


def colt_status(line: str) -> StatusCard:
    """``%colt_status``: the daemon's profiles as a card."""
    if line.strip():
        raise _usage_error("%colt_status takes no arguments")
    return status_card()


def status_card() -> StatusCard:
    """Every profile's state now, as an object a notebook renders as a small HTML card."""
    return StatusCard(tuple(status()), taken_at=time.time())


@dataclass(frozen=True)
class StatusCard:
    """A snapshot of the daemon's profiles: ``_repr_html_`` for notebooks, repr for terminals."""

    profiles: Sequence[ProfileState]
    taken_at: float = field(default_factory=time.time)  # wall time of the snapshot

    def __repr__(self) -> str:
        return render_table([p.as_dict() for p in self.profiles], now=self.taken_at).rstrip()

    def _repr_html_(self) -> str:
        rows = "".join(_html_row(p) for p in self.profiles) or _EMPTY_ROW
        return _CARD.format(rows=rows)


_CARD = (
    '<div style="display:inline-block;border:1px solid #ccc;border-radius:6px;'
    'padding:6px 10px;font-family:sans-serif;font-size:13px">'
    '<div style="font-weight:bold;margin-bottom:4px">colt-broker</div>'
    '<table style="border-collapse:collapse">'
    "<tr><th align=left>profile</th><th align=left>state</th><th align=left>time left</th>"
    "<th align=left>last error</th></tr>{rows}</table></div>"
)
_EMPTY_ROW = '<tr><td colspan="4">no profiles configured</td></tr>'
_COLOURS = {"fresh": "#1a7f37", "refreshing": "#1a7f37", "stale": "#9a6700"}


def _html_row(p: ProfileState) -> str:
    colour = _COLOURS.get(p.state, "#cf222e")
    cells = (
        f"<b>{html.escape(p.profile)}</b>",
        f'<span style="color:{colour}">{html.escape(p.state)}</span>',
        html.escape(_duration(p.expires_in) if p.valid else "no valid token"),
        html.escape(_error_text(p)),
    )
    return "<tr>" + "".join(f'<td style="padding:2px 8px">{c}</td>' for c in cells) + "</tr>"


def _error_text(p: ProfileState) -> str:
    error = p.last_error
    if error is None:
        return "-"
    text = f"{error.kind}: {error.summary}"
    if p.retry_after is not None:
        text += f" (retry in {_duration(p.retry_after)})"
    return text


def _validity(seconds: float) -> str:
    """``valid 29m`` / ``valid 45s`` / ``expired``: coarse, for a token's masked repr."""
    if seconds <= 0:
        return "expired"
    return f"valid {int(seconds // 60)}m" if seconds >= 60 else f"valid {int(seconds)}s"


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "expired"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _parse_token_args(line: str) -> argparse.Namespace:
    parser = _ArgumentParser(prog="%colt_token", add_help=False)
    parser.add_argument("profile", nargs="?", default="default")
    parser.add_argument("--min-valid", type=float, default=60.0)
    parser.add_argument("--show", action="store_true", help="print the token itself")
    return parser.parse_args(shlex.split(line))


class _ArgumentParser(argparse.ArgumentParser):
    # argparse would print and sys.exit(); a magic reports a usage error instead.
    def error(self, message: str) -> NoReturn:
        raise _usage_error(f"{self.prog}: {message}")


def _usage_error(message: str) -> Exception:
    """IPython's UsageError (shown without a traceback) when IPython is there, else ValueError."""
    try:
        from IPython.core.error import UsageError  # only inside IPython
    except ImportError:
        return ValueError(message)
    return UsageError(message)
