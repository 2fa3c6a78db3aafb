"""The ``colt-broker`` command line: serve, token, status, check.

Exit codes: 0 ok, 2 usage or configuration error, 69 (EX_UNAVAILABLE) daemon or token
unavailable. ``token`` and ``status`` import only the standard library: they run inside
``$(...)`` in shell loops. ``serve`` and ``check`` import the daemon's machinery lazily.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost `token` ~3 ms of start-up
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69


def build_parser() -> argparse.ArgumentParser:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="colt-broker",
        description="Keeps one valid Colt API token per profile and serves it locally.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="run against an embedded Colt emulator with made-up credentials",
    )
    token = sub.add_parser("token", help="print a current access token")
    token.add_argument("profile", nargs="?", default=None, help="profile name (default: default)")
    token.add_argument(
        "--min-valid",
        type=float,
        metavar="SECONDS",
        help="the token must stay valid at least this long",
    )
    token.add_argument("--json", action="store_true", help="print the JSON document")
    status = sub.add_parser("status", help="every profile's state (never a token)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser("check", help="validate configuration and secret files")
    check.add_argument("--config", type=Path, help="TOML configuration file")
    check.add_argument("--online", action="store_true", help="also fetch one token per profile")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``colt-broker`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = _token_args(argv)
    if quick is not None:
        from broker._cli_client import token_command

        return token_command(quick[0], quick[1], as_json=quick[2])
    args = build_parser().parse_args(argv)
    if args.command == "token":
        from broker._cli_client import token_command

        return token_command(args.profile, args.min_valid, as_json=args.json)
    if args.command == "status":
        from broker._cli_client import status_command

        return status_command(as_json=args.json)
    if args.command == "check":
        from broker._cli_check import check_command

        return check_command(args.config, online=args.online)
    from broker._daemon import serve_command

    return serve_command(args.config, demo=args.demo)


def _token_args(argv: list[str]) -> tuple[str | None, float | None, bool] | None:
    """``token [PROFILE] [--min-valid S] [--json]`` without argparse, whose import alone costs
    a quarter of the command's start-up; anything unusual (help, errors) goes to argparse."""
    if not argv or argv[0] != "token":
        return None
    profile: str | None = None
    min_valid: float | None = None
    as_json = False
    rest = iter(argv[1:])
    for arg in rest:
        if arg == "--json":
            as_json = True
        elif arg == "--min-valid" or arg.startswith("--min-valid="):
            value = arg.partition("=")[2] or next(rest, "")
            try:
                min_valid = float(value)
            except ValueError:
                return None
        elif arg.startswith("-") or profile is not None:
            return None
        else:
            profile = arg
    return profile, min_valid, as_json


def run() -> None:
    """``python -m broker``."""
    sys.exit(main())
