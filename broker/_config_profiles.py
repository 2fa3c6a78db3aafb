"""From validated [profiles.NAME] tables to ``ProfileConfig``: defaults applied, secret loaded.

Also the checks that span several values (a profile's effective refresh_ahead + jitter) and
the warnings the operator should see (a secret written in the file, an account with more
client ids than Colt allows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from broker._config_errors import Origin, Problem, config_error
from broker._config_model import DefaultsModel, ProfileModel, SettingsModel
from broker._profile import TOKEN_URLS, ProfileConfig, Secret
from broker._secrets import SecretSources, literal_warning, load_secret, not_loaded
from broker.exceptions import ConfigError

COLT_MAX_CLIENT_IDS = 5  # per company account, says Colt's developer portal


def build_profiles(
    model: SettingsModel, origin: Origin, *, load_secrets: bool
) -> tuple[dict[str, ProfileConfig], list[str]]:
    """Every profile resolved, and the warnings to show; ConfigError on the first kind of error."""
    problems = [
        p for name, prof in model.profiles.items() for p in _sum_problems(name, prof, model)
    ]
    if problems:
        raise config_error(_unique(problems), origin)
    secrets = _secrets(model, origin) if load_secrets else {n: not_loaded() for n in model.profiles}
    profiles = {
        name: _resolve(name, prof, model.defaults, secrets[name])
        for name, prof in model.profiles.items()
    }
    literal = [
        literal_warning(name, origin.of(("profiles", name, "client_secret")))
        for name, profile in model.profiles.items()
        if profile.client_secret is not None
    ]
    return profiles, literal + account_warnings(profiles.values())


def _effective(profile: ProfileModel, defaults: DefaultsModel, key: str) -> Any:
    value = getattr(profile, key)
    return getattr(defaults, key) if value is None else value


def _sum_problems(name: str, profile: ProfileModel, model: SettingsModel) -> list[Problem]:
    """refresh_ahead + refresh_jitter may reach the end of a token's life: refuse it."""
    ahead = _effective(profile, model.defaults, "refresh_ahead")
    jitter = _effective(profile, model.defaults, "refresh_jitter")
    if ahead + jitter < 1:
        return []
    own = [k for k in ("refresh_ahead", "refresh_jitter") if getattr(profile, k) is not None]
    loc = ("profiles", name, own[0]) if own else ("defaults", "refresh_ahead")
    text = f"refresh_ahead + refresh_jitter ({ahead:g} + {jitter:g}) must stay below 1"
    return [Problem(loc, text, "a smaller refresh_ahead or refresh_jitter")]


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    """One problem per key: profiles inheriting the same bad [defaults] repeat it."""
    first: dict[tuple[str | int, ...], Problem] = {}
    for problem in problems:
        first.setdefault(problem.loc, problem)
    return list(first.values())


def _secrets(model: SettingsModel, origin: Origin) -> dict[str, Secret]:
    """Every profile's secret; the errors of all profiles together, so one run shows them all."""
    secrets: dict[str, Secret] = {}
    errors: list[str] = []
    for name, profile in model.profiles.items():
        try:
            secrets[name] = load_secret(_sources(name, profile, origin), origin.environ)
        except ConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("\n".join([f"{len(errors)} profiles have no usable secret:", *errors]))
    return secrets


def _sources(name: str, profile: ProfileModel, origin: Origin) -> SecretSources:
    loc = ("profiles", name, "client_secret_file")
    literal = profile.client_secret
    return SecretSources(
        profile=name,
        file=origin.resolve_path(profile.client_secret_file, loc),
        env=profile.client_secret_env,
        literal=literal.get_secret_value() if literal is not None else None,
    )


def _resolve(
    name: str, profile: ProfileModel, defaults: DefaultsModel, secret: Secret
) -> ProfileConfig:
    def pick(key: str) -> Any:
        return _effective(profile, defaults, key)

    return ProfileConfig(
        name=name,
        client_id=profile.client_id,
        secret=secret,
        token_url=profile.token_url or TOKEN_URLS[pick("environment")],
        account=profile.account,
        min_valid=float(pick("min_valid")),
        refresh_ahead=float(pick("refresh_ahead")),
        refresh_jitter=float(pick("refresh_jitter")),
        upstream_timeout=float(pick("upstream_timeout")),
        tracking_header=pick("tracking_header"),
        scope=profile.scope,
        max_requests_per_minute=pick("max_requests_per_minute"),
        max_requests_per_day=pick("max_requests_per_day"),
        allowed_uids=_ids(profile.allowed_uids),
        allowed_gids=_ids(profile.allowed_gids),
    )


def _ids(values: list[int] | None) -> frozenset[int] | None:
    return None if values is None else frozenset(values)


def account_warnings(profiles: Iterable[ProfileConfig]) -> list[str]:
    """A warning per account whose profiles use more client ids than Colt allows."""
    ids: defaultdict[str, set[str]] = defaultdict(set)
    names: defaultdict[str, list[str]] = defaultdict(list)
    for profile in profiles:
        ids[profile.account].add(profile.client_id)
        names[profile.account].append(profile.name)
    return [
        f"account {account!r} has {len(ids[account])} distinct client ids (profiles "
        f"{', '.join(sorted(names[account]))}); Colt allows {COLT_MAX_CLIENT_IDS} per company "
        'account: set account = "..." per company, or check for a typo'
        for account in sorted(ids)
        if len(ids[account]) > COLT_MAX_CLIENT_IDS
    ]
