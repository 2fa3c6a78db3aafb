"""Configuration: layering, validation messages, defaults, paths and the example file."""

from __future__ import annotations

import json
import os
import re
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from broker._config import (
    BrokerSettings,
    Config,
    default_socket_path,
    default_state_dir,
    find_config_file,
    load_config,
    redacted,
)
from broker._config_model import BrokerModel, DefaultsModel, ProfileModel
from broker._profile import TOKEN_URLS
from broker.exceptions import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
SECRET = "env-secret-Zq81"
ENV = {"TEST_SECRET": SECRET}
PROFILE = '[profiles.default]\nclient_id = "id-1"\nclient_secret_env = "TEST_SECRET"\n'


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def profile_with(line: str) -> str:
    """[profiles.default] with ``line`` replacing or adding to its two usual keys."""
    base = {"client_id": '"id-1"', "client_secret_env": '"TEST_SECRET"'}
    base.pop(line.partition("=")[0].strip(), None)
    return "[profiles.default]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + line


def load(
    tmp_path: Path,
    text: str,
    environ: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Config:
    return load_config(write(tmp_path, text), environ={**ENV, **(environ or {})}, **kwargs)


def error_of(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    return str(info.value)


# --- layering ---------------------------------------------------------------------------


def test_toml_values_are_read(tmp_path: Path) -> None:
    """Values in the TOML file replace the defaults."""
    config = load(tmp_path, "[broker]\nhttp_port = 1234\nsocket_mode = '0600'\n" + PROFILE)
    assert config.broker.http_port == 1234
    assert config.broker.socket_mode == 0o600
    assert config.source == tmp_path / "config.toml"


def test_environment_beats_toml(tmp_path: Path) -> None:
    """COLT_BROKER_BROKER__HTTP_PORT wins over [broker] http_port in the file."""
    env = {"COLT_BROKER_BROKER__HTTP_PORT": "0", "COLT_BROKER_DEFAULTS__MIN_VALID": "30"}
    config = load(
        tmp_path, "[broker]\nhttp_port = 1234\n[defaults]\nmin_valid = 90\n" + PROFILE, env
    )
    assert config.broker.http_port == 0
    assert config.profiles["default"].min_valid == 30


@pytest.mark.parametrize(
    "overrides",
    [{"broker": {"http_port": 4321}}, {"broker.http_port": 4321}],
    ids=["nested", "dotted"],
)
def test_overrides_beat_environment(tmp_path: Path, overrides: dict[str, Any]) -> None:
    """Command-line overrides win over the environment and the file."""
    env = {"COLT_BROKER_BROKER__HTTP_PORT": "0"}
    config = load(tmp_path, "[broker]\nhttp_port = 1234\n" + PROFILE, env, overrides=overrides)
    assert config.broker.http_port == 4321


def test_none_override_means_not_given(tmp_path: Path) -> None:
    """An override of None (a flag not given) leaves the lower layers in charge."""
    config = load(
        tmp_path,
        "[broker]\nhttp_port = 1234\n" + PROFILE,
        overrides={"broker": {"http_port": None}},
    )
    assert config.broker.http_port == 1234


def test_unknown_override_is_an_error(tmp_path: Path) -> None:
    """An override outside broker/defaults/profiles is refused, not passed to pydantic."""
    with pytest.raises(ConfigError, match="unknown override '_env_prefix'"):
        load(tmp_path, PROFILE, overrides={"_env_prefix": "X_"})


def test_environment_merges_into_a_file_profile(tmp_path: Path) -> None:
    """COLT_BROKER_PROFILES__DEFAULT__CLIENT_ID changes one key of a profile from the file."""
    config = load(tmp_path, PROFILE, {"COLT_BROKER_PROFILES__DEFAULT__CLIENT_ID": "from-env"})
    assert config.profiles["default"].client_id == "from-env"
    assert config.profiles["default"].secret.reveal() == SECRET


def test_environment_alone_can_configure_a_profile() -> None:
    """With no file at all, the environment can define a whole profile."""
    env = {
        **ENV,
        "COLT_BROKER_PROFILES__LAB__CLIENT_ID": "lab-id",
        "COLT_BROKER_PROFILES__LAB__CLIENT_SECRET_ENV": "TEST_SECRET",
        "COLT_BROKER_PROFILES__LAB__ALLOWED_UIDS": "[1000, 1001]",
    }
    config = load_config(None, environ=env)
    assert config.source is None
    assert config.profiles["lab"].allowed_uids == frozenset({1000, 1001})
    assert config.default_profile == "lab"


def test_process_environment_is_not_read_when_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit environ is the only environment consulted."""
    monkeypatch.setenv("COLT_BROKER_BROKER__HTTP_PORT", "1")
    assert load(tmp_path, PROFILE).broker.http_port == 8787


def test_client_variables_are_not_settings(tmp_path: Path) -> None:
    """COLT_BROKER_CONFIG, _SOCKET and _URL (read by clients) are not taken as unknown keys."""
    env = {
        "COLT_BROKER_CONFIG": "/elsewhere.toml",
        "COLT_BROKER_SOCKET": "/run/x.sock",
        "COLT_BROKER_URL": "http://127.0.0.1:1",
    }
    assert load(tmp_path, PROFILE, env).broker.http_port == 8787


def test_bad_json_in_a_table_variable_names_the_variable(tmp_path: Path) -> None:
    """A whole table set from one variable must be JSON; the error names the variable."""
    message = error_of(tmp_path, PROFILE, {"COLT_BROKER_BROKER": "{not json"})
    assert "environment variable COLT_BROKER_BROKER must hold JSON" in message


def test_defaults_apply_to_profiles_that_do_not_override(tmp_path: Path) -> None:
    """[defaults] keys reach every profile unless the profile sets its own."""
    text = f"""
        [defaults]
        min_valid = 30
        upstream_timeout = 2.5
        environment = "sandbox"
        max_requests_per_day = 50
        {PROFILE}
        [profiles.fast]
        client_id = "id-2"
        client_secret_env = "TEST_SECRET"
        min_valid = 5
        environment = "production"
        """
    config = load(tmp_path, text)
    default, fast = config.profiles["default"], config.profiles["fast"]
    assert (default.min_valid, default.upstream_timeout, default.max_requests_per_day) == (
        30,
        2.5,
        50,
    )
    assert default.token_url == TOKEN_URLS["sandbox"]
    assert (fast.min_valid, fast.token_url) == (5, TOKEN_URLS["production"])


def test_token_url_overrides_environment(tmp_path: Path) -> None:
    """An explicit token_url (http to loopback: the emulator) beats environment."""
    text = PROFILE + 'environment = "sandbox"\ntoken_url = "http://127.0.0.1:9/token"\n'
    assert load(tmp_path, text).profiles["default"].token_url == "http://127.0.0.1:9/token"


def test_profile_keys_reach_profile_config(tmp_path: Path) -> None:
    """account, scope and the uid/gid allow lists come through as typed values."""
    text = (
        PROFILE + 'account = "acme"\nscope = "read"\nallowed_uids = [0, 1000]\nallowed_gids = []\n'
    )
    profile = load(tmp_path, text).profiles["default"]
    assert (profile.account, profile.scope) == ("acme", "read")
    assert profile.allowed_uids == frozenset({0, 1000})
    assert profile.allowed_gids == frozenset()


# --- validation -------------------------------------------------------------------------

INVALID = [
    ("[broker]\nbogus = 1\n", "broker.bogus", "unknown key"),
    ("[brokr]\nhttp_port = 1\n", "brokr", "did you mean 'broker'"),
    ("[broker]\nhttp_port = 'abc'\n", "broker.http_port", "must be a whole number"),
    ("[broker]\nhttp_port = 70000\n", "broker.http_port", "65535 or less"),
    ("[broker]\nhttp_port = -1\n", "broker.http_port", "0 or more"),
    ("[broker]\nhttp_host = '0.0.0.0'\n", "broker.http_host", "not a loopback address"),
    ("[broker]\nhttp_host = '10.1.2.3'\n", "broker.http_host", "not a loopback address"),
    ("[broker]\nhttp_host = 'example.com'\n", "broker.http_host", "not a loopback address"),
    ("[broker]\nhttp_auth = 'basic'\n", "broker.http_auth", "'key' or 'none'"),
    ("[broker]\nsocket_mode = 'rw'\n", "broker.socket_mode", "not an octal mode string"),
    ("[broker]\nsocket_mode = '0999'\n", "broker.socket_mode", "not an octal mode string"),
    ("[broker]\nsocket_mode = 432\n", "broker.socket_mode", "must be a string"),
    ("[broker]\nlog_format = 'xml'\n", "broker.log_format", "must be 'auto', 'json' or 'console'"),
    ("[broker]\nlog_level = 'loud'\n", "broker.log_level", "not a log level"),
    ("[broker]\nstate_dir = ''\n", "broker.state_dir", "must not be empty"),
    ("[defaults]\nrefresh_ahead = 0\n", "defaults.refresh_ahead", "more than 0"),
    ("[defaults]\nrefresh_ahead = 1\n", "defaults.refresh_ahead", "less than 1"),
    ("[defaults]\nrefresh_jitter = 0\n", "defaults.refresh_jitter", "more than 0"),
    ("[defaults]\nrefresh_jitter = 1.5\n", "defaults.refresh_jitter", "less than 1"),
    (
        "[defaults]\nrefresh_ahead = 0.7\nrefresh_jitter = 0.3\n",
        "defaults.refresh_ahead",
        "below 1",
    ),
    ("[defaults]\nmin_valid = -1\n", "defaults.min_valid", "0 or more"),
    ("[defaults]\nupstream_timeout = 0\n", "defaults.upstream_timeout", "more than 0"),
    ("[defaults]\nmax_requests_per_minute = 0\n", "defaults.max_requests_per_minute", "1 or more"),
    ("[defaults]\nmax_requests_per_day = 0.5\n", "defaults.max_requests_per_day", "whole number"),
    ("[defaults]\nenvironment = 'prod'\n", "defaults.environment", "'production' or 'sandbox'"),
    ("[defaults]\ntracking_header = 'a b'\n", "defaults.tracking_header", "header name"),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), INVALID, ids=[i[1] + ":" + i[2] for i in INVALID]
)
def test_invalid_value_names_key_file_and_problem(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    """Each bad value is one ConfigError naming the dotted key, the file and what is wrong."""
    message = error_of(tmp_path, text + PROFILE)
    assert f"{key}:" in message
    assert fragment in message
    assert str(tmp_path / "config.toml") in message


PROFILE_INVALID = [
    ("client_id = ''\n", "profiles.default.client_id", "must not be empty"),
    ("token_url = 'http://example.com/token'\n", "profiles.default.token_url", "use https"),
    ("token_url = 'ftp://127.0.0.1/token'\n", "profiles.default.token_url", "not an http(s) URL"),
    ("allowed_uids = [-1]\n", "profiles.default.allowed_uids[0]", "0 or more"),
    ("allowed_gids = 'wheel'\n", "profiles.default.allowed_gids", "must be a list"),
    ("refresh_jitter = 0.9\n", "profiles.default.refresh_jitter", "(0.2 + 0.9) must stay below 1"),
    (
        "client_secret_env = 'A-B'\n",
        "profiles.default.client_secret_env",
        "not an environment variable",
    ),
    ("scope = ' '\n", "profiles.default.scope", "must not be empty"),
    ("max_requests_per_minute = 0\n", "profiles.default.max_requests_per_minute", "1 or more"),
    (
        "client_secret_fiel = '/x'\n",
        "profiles.default.client_secret_fiel",
        "did you mean 'client_secret_file'",
    ),
]


@pytest.mark.parametrize(
    ("line", "key", "fragment"), PROFILE_INVALID, ids=[i[1] for i in PROFILE_INVALID]
)
def test_invalid_profile_value_names_key(
    tmp_path: Path, line: str, key: str, fragment: str
) -> None:
    """A bad key inside [profiles.NAME] is named with the profile, e.g. profiles.default.x."""
    message = error_of(tmp_path, profile_with(line))
    assert f"{key}:" in message
    assert fragment in message


def test_missing_client_id_is_named(tmp_path: Path) -> None:
    """A profile without client_id says the key is required."""
    message = error_of(tmp_path, "[profiles.default]\nclient_secret_env = 'TEST_SECRET'\n")
    assert "profiles.default.client_id: is required" in message


@pytest.mark.parametrize("name", ["a b", "x/y", "..", "tëst"])
def test_profile_name_must_be_url_safe(tmp_path: Path, name: str) -> None:
    """Profile names go into URLs: only letters, digits, '_', '.', '-', and not only dots."""
    message = error_of(
        tmp_path, f'[profiles."{name}"]\nclient_id = "x"\nclient_secret_env = "TEST_SECRET"\n'
    )
    assert f"profile name {name!r}" in message


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        ("http_host = '::1'", "::1"),
        ("http_host = '127.0.0.2'", "127.0.0.2"),
    ],
)
def test_loopback_hosts_are_accepted(tmp_path: Path, broker: str, expected: str) -> None:
    """Any loopback address and IPv6 ::1 are accepted."""
    assert load(tmp_path, f"[broker]\n{broker}\n" + PROFILE).broker.http_host == expected


@pytest.mark.parametrize(("mode", "value"), [("0600", 0o600), ("750", 0o750), ("0660", 0o660)])
def test_socket_mode_is_parsed_as_octal(tmp_path: Path, mode: str, value: int) -> None:
    """socket_mode is an octal string, with or without the leading 0."""
    assert (
        load(tmp_path, f"[broker]\nsocket_mode = '{mode}'\n" + PROFILE).broker.socket_mode == value
    )


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A file that is not TOML is one error with the file and the line."""
    message = error_of(tmp_path, "[broker]\nhttp_port = = 1\n")
    assert str(tmp_path / "config.toml") in message
    assert "not valid TOML" in message
    assert "line 2" in message


def test_no_profiles_says_what_to_add(tmp_path: Path) -> None:
    """A configuration without any profile says to add [profiles.default]."""
    message = error_of(tmp_path, "[broker]\nhttp_port = 1\n")
    assert message.startswith("no profiles configured: add [profiles.default]")
    assert str(tmp_path / "config.toml") in message


def test_error_from_environment_names_the_variable(tmp_path: Path) -> None:
    """A bad value set in the environment is blamed on that variable, not on the file."""
    message = error_of(tmp_path, PROFILE, {"COLT_BROKER_BROKER__HTTP_PORT": "http"})
    assert "broker.http_port: must be a whole number" in message
    assert "environment variable COLT_BROKER_BROKER__HTTP_PORT" in message


def test_error_from_override_names_the_command_line(tmp_path: Path) -> None:
    """A bad override is blamed on the command line."""
    with pytest.raises(ConfigError, match=r"broker\.http_port: .*set on the command line"):
        load(tmp_path, PROFILE, overrides={"broker.http_port": 99999})


def test_every_problem_is_listed_in_one_error(tmp_path: Path) -> None:
    """Several problems come as one ConfigError, one line each."""
    message = error_of(tmp_path, "[broker]\nhttp_port = -5\nlog_level = 'x'\n" + PROFILE)
    assert message.startswith("invalid configuration, 2 problems:")
    assert "broker.http_port" in message
    assert "broker.log_level" in message


def test_validation_error_does_not_ride_along(tmp_path: Path) -> None:
    """The ConfigError carries no pydantic error as cause or context (its text echoes values)."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[broker]\nhttp_port = 'abc'\n" + PROFILE)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """Loading a path that does not exist (or is a directory) names it."""
    for path in (tmp_path / "absent.toml", tmp_path):
        with pytest.raises(ConfigError, match=re.escape(str(path))):
            load_config(path, environ={})


# --- secrets never shown ----------------------------------------------------------------

LITERAL = "literal-Secret-9f3k"


def test_misspelt_key_does_not_echo_its_secret_value(tmp_path: Path) -> None:
    """A secret pasted under a wrong key is named by key only; its value is not shown."""
    message = error_of(tmp_path, PROFILE + f'client_secert = "{LITERAL}"\n')
    assert "profiles.default.client_secert: unknown key" in message
    assert LITERAL not in message


def test_literal_secret_absent_from_errors_repr_and_redacted(tmp_path: Path) -> None:
    """A literal secret appears in no error, repr or redacted view, only in reveal()."""
    text = f'[profiles.default]\nclient_id = "id"\nclient_secret = "{LITERAL}"\n'
    assert LITERAL not in error_of(tmp_path, text + "refresh_ahead = 2\naccount = 5\n")
    config = load(tmp_path, text)
    assert config.profiles["default"].secret.reveal() == LITERAL
    assert LITERAL not in repr(config)
    assert LITERAL not in str(config)
    assert LITERAL not in json.dumps(redacted(config))


def test_literal_secret_is_allowed_with_a_warning(tmp_path: Path) -> None:
    """client_secret in the file works and earns a warning naming the key."""
    config = load(tmp_path, f'[profiles.default]\nclient_id = "id"\nclient_secret = "{LITERAL}"\n')
    (warning,) = config.warnings
    assert warning.startswith("profiles.default.client_secret: the secret itself is configured")
    assert f"in {tmp_path / 'config.toml'}" in warning


# --- warnings ---------------------------------------------------------------------------


def profiles_text(count: int, *, account: str = "acme", same_id: bool = False) -> str:
    return "".join(
        f'[profiles.p{i}]\nclient_id = "{"id" if same_id else f"id-{i}"}"\n'
        f'client_secret_env = "TEST_SECRET"\naccount = "{account}"\n'
        for i in range(count)
    )


def test_more_than_five_client_ids_on_one_account_warns(tmp_path: Path) -> None:
    """Six distinct client ids on one account: Colt allows five, so a warning names them."""
    config = load(tmp_path, profiles_text(6))
    assert len(config.warnings) == 1
    assert "account 'acme' has 6 distinct client ids" in config.warnings[0]
    assert "p0, p1, p2, p3, p4, p5" in config.warnings[0]


@pytest.mark.parametrize(("count", "same_id"), [(5, False), (7, True)])
def test_five_or_repeated_client_ids_do_not_warn(tmp_path: Path, count: int, same_id: bool) -> None:
    """Five ids, or one id shared by many profiles, is within Colt's limit."""
    assert load(tmp_path, profiles_text(count, same_id=same_id)).warnings == ()


# --- default paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"RUNTIME_DIRECTORY": "/run/colt-broker"}, "/run/colt-broker/broker.sock"),
        (
            {"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/run/user/1"},
            "/run/a/broker.sock",
        ),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/colt-broker/broker.sock"),
        ({}, f"/tmp/colt-broker-{os.getuid()}/broker.sock"),
    ],
)
def test_default_socket_path(environ: dict[str, str], expected: str) -> None:
    """systemd's RUNTIME_DIRECTORY, then XDG_RUNTIME_DIR, then a per-uid /tmp directory."""
    assert default_socket_path(environ) == Path(expected)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/colt-broker:/var/lib/x"}, "/var/lib/colt-broker"),
        ({"XDG_STATE_HOME": "/home/u/.st", "HOME": "/home/u"}, "/home/u/.st/colt-broker"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/colt-broker"),
    ],
)
def test_default_state_dir(environ: dict[str, str], expected: str) -> None:
    """systemd's STATE_DIRECTORY, then XDG_STATE_HOME, then ~/.local/state."""
    assert default_state_dir(environ) == Path(expected)


def test_broker_defaults_follow_the_environment(tmp_path: Path) -> None:
    """Unset socket_path and state_dir come from the given environment."""
    env = {"RUNTIME_DIRECTORY": "/run/cb", "STATE_DIRECTORY": "/var/lib/cb"}
    assert load(tmp_path, PROFILE, env).broker == BrokerSettings(
        socket_path=Path("/run/cb/broker.sock"), state_dir=Path("/var/lib/cb")
    )


def test_paths_expand_home_and_follow_the_config_file(tmp_path: Path) -> None:
    """'~/' is $HOME; a relative path in the file is taken from the file's directory."""
    text = "[broker]\nsocket_path = '~/b.sock'\nstate_dir = 'state'\n" + PROFILE
    broker = load(tmp_path, text, {"HOME": "/home/u"}).broker
    assert broker.socket_path == Path("/home/u/b.sock")
    assert broker.state_dir == tmp_path / "state"


def test_socket_path_too_long_for_a_unix_socket(tmp_path: Path) -> None:
    """A socket path beyond the sun_path limit is refused at load, not at bind."""
    message = error_of(tmp_path, f"[broker]\nsocket_path = '/{'x' * 120}'\n" + PROFILE)
    assert "broker.socket_path:" in message
    assert "limit of a Unix socket" in message


# --- finding the file -------------------------------------------------------------------


def test_find_config_file_order(tmp_path: Path) -> None:
    """explicit, then $COLT_BROKER_CONFIG, then XDG/~/.config, then the system file."""
    files = {n: write(tmp_path, "", f"{n}.toml") for n in ("explicit", "env", "system")}
    xdg = tmp_path / "xdg" / "colt-broker" / "config.toml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("")
    env = {"COLT_BROKER_CONFIG": str(files["env"]), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    system = files["system"]
    assert find_config_file(files["explicit"], env, system_file=system) == files["explicit"]
    assert find_config_file(None, env, system_file=system) == files["env"]
    del env["COLT_BROKER_CONFIG"]
    assert find_config_file(None, env, system_file=system) == xdg
    assert find_config_file(None, {"HOME": str(tmp_path)}, system_file=system) == system
    assert find_config_file(None, {"HOME": str(tmp_path)}, system_file=tmp_path / "no") is None


def test_find_config_file_uses_home_config(tmp_path: Path) -> None:
    """Without XDG_CONFIG_HOME the user file is ~/.config/colt-broker/config.toml."""
    path = tmp_path / ".config" / "colt-broker" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("")
    assert find_config_file(None, {"HOME": str(tmp_path)}, system_file=tmp_path / "no") == path


@pytest.mark.parametrize("via_env", [False, True])
def test_named_config_file_must_exist(tmp_path: Path, via_env: bool) -> None:
    """A file named by --config or $COLT_BROKER_CONFIG that is missing is an error."""
    missing = tmp_path / "missing.toml"
    explicit, env = (None, {"COLT_BROKER_CONFIG": str(missing)}) if via_env else (missing, {})
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        find_config_file(explicit, env, system_file=tmp_path / "no")


# --- the resolved view ------------------------------------------------------------------


def test_redacted_is_plain_data_with_secret_sources(tmp_path: Path) -> None:
    """redacted() is JSON-able, shows the socket mode in octal and each secret's source only."""
    config = load(
        tmp_path, "[broker]\nsocket_mode = '0640'\n" + PROFILE + "allowed_uids = [2, 1]\n"
    )
    view = redacted(config)
    assert json.loads(json.dumps(view)) == view
    assert view["broker"]["socket_mode"] == "0640"
    assert view["default_profile"] == "default"
    profile = view["profiles"]["default"]
    assert profile["client_secret"] == "<redacted, from environment variable TEST_SECRET>"
    assert profile["allowed_uids"] == [1, 2]
    assert SECRET not in json.dumps(view)


@pytest.mark.parametrize(
    ("names", "expected"),
    [(["default", "b"], "default"), (["only"], "only"), (["a", "b"], None)],
)
def test_default_profile(tmp_path: Path, names: list[str], expected: str | None) -> None:
    """ "default" if present, else the only profile, else None."""
    text = "".join(
        f'[profiles.{n}]\nclient_id = "{n}"\nclient_secret_env = "TEST_SECRET"\n' for n in names
    )
    assert load(tmp_path, text).default_profile == expected


def test_load_secrets_false_reads_no_secret(tmp_path: Path) -> None:
    """load_secrets=False needs no readable secret and marks every secret "not loaded"."""
    text = '[profiles.default]\nclient_id = "x"\nclient_secret_file = "/nonexistent/secret"\n'
    config = load(tmp_path, text, load_secrets=False)
    assert config.profiles["default"].secret.source == "not loaded"
    assert config.profiles["default"].secret.reveal() == ""
    assert redacted(config)["profiles"]["default"]["client_secret"] == "<not loaded>"


# --- config.example.toml ----------------------------------------------------------------


def uncommented(text: str) -> str:
    """The example with every commented-out setting ("#key", "#[table]") switched on."""
    return re.sub(r"^#(?=[\[a-z])", "", text, flags=re.MULTILINE)


def example_env(tmp_path: Path) -> dict[str, str]:
    secret = tmp_path / "default.secret"
    secret.write_text("example-secret\n")
    secret.chmod(0o600)
    return {
        "COLT_BROKER_PROFILES__DEFAULT__CLIENT_SECRET_FILE": str(secret),
        "COLT_CLIENT_SECRET": "x",
        "COLT_SANDBOX_SECRET": "y",
    }


def test_example_config_loads(tmp_path: Path) -> None:
    """config.example.toml as shipped is valid (its secret file swapped via the environment)."""
    config = load_config(EXAMPLE, environ=example_env(tmp_path))
    assert list(config.profiles) == ["default"]
    assert config.profiles["default"].secret.reveal() == "example-secret"
    assert config.warnings == ()


def test_example_config_with_every_setting_on_loads(tmp_path: Path) -> None:
    """Every commented-out setting in the example is valid too, second profile included."""
    path = write(tmp_path, uncommented(EXAMPLE.read_text()))
    config = load_config(path, environ=example_env(tmp_path))
    assert set(config.profiles) == {"default", "sandbox"}
    assert config.profiles["sandbox"].token_url == TOKEN_URLS["sandbox"]


def test_example_config_documents_every_key() -> None:
    """Each field of [broker], [defaults] and profiles appears (commented or not) in the example."""
    data = tomllib.loads(uncommented(EXAMPLE.read_text()))
    profile_keys = {key for table in data["profiles"].values() for key in table}
    assert set(BrokerModel.model_fields) <= set(data["broker"])
    assert set(DefaultsModel.model_fields) <= set(data["defaults"])
    assert set(ProfileModel.model_fields) <= profile_keys
