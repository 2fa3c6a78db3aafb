"""Client secrets: the order of sources, and refusals that name the file but never the secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker._config import load_config
from broker._secrets import SecretSources, load_secret
from broker.exceptions import ConfigError

FILE_SECRET = "file-secret-Ab12"
CRED_SECRET = "credential-secret-Cd34"
ENV_SECRET = "env-secret-Ef56"
LITERAL_SECRET = "literal-secret-Gh78"
ALL_SECRETS = (FILE_SECRET, CRED_SECRET, ENV_SECRET, LITERAL_SECRET)


def secret_file(directory: Path, content: str = FILE_SECRET + "\n", mode: int = 0o600) -> Path:
    path = directory / "client.secret"
    path.write_text(content)
    path.chmod(mode)
    return path


def credentials(directory: Path, profile: str = "default", content: str = CRED_SECRET) -> Path:
    creds = directory / "credentials"
    creds.mkdir()
    (creds / profile).write_text(content)
    return creds


def all_sources(tmp_path: Path) -> SecretSources:
    return SecretSources(
        "default", file=secret_file(tmp_path), env="SECRET_VAR", literal=LITERAL_SECRET
    )


def refusal(sources: SecretSources, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_secret(sources, environ or {})
    message = str(info.value)
    assert not any(secret in message for secret in ALL_SECRETS)
    return message


# --- order of preference ----------------------------------------------------------------


def test_systemd_credential_comes_first(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY/<profile> wins over file, variable and literal."""
    creds = credentials(tmp_path)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "SECRET_VAR": ENV_SECRET}
    secret = load_secret(all_sources(tmp_path), env)
    assert secret.reveal() == CRED_SECRET
    assert secret.source == f"systemd credential {creds / 'default'}"


def test_credential_of_another_profile_is_not_used(tmp_path: Path) -> None:
    """A credentials directory without this profile's file falls through to the next source."""
    creds = credentials(tmp_path, profile="other")
    secret = load_secret(all_sources(tmp_path), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert secret.reveal() == FILE_SECRET


def test_file_comes_before_environment_and_literal(tmp_path: Path) -> None:
    """client_secret_file wins over client_secret_env and client_secret; one newline dropped."""
    secret = load_secret(all_sources(tmp_path), {"SECRET_VAR": ENV_SECRET})
    assert secret.reveal() == FILE_SECRET
    assert secret.source == f"file {tmp_path / 'client.secret'}"


def test_environment_comes_before_literal() -> None:
    """client_secret_env wins over a literal client_secret."""
    sources = SecretSources("default", env="SECRET_VAR", literal=LITERAL_SECRET)
    secret = load_secret(sources, {"SECRET_VAR": ENV_SECRET})
    assert (secret.reveal(), secret.source) == (ENV_SECRET, "environment variable SECRET_VAR")


def test_literal_is_the_last_resort() -> None:
    """A literal client_secret is used when nothing else is configured."""
    secret = load_secret(SecretSources("default", literal=LITERAL_SECRET), {})
    assert secret.reveal() == LITERAL_SECRET


def test_no_source_at_all_says_how_to_add_one() -> None:
    """A profile with no secret source names the keys that would give it one."""
    message = refusal(SecretSources("lab"))
    assert message.startswith("profiles.lab: no client secret: set client_secret_file")
    assert "client_secret_env" in message
    assert "LoadCredential=lab:" in message


def test_repr_of_a_secret_hides_it(tmp_path: Path) -> None:
    """The Secret wrapper's repr and str show the source, not the value."""
    secret = load_secret(all_sources(tmp_path), {})
    assert FILE_SECRET not in repr(secret)
    assert FILE_SECRET not in str(secret)


# --- the secret file --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_file_is_refused(tmp_path: Path, mode: int) -> None:
    """A secret file readable by group or others is refused, with the chmod that fixes it."""
    path = secret_file(tmp_path, mode=mode)
    message = refusal(SecretSources("default", file=path))
    assert message.startswith(f"profiles.default.client_secret_file: {path}")
    assert f"mode {mode:04o}" in message
    assert f"fix: chmod 600 {path}" in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_file_is_accepted(tmp_path: Path, mode: int) -> None:
    """Modes 0600 and 0400 are fine."""
    path = secret_file(tmp_path, mode=mode)
    assert load_secret(SecretSources("default", file=path), {}).reveal() == FILE_SECRET


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A secret file that does not exist is named with the profile and key."""
    path = tmp_path / "absent.secret"
    message = refusal(SecretSources("default", file=path))
    assert message == f"profiles.default.client_secret_file: {path} does not exist"


def test_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    """A directory where a secret file should be is refused, not read."""
    message = refusal(SecretSources("default", file=tmp_path))
    assert message == f"profiles.default.client_secret_file: {tmp_path} is a directory, not a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_named(tmp_path: Path) -> None:
    """A file the daemon's user may not read is refused, naming the uid."""
    path = secret_file(tmp_path, mode=0o000)
    message = refusal(SecretSources("default", file=path))
    assert f"{path} cannot be read by uid {os.geteuid()}" in message


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    """A secret file with nothing but whitespace is an error, not an empty secret."""
    path = secret_file(tmp_path, content=content)
    assert refusal(SecretSources("default", file=path)).endswith(
        "is empty: write the secret into it"
    )


def test_binary_file_is_refused_without_showing_it(tmp_path: Path) -> None:
    """A file that is not UTF-8 text is refused; its bytes are not shown."""
    path = tmp_path / "binary.secret"
    path.write_bytes(b"\xff\xfe" + FILE_SECRET.encode())
    path.chmod(0o600)
    assert refusal(SecretSources("default", file=path)).endswith("is not UTF-8 text")


def test_empty_credential_is_named(tmp_path: Path) -> None:
    """An empty systemd credential is an error naming the credential file."""
    creds = credentials(tmp_path, content="\n")
    message = refusal(SecretSources("default"), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert message.startswith(f"profiles.default: systemd credential {creds / 'default'} is empty")


# --- the environment variable -----------------------------------------------------------


@pytest.mark.parametrize(("environ", "state"), [({}, "is not set"), ({"V": " "}, "is empty")])
def test_unset_or_empty_variable_is_refused(environ: dict[str, str], state: str) -> None:
    """client_secret_env naming an unset or empty variable is an error naming the variable."""
    message = refusal(SecretSources("default", env="V"), environ)
    assert message.startswith(f"profiles.default.client_secret_env: environment variable V {state}")


# --- through load_config ----------------------------------------------------------------


def test_load_config_reads_relative_secret_file_beside_config(tmp_path: Path) -> None:
    """A relative client_secret_file in the file is found beside the config file."""
    secret_file(tmp_path)
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[profiles.default]\nclient_id = "x"\nclient_secret_file = "client.secret"\n'
    )
    config = load_config(config_path, environ={})
    assert config.profiles["default"].secret.reveal() == FILE_SECRET


def test_load_config_prefers_credential_and_reports_every_profile(tmp_path: Path) -> None:
    """load_config uses the credential directory and lists each profile whose secret fails."""
    creds = credentials(tmp_path)
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        '[profiles.default]\nclient_id = "x"\nclient_secret_file = "/nonexistent"\n'
        '[profiles.a]\nclient_id = "y"\n[profiles.b]\nclient_id = "z"\nclient_secret_env = "NOPE"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    lines = str(info.value).splitlines()
    assert lines[0] == "2 profiles have no usable secret:"
    assert lines[1].startswith("profiles.a: no client secret")
    assert lines[2].startswith("profiles.b.client_secret_env: environment variable NOPE is not set")
