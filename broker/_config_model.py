"""The configuration schema: what may be written in the TOML file and the environment.

These pydantic models check one value at a time (type, range, shape). Checks that need
several values together (a profile's effective refresh_ahead + refresh_jitter, "no profiles")
and the secrets themselves belong to ``_config.py``, which turns these models into the frozen
``Config`` the rest of the broker uses. Each field's ``description`` is the hint an error
message ends with, so it reads as "what is expected" for an operator.

Layering is pydantic-settings' own: ``settings_customise_sources`` puts command-line overrides
(init kwargs) above the environment above the TOML file above these defaults, and
pydantic-settings deep-merges them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

from broker._loopback import is_loopback_address

ENV_PREFIX = "COLT_BROKER_"
ENV_DELIMITER = "__"

_PROFILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OCTAL_MODE = re.compile(r"0?[0-7]{3}")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

Fraction = Annotated[float, Field(gt=0, lt=1)]
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
Cap = Annotated[int, Field(ge=1)]
Id = Annotated[int, Field(ge=0)]
Environment = Literal["production", "sandbox"]


def is_loopback_url_host(host: str) -> bool:
    """A plain-http token URL may go to "localhost" or a loopback address (the emulator)."""
    return host.lower() == "localhost" or is_loopback_address(host)


class _Strict(BaseModel):
    """A table of the file: unknown keys are errors, so typos cannot pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerModel(_Strict):
    """The [broker] table."""

    socket_path: Path | None = Field(
        default=None, description="a path for the Unix socket (default: see config.example.toml)"
    )
    socket_mode: str = Field(default="0660", description='an octal mode string such as "0660"')
    socket_group: str = Field(default="", description='a group name, or "" for the daemon\'s own')
    http_host: str = Field(
        default="127.0.0.1", description='a loopback address: "127.0.0.1" or "::1"'
    )
    http_port: int = Field(
        default=8787, ge=0, le=65535, description="a TCP port 1-65535, or 0 for none"
    )
    http_auth: Literal["key", "none"] = Field(default="key", description='"key" or "none"')
    state_dir: Path | None = Field(default=None, description="a directory for persisted tokens")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description='"auto", "json" or "console"'
    )
    log_level: str = Field(default="info", description="one of " + ", ".join(LOG_LEVELS))

    @field_validator("socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        if not _OCTAL_MODE.fullmatch(value):
            raise ValueError("is not an octal mode string")
        return value

    @field_validator("http_host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if not is_loopback_address(value):
            raise ValueError(
                f"{value!r} is not a loopback address such as 127.0.0.1 or ::1 "
                "(tokens must stay local; a name is not resolved)"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level")
        return value.lower()

    @field_validator("socket_path", "state_dir", mode="before")
    @classmethod
    def _non_empty_path(cls, value: object) -> object:
        if value == "":
            raise ValueError("must not be empty (leave the key out for the default)")
        return value


_DOC_MIN_VALID = "seconds, 0 or more (default 60)"
_DOC_AHEAD = "a fraction of the token lifetime, between 0 and 1 exclusive (default 0.2)"
_DOC_JITTER = "a fraction of the token lifetime, between 0 and 1 exclusive (default 0.05)"
_DOC_TIMEOUT = "seconds, more than 0 (default 10)"
_DOC_HEADER = 'an HTTP header name (default "APIGWTrackingId")'
_DOC_PER_MINUTE = "a whole number, 1 or more (default 6)"
_DOC_PER_DAY = "a whole number, 1 or more (default 500)"
_DOC_ENVIRONMENT = '"production" or "sandbox"'


class DefaultsModel(_Strict):
    """The [defaults] table: every key may be overridden per profile."""

    environment: Environment = Field(default="production", description=_DOC_ENVIRONMENT)
    min_valid: Seconds = Field(default=60.0, description=_DOC_MIN_VALID)
    refresh_ahead: Fraction = Field(default=0.2, description=_DOC_AHEAD)
    refresh_jitter: Fraction = Field(default=0.05, description=_DOC_JITTER)
    upstream_timeout: PositiveSeconds = Field(default=10.0, description=_DOC_TIMEOUT)
    tracking_header: str = Field(default="APIGWTrackingId", description=_DOC_HEADER)
    max_requests_per_minute: Cap = Field(default=6, description=_DOC_PER_MINUTE)
    max_requests_per_day: Cap = Field(default=500, description=_DOC_PER_DAY)

    @field_validator("tracking_header")
    @classmethod
    def _header(cls, value: str) -> str:
        _check_header(value)
        return value


def _check_header(value: str | None) -> str | None:
    if value is not None and not _HEADER_TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


def _check_not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class ProfileModel(_Strict):
    """One [profiles.NAME] table. ``None`` in an override field means "take [defaults]"."""

    client_id: str = Field(description="the Colt CLIENT_ID, a non-empty string")
    client_secret_file: Path | None = Field(
        default=None, description="a file holding only the secret, mode 0600"
    )
    client_secret_env: str | None = Field(default=None, description="an environment variable name")
    client_secret: SecretStr | None = Field(
        default=None, description="the secret itself (discouraged: prefer client_secret_file)"
    )
    account: str = Field(
        default="default", description="a name shared by profiles of one Colt account"
    )
    token_url: str | None = Field(
        default=None, description="an https:// URL (http:// only for a loopback host)"
    )
    scope: str | None = Field(
        default=None, description="an OAuth2 scope string; leave out to send none"
    )
    allowed_uids: list[Id] | None = Field(
        default=None, description="a list of user ids, e.g. [1000]"
    )
    allowed_gids: list[Id] | None = Field(
        default=None, description="a list of group ids, e.g. [1000]"
    )
    environment: Environment | None = Field(default=None, description=_DOC_ENVIRONMENT)
    min_valid: Seconds | None = Field(default=None, description=_DOC_MIN_VALID)
    refresh_ahead: Fraction | None = Field(default=None, description=_DOC_AHEAD)
    refresh_jitter: Fraction | None = Field(default=None, description=_DOC_JITTER)
    upstream_timeout: PositiveSeconds | None = Field(default=None, description=_DOC_TIMEOUT)
    tracking_header: str | None = Field(default=None, description=_DOC_HEADER)
    max_requests_per_minute: Cap | None = Field(default=None, description=_DOC_PER_MINUTE)
    max_requests_per_day: Cap | None = Field(default=None, description=_DOC_PER_DAY)

    _not_blank = field_validator("client_id", "account", "scope")(_check_not_blank)
    _header = field_validator("tracking_header")(_check_header)

    @field_validator("client_secret_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            check_token_url(value)
        return value


def check_token_url(url: str) -> None:
    """Raise ValueError unless ``url`` is https, or http to a loopback host (the emulator)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.scheme == "http" and not is_loopback_url_host(parts.hostname):
        raise ValueError(f"{url!r}: plain http is only allowed to a loopback host; use https")


@dataclass(frozen=True)
class LoadInputs:
    """What one ``load_config`` call reads: handed to the sources through a context variable,
    because pydantic-settings builds them in a classmethod that takes no arguments of ours."""

    toml_file: Path | None
    environ: Mapping[str, str]


LOAD_INPUTS: ContextVar[LoadInputs] = ContextVar("LOAD_INPUTS")


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class SettingsModel(BaseSettings):
    """The whole file: [broker], [defaults] and the [profiles.NAME] tables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid", frozen=True
    )

    broker: BrokerModel = BrokerModel()  # frozen, so one shared default instance is safe
    defaults: DefaultsModel = DefaultsModel()
    profiles: dict[str, ProfileModel] = Field(default_factory=dict)

    @field_validator("profiles", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        # Before the tables themselves: a bad name is the first thing to fix.
        for name in value if isinstance(value, Mapping) else ():
            if not _PROFILE_NAME.fullmatch(str(name)) or not str(name).strip("."):
                raise ValueError(
                    f"profile name {name!r} may only use letters, digits, '_', '.' and '-' "
                    "(and not only dots): it goes into URLs"
                )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides (init kwargs) > environment > TOML file; model defaults come last."""
        inputs = LOAD_INPUTS.get()
        return (
            init_settings,
            _MappingEnvSource(settings_cls, inputs.environ),
            TomlConfigSettingsSource(settings_cls, toml_file=inputs.toml_file),
        )


def _table(loc: tuple[str | int, ...]) -> tuple[type[BaseModel] | None, int]:
    """The model of the table ``loc`` points into, and the index of the key within ``loc``."""
    if loc[:1] == ("profiles",):
        return (ProfileModel, 2) if len(loc) >= 3 else (None, 1)
    tables: dict[str, type[BaseModel]] = {"broker": BrokerModel, "defaults": DefaultsModel}
    table = tables.get(str(loc[0])) if loc else None
    return (table, 1) if table else (SettingsModel, 0)


def field_description(loc: tuple[str | int, ...]) -> str | None:
    """What the key at ``loc`` (a pydantic error location) expects, for an error's hint."""
    table, index = _table(loc)
    info = table.model_fields.get(str(loc[index])) if table and len(loc) > index else None
    return info.description if info else None


def known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The keys allowed beside the key at ``loc``, for "did you mean"."""
    table, _ = _table(loc)
    return list(table.model_fields) if table else []
