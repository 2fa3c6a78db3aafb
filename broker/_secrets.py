"""Reading a profile's client secret from the most trustworthy place that has one.

In order of preference: a systemd credential (``$CREDENTIALS_DIRECTORY/<profile>``, put
there by ``LoadCredential=``), a file named by ``client_secret_file`` (refused when group or
world readable), an environment variable named by ``client_secret_env``, and last a literal
``client_secret`` in the configuration, which works but earns a warning.

Every error names the profile, the key and the file or variable, never the secret: messages
are built here from paths and names only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker._profile import Secret
from broker.exceptions import ConfigError

NOT_LOADED = "not loaded"


@dataclass(frozen=True)
class SecretSources:
    """Where one profile's configuration says its secret may be found."""

    profile: str
    file: Path | None = None
    env: str | None = None
    literal: str | None = None


def not_loaded() -> Secret:
    """The placeholder secret of ``load_config(load_secrets=False)``."""
    return Secret("", NOT_LOADED)


def literal_warning(profile: str, where: str) -> str:
    """The warning for a secret given as a value (``where``: "in FILE", "set by ...")."""
    return (
        f"profiles.{profile}.client_secret: the secret itself is configured ({where}); "
        "move it to a file of mode 0600 named by client_secret_file, or a systemd credential"
    )


def load_secret(sources: SecretSources, environ: Mapping[str, str]) -> Secret:
    """The profile's secret from its most preferred source; ConfigError if none works."""
    credential = _credential_path(sources.profile, environ)
    if credential is not None:
        where = f"systemd credential {credential}"
        return _read_file(credential, f"profiles.{sources.profile}: {where}", where)
    if sources.file is not None:
        return _from_file(sources.profile, sources.file)
    if sources.env is not None:
        return _from_env(sources.profile, sources.env, environ)
    if sources.literal is not None:
        return _from_literal(sources.profile, sources.literal)
    raise ConfigError(
        f"profiles.{sources.profile}: no client secret: set client_secret_file (a file of mode "
        f"0600 holding only the secret) or client_secret_env, or provide a systemd credential "
        f"named {sources.profile!r} (LoadCredential={sources.profile}:/path/to/secret)"
    )


def _credential_path(profile: str, environ: Mapping[str, str]) -> Path | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / profile
    return path if path.exists() else None


def _from_file(profile: str, path: Path) -> Secret:
    label = f"profiles.{profile}.client_secret_file: {path}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read ({exc.strerror})") from None
    if stat.S_ISREG(mode) and mode & 0o044:
        raise ConfigError(
            f"{label} is readable by group or others (mode {stat.S_IMODE(mode):04o}), "
            f"so it is refused; fix: chmod 600 {path}"
        )
    return _read_file(path, label, f"file {path}")


def _read_file(path: Path, label: str, where: str) -> Secret:
    """The stripped text of a secret file; ``label`` names it in errors, ``where`` in Secret."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{label} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(
            f"{label} cannot be read by uid {os.geteuid()} ({exc.strerror})"
        ) from None
    try:
        # A trailing newline (echo secret > file) is never part of a Colt secret.
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{label} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{label} is empty: write the secret into it")
    return Secret(value, where)


def _from_env(profile: str, name: str, environ: Mapping[str, str]) -> Secret:
    value = environ.get(name, "").strip()
    if not value:
        state = "is empty" if name in environ else "is not set"
        raise ConfigError(
            f"profiles.{profile}.client_secret_env: environment variable {name} {state}: "
            f"export {name} in the daemon's environment, or use client_secret_file"
        )
    return Secret(value, f"environment variable {name}")


def _from_literal(profile: str, value: str) -> Secret:
    if not value.strip():
        raise ConfigError(f"profiles.{profile}.client_secret: is empty")
    return Secret(value.strip(), "client_secret in the configuration")
