"""``colt-broker check``: validate the configuration and secrets; ``--online`` fetches a token."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import httpx

from broker._cli import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from broker._config import Config, find_config_file, load_config, redacted
from broker._upstream import fetch_token
from broker.exceptions import ConfigError, UpstreamError


def check_command(config_path: Path | None, *, online: bool) -> int:
    """Print the resolved settings (secrets redacted) and warnings; exit 2 on a bad config."""
    environ = dict(os.environ)
    try:
        path, config = _load(config_path, environ)
    except ConfigError as exc:
        sys.stderr.write(f"colt-broker: configuration error: {exc}\n")
        return EXIT_USAGE
    sys.stdout.write(json.dumps(redacted(config), indent=2, default=str) + "\n")
    for warning in config.warnings:
        sys.stderr.write(f"colt-broker: warning: {warning}\n")
    count = len(config.profiles)
    profiles = f"{count} profile" + ("" if count == 1 else "s")
    sys.stderr.write(f"colt-broker: configuration OK ({profiles}, {path})\n")
    if not online:
        return EXIT_OK
    return EXIT_OK if anyio.run(_fetch_all, config) else EXIT_UNAVAILABLE


def _load(config_path: Path | None, environ: dict[str, str]) -> tuple[Path, Config]:
    path = find_config_file(config_path, environ)
    if path is None:
        raise ConfigError(
            "no configuration file found: pass --config PATH or set COLT_BROKER_CONFIG "
            "(see config.example.toml)"
        )
    return path, load_config(path, environ=environ)


async def _fetch_all(config: Config) -> bool:
    """One token request per profile; report each outcome without the token itself."""
    ok = True
    async with httpx.AsyncClient(follow_redirects=False) as client:
        for name, profile in config.profiles.items():
            try:
                result = await fetch_token(client, profile)
            except UpstreamError as exc:
                sys.stderr.write(f"colt-broker: profile {name}: FAILED: {exc}\n")
                ok = False
                continue
            token = result.token
            sys.stdout.write(
                f"profile {name}: token sha256:{token.fingerprint} valid {token.lifetime:.0f} s "
                f"(tracking id {result.tracking_id}, {result.duration * 1000:.0f} ms)\n"
            )
    return ok
