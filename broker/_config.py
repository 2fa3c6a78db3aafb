"""Configuration: find the file, layer it with the environment and overrides, load secrets.

Settings resolve as command-line overrides > environment (``COLT_BROKER_`` prefix, ``__`` for
nesting, e.g. ``COLT_BROKER_BROKER__HTTP_PORT=0``) > the TOML file > defaults; the layering is
pydantic-settings' own (see ``_config_model``). What comes out is a frozen ``Config`` of plain
dataclasses: ``BrokerSettings`` for the daemon and one ``broker._profile.ProfileConfig`` per
profile, with [defaults] applied and its secret loaded. Anything wrong raises one
``ConfigError`` that names the key, where it was set, and what is expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_settings import SettingsError

from broker._config_errors import Origin, Problem, config_error, home, problems_from
from broker._config_model import (
    LOAD_INPUTS,
    BrokerModel,
    LoadInputs,
    SettingsModel,
)
from broker._config_profiles import build_profiles
from broker._paths import MAX_SOCKET_PATH, daemon_socket_path
from broker._profile import ProfileConfig
from broker._secrets import NOT_LOADED
from broker.exceptions import ConfigError

SYSTEM_CONFIG_FILE = Path("/etc/colt-broker/config.toml")
CONFIG_ENV = "COLT_BROKER_CONFIG"


@dataclass(frozen=True)
class BrokerSettings:
    """The [broker] table, resolved: where and how the daemon listens and logs."""

    socket_path: Path
    state_dir: Path
    socket_mode: int = 0o660
    socket_group: str = ""  # "" = the daemon's own group
    http_host: str = "127.0.0.1"
    http_port: int = 8787  # 0 = no TCP listener
    http_auth: Literal["key", "none"] = "key"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs, validated; secrets are ``broker._profile.Secret``."""

    broker: BrokerSettings
    profiles: Mapping[str, ProfileConfig] = field(default_factory=lambda: MappingProxyType({}))
    source: Path | None = None  # the TOML file read, if any
    warnings: tuple[str, ...] = ()

    @property
    def default_profile(self) -> str | None:
        """The profile named "default", else the only profile if there is just one, else None."""
        if "default" in self.profiles:
            return "default"
        return next(iter(self.profiles)) if len(self.profiles) == 1 else None


def _first_path(value: str | None) -> Path | None:
    """The first of systemd's ':'-separated directories; XDG says relative ones are ignored."""
    first = (value or "").split(":")[0]
    return Path(first) if first.startswith("/") else None


def default_socket_path(environ: Mapping[str, str]) -> Path:
    """$RUNTIME_DIRECTORY/broker.sock, else $XDG_RUNTIME_DIR/colt-broker/, else /tmp per uid.

    One definition, in ``_paths``, shared with the clients that look for the daemon there.
    """
    return Path(daemon_socket_path(environ))


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY, else $XDG_STATE_HOME/colt-broker, else ~/.local/state/colt-broker."""
    state = _first_path(environ.get("STATE_DIRECTORY"))
    if state is not None:
        return state
    xdg = _first_path(environ.get("XDG_STATE_HOME"))
    return (xdg or home(environ) / ".local" / "state") / "colt-broker"


def find_config_file(
    explicit: Path | None,
    environ: Mapping[str, str],
    *,
    system_file: Path = SYSTEM_CONFIG_FILE,
) -> Path | None:
    """The config file to read: ``explicit``, else $COLT_BROKER_CONFIG, else the user's
    ($XDG_CONFIG_HOME or ~/.config)/colt-broker/config.toml, else /etc/colt-broker/config.toml.

    A file named explicitly (argument or variable) must exist; otherwise None when none does.
    """
    named = explicit or (Path(environ[CONFIG_ENV]) if environ.get(CONFIG_ENV) else None)
    if named is not None:
        if not named.is_file():
            how = "--config" if explicit else f"${CONFIG_ENV}"
            raise ConfigError(f"config file {named} (from {how}) does not exist or is not a file")
        return named
    user_dir = _first_path(environ.get("XDG_CONFIG_HOME")) or home(environ) / ".config"
    for candidate in (user_dir / "colt-broker" / "config.toml", system_file):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    path: Path | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    load_secrets: bool = True,
) -> Config:
    """Read, layer and validate the configuration; raise ConfigError with one clear message.

    ``overrides`` are command-line values, nested (``{"broker": {"http_port": 0}}``) or dotted
    (``{"broker.http_port": 0}``); a ``None`` value means "not given". ``load_secrets=False``
    skips every secret (their source reads "not loaded"), for tools that want only the layout.
    """
    env = os.environ if environ is None else environ
    nested = _nest(overrides or {})
    origin = Origin(path, env, nested)
    model = _validate(path, env, nested, origin)
    if not model.profiles:
        where = path or "the config file (see config.example.toml)"
        raise ConfigError(
            f"no profiles configured: add [profiles.default] with client_id and "
            f"client_secret_file to {where}"
        )
    broker = _broker_settings(model.broker, origin)
    profiles, warnings = build_profiles(model, origin, load_secrets=load_secrets)
    return Config(
        broker=broker,
        profiles=MappingProxyType(profiles),
        source=path,
        warnings=tuple(warnings),
    )


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested dicts; None values (flags not given) dropped."""
    nested: dict[str, Any] = {}
    for key, given in overrides.items():
        value = (_nest(given) or None) if isinstance(given, Mapping) else given
        if value is None:
            continue
        *parents, last = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return nested


def _validate(
    path: Path | None, environ: Mapping[str, str], overrides: dict[str, Any], origin: Origin
) -> SettingsModel:
    unknown = sorted(set(overrides) - set(SettingsModel.model_fields))
    if unknown:
        raise ConfigError(f"unknown override {unknown[0]!r}: expected broker, defaults, profiles")
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    token = LOAD_INPUTS.set(LoadInputs(path, environ))
    try:
        return SettingsModel(**overrides)
    except ValidationError as exc:
        # from None: pydantic's own text (which echoes values) must not ride along.
        raise config_error(problems_from(exc), origin) from None
    except SettingsError as exc:
        raise _json_error(exc, origin) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    finally:
        LOAD_INPUTS.reset(token)


def _json_error(exc: SettingsError, origin: Origin) -> ConfigError:
    """pydantic-settings could not decode an environment variable holding a table or list."""
    found = re.search(r'field "([^"]+)"', str(exc))
    variable = origin.env_variable([found.group(1)]) if found else None
    if variable is None:
        return ConfigError(f"invalid configuration: {exc}")
    return ConfigError(
        f"invalid configuration: environment variable {variable} must hold JSON for a table "
        f"or list ({exc.__cause__}); or set one key per variable, e.g. {variable}__KEY=value"
    )


def _broker_settings(model: BrokerModel, origin: Origin) -> BrokerSettings:
    socket_path = origin.resolve_path(model.socket_path, ("broker", "socket_path"))
    socket_path = socket_path or default_socket_path(origin.environ)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        problem = Problem(
            ("broker", "socket_path"),
            f"{socket_path} is longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket",
            "a shorter path",
        )
        raise config_error([problem], origin)
    state_dir = origin.resolve_path(model.state_dir, ("broker", "state_dir"))
    return BrokerSettings(
        socket_path=socket_path,
        state_dir=state_dir or default_state_dir(origin.environ),
        socket_mode=int(model.socket_mode, 8),
        socket_group=model.socket_group,
        http_host=model.http_host,
        http_port=model.http_port,
        http_auth=model.http_auth,
        log_format=model.log_format,
        log_level=model.log_level,
    )


def redacted(config: Config) -> dict[str, Any]:
    """The resolved settings as plain JSON-able data for ``colt-broker check``; no secret."""
    broker = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.broker).items()}
    broker["socket_mode"] = f"{config.broker.socket_mode:04o}"
    return {
        "source": str(config.source) if config.source else None,
        "broker": broker,
        "default_profile": config.default_profile,
        "profiles": {name: _redacted_profile(p) for name, p in config.profiles.items()},
        "warnings": list(config.warnings),
    }


def _redacted_profile(profile: ProfileConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        f.name: getattr(profile, f.name)
        for f in fields(profile)
        if f.name not in ("secret", "name")
    }
    for key in ("allowed_uids", "allowed_gids"):
        data[key] = None if data[key] is None else sorted(data[key])
    source = profile.secret.source
    data["client_secret"] = "<not loaded>" if source == NOT_LOADED else f"<redacted, from {source}>"
    return data
