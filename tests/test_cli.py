"""The ``colt-broker`` command as users run it: real subprocesses of the console script.

``token`` and ``status`` talk to a real ``serve --demo`` daemon (found through
``$XDG_RUNTIME_DIR``, as on a laptop); ``check --online`` talks to a standalone emulator.
Every subprocess is killed in teardown and every wait has a deadline. A daemon's 503, which
the demo daemon never gives, is faked in process.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cli_helpers import (
    COLT_BROKER,
    JWT_RE,
    RUN_TIMEOUT,
    Background,
    clean_env,
    closed_tcp_port,
    free_tcp_port,
    log_event,
    run_cli,
    serve_demo,
    standalone_emulator,
    write_secret,
)
from _procs import short_tmpdir

from broker import _cli_client
from broker._config import SYSTEM_CONFIG_FILE
from broker._wire import Response

SECRET = "made-up-cli-secret-5b1e0c"  # made up: the emulator's only client
CLIENT_ID = "cli-test-client"
EXIT_USAGE, EXIT_UNAVAILABLE = 2, 69
TOKEN_KEYS = {"access_token", "token_type", "expires_in", "expires_at", "profile"}


@dataclass
class Demo:
    """A running ``serve --demo``; ``env`` finds it the default way (its XDG_RUNTIME_DIR)."""

    env: dict[str, str]
    run_dir: Path  # where the socket and key files are
    port: int  # its loopback HTTP port; ``env``'s COLT_BROKER_URL is a closed port instead,
    # so that no other daemon on this machine can answer for it
    process: Background


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    """One demo daemon for the module's token and status tests."""
    with short_tmpdir() as root, closed_tcp_port() as closed:
        port = free_tcp_port()
        env = clean_env(root, COLT_BROKER_URL=f"http://127.0.0.1:{closed}")
        daemon_env = {
            **env,
            "COLT_BROKER_BROKER__HTTP_PORT": str(port),
            "COLT_BROKER_BROKER__LOG_FORMAT": "json",
        }
        with serve_demo(daemon_env) as process:
            run_dir = Path(env["XDG_RUNTIME_DIR"]) / "colt-broker"
            yield Demo(env, run_dir, port, process)


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    """A standalone emulator (``python -m broker.emulator``) that knows CLIENT_ID/SECRET."""
    with short_tmpdir() as root:
        env = clean_env(root)
        args = ("--client-id", CLIENT_ID, "--client-secret", SECRET)
        with standalone_emulator(env, *args) as url:
            yield url


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def write_config(root: Path, body: str, *, secret: str = SECRET, mode: int = 0o600) -> Path:
    """A config file in ``root`` whose default profile reads ``default.secret`` (``mode``)."""
    write_secret(root / "default.secret", secret, mode)
    path = root / "config.toml"
    path.write_text(body)
    return path


def profile_toml(token_url: str) -> str:
    return (
        "[profiles.default]\n"
        f'client_id = "{CLIENT_ID}"\n'
        'client_secret_file = "default.secret"\n'
        f'token_url = "{token_url}"\n'
    )


# --- token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["token"], ["token", "--json"], ["status"]])
def test_without_a_daemon_exits_69_naming_both_places(root: Path, command: list[str]) -> None:
    """No daemon anywhere: exit 69, stderr names the socket and URL tried and how to start one."""
    missing = root / "nowhere" / "broker.sock"
    with closed_tcp_port() as port:
        env = clean_env(
            root, COLT_BROKER_SOCKET=str(missing), COLT_BROKER_URL=f"http://127.0.0.1:{port}"
        )
        result = run_cli(*command, env=env)
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert result.stdout == ""
    assert str(missing) in result.stderr
    assert f"http://127.0.0.1:{port}" in result.stderr
    assert "colt-broker serve" in result.stderr


def test_a_malformed_broker_url_is_named_in_the_error(root: Path) -> None:
    """COLT_BROKER_URL without a scheme is not silently ignored: the error says what is wrong."""
    env = clean_env(
        root, COLT_BROKER_SOCKET=str(root / "absent.sock"), COLT_BROKER_URL="localhost:8787"
    )
    result = run_cli("token", env=env)
    assert result.returncode == EXIT_UNAVAILABLE
    assert "localhost:8787" in result.stderr


def test_token_prints_only_the_token_and_a_newline(demo: Demo) -> None:
    """``token`` writes the bare JWT and one newline: the same token ``--json`` shows."""
    raw = run_cli("token", env=demo.env)
    document = run_cli("token", "--json", env=demo.env)
    assert raw.returncode == 0, raw.stderr
    assert JWT_RE.fullmatch(raw.stdout.removesuffix("\n")), raw.stdout
    assert raw.stdout.count("\n") == 1 and raw.stdout.endswith("\n")
    assert raw.stdout.strip() == json.loads(document.stdout)["access_token"]


def test_token_inside_shell_command_substitution(demo: Demo) -> None:
    """``"Authorization: Bearer $(colt-broker token)"`` in bash holds the token, nothing else."""
    script = 'printf "Authorization: Bearer %s|" "$("$0" token)"'
    result = subprocess.run(
        ["bash", "-c", script, str(COLT_BROKER)],
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    token = json.loads(run_cli("token", "--json", env=demo.env).stdout)["access_token"]
    assert result.stdout == f"Authorization: Bearer {token}|"


def test_token_json_prints_the_document(demo: Demo) -> None:
    """``token --json`` prints the API's JSON document for the default profile."""
    result = run_cli("token", "--json", env=demo.env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == TOKEN_KEYS
    assert document["profile"] == "default"
    assert document["token_type"] == "Bearer"
    assert 1700 < document["expires_in"] <= 1800


def test_token_falls_back_to_tcp_with_the_key_beside_the_socket(demo: Demo) -> None:
    """With the socket unreachable, ``token`` asks over TCP with the key from ``http-key``."""
    env = {
        **demo.env,
        "COLT_BROKER_SOCKET": str(demo.run_dir / "not-the-socket.sock"),
        "COLT_BROKER_URL": f"http://127.0.0.1:{demo.port}",
    }
    result = run_cli("token", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == run_cli("token", env=demo.env).stdout.strip()


@pytest.mark.parametrize("command", [["token", "--json"], ["status", "--json"]])
def test_json_output_is_one_document_and_one_newline(demo: Demo, command: list[str]) -> None:
    """``--json`` output is the document and a single newline, no blank line after it."""
    result = run_cli(*command, env=demo.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("}\n")


def test_token_for_an_unknown_profile_exits_2_with_the_problem(demo: Demo) -> None:
    """``token nosuch``: exit 2, stdout empty, stderr has the 404 problem naming the profiles."""
    result = run_cli("token", "nosuch", env=demo.env)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "nosuch" in result.stderr
    assert "Configured profiles: default" in result.stderr


def test_token_with_an_impossible_min_valid_exits_2_saying_why(demo: Demo) -> None:
    """``--min-valid 99999`` beyond the tokens' 1800 s lifetime is the caller's mistake:
    exit 2 (usage) with both figures."""
    result = run_cli("token", "--min-valid", "99999", env=demo.env)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "99999" in result.stderr
    assert "1800" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_token_exits_69_when_the_daemon_answers_503(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A running daemon with no token to give (503) makes ``token`` exit 69, stdout empty."""
    problem = {"title": "Token unavailable", "detail": "upstream is down", "status": 503}
    answer = Response(503, {"retry-after": "7"}, json.dumps(problem).encode())
    monkeypatch.setattr(_cli_client, "call", lambda method, target: answer)
    assert _cli_client.token_command(None, None, as_json=False) == EXIT_UNAVAILABLE
    out, err = capsys.readouterr()
    assert out == ""
    assert "upstream is down" in err and "retry after 7 s" in err


# --- status -----------------------------------------------------------------------------------


def test_status_prints_an_aligned_table(demo: Demo) -> None:
    """``status``: a header and one row per profile, each cell starting under its heading."""
    token = run_cli("token", env=demo.env).stdout.strip()
    result = run_cli("status", env=demo.env)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    (row,) = [r for r in rows if r.startswith("default ")]
    for heading in ("PROFILE", "STATE", "VALID", "EXPIRES IN", "LAST REFRESH", "UPSTREAM"):
        at = header.index(heading)
        assert row[at] != " " and (at == 0 or row[at - 1] == " "), (heading, header, row)
    assert row[header.index("STATE") :].startswith("fresh ")
    assert row[header.index("VALID") :].startswith("yes ")
    assert re.match(r"(29|30)m\d\ds ", row[header.index("EXPIRES IN") :]), row
    assert token not in result.stdout


def test_status_json_parses_and_holds_no_token(demo: Demo) -> None:
    """``status --json``: the profiles as JSON, without the token anywhere."""
    token = run_cli("token", env=demo.env).stdout.strip()
    result = run_cli("status", "--json", env=demo.env)
    assert result.returncode == 0, result.stderr
    (profile,) = json.loads(result.stdout)["profiles"]
    assert profile["profile"] == "default"
    assert profile["state"] == "fresh"
    assert profile["valid"] is True
    assert token not in result.stdout
    assert "access_token" not in result.stdout
    assert JWT_RE.search(result.stdout) is None


def test_token_command_imports_only_the_standard_library(root: Path) -> None:
    """``token`` runs in ``$(...)`` loops: it must not import the daemon's libraries."""
    heavy = ("anyio", "httpx", "pydantic", "structlog", "uvloop", "jwt", "prometheus_client")
    script = (
        "import sys, json\n"
        "from broker._cli import main\n"
        "code = main(['token'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})\n"
        "print(json.dumps([code, heavy]))\n"
    )
    with closed_tcp_port() as port:
        env = clean_env(
            root,
            COLT_BROKER_SOCKET=str(root / "absent.sock"),
            COLT_BROKER_URL=f"http://127.0.0.1:{port}",
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=True,
        )
    assert json.loads(result.stdout) == [EXIT_UNAVAILABLE, []]


# --- check ------------------------------------------------------------------------------------


def test_check_good_config_prints_redacted_settings(root: Path) -> None:
    """A valid file: exit 0, the resolved settings on stdout, the secret nowhere."""
    path = write_config(root, profile_toml("http://127.0.0.1:9/authentication/v1/oauth/token"))
    result = run_cli("check", "--config", str(path), env=clean_env(root))
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    profile = settings["profiles"]["default"]
    assert profile["client_id"] == CLIENT_ID
    assert profile["client_secret"].startswith("<redacted")
    assert settings["broker"]["http_port"] == 8787
    assert SECRET not in result.stdout + result.stderr
    assert "configuration OK" in result.stderr


def test_check_unknown_key_exits_2_naming_the_key_and_the_file(root: Path) -> None:
    """A typo in a key: exit 2, and the message names the key and the file."""
    body = profile_toml("http://127.0.0.1:9/t") + "\n[broker]\nhttp_prot = 8788\n"
    path = write_config(root, body)
    result = run_cli("check", "--config", str(path), env=clean_env(root))
    assert result.returncode == EXIT_USAGE
    assert "broker.http_prot" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_check_group_readable_secret_exits_2_with_the_chmod_fix(root: Path) -> None:
    """A secret file of mode 0640 is refused: exit 2, saying ``chmod 600 <file>``."""
    path = write_config(root, profile_toml("http://127.0.0.1:9/t"), mode=0o640)
    result = run_cli("check", "--config", str(path), env=clean_env(root))
    assert result.returncode == EXIT_USAGE
    assert f"chmod 600 {root / 'default.secret'}" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_check_online_prints_a_fingerprint_not_the_token(root: Path, emulator_url: str) -> None:
    """``check --online`` fetches one token from the emulator and shows only its hash."""
    path = write_config(root, profile_toml(emulator_url))
    result = run_cli("check", "--config", str(path), "--online", env=clean_env(root))
    assert result.returncode == 0, result.stderr
    assert re.search(r"profile default: token sha256:[0-9a-f]{12} valid 1800 s", result.stdout)
    assert JWT_RE.search(result.stdout + result.stderr) is None
    assert SECRET not in result.stdout + result.stderr


def test_check_online_with_a_wrong_secret_exits_69(root: Path, emulator_url: str) -> None:
    """Credentials the emulator rejects: exit 69 with Colt's 401 on stderr, no secret shown."""
    wrong = "made-up-wrong-secret-77aa"
    path = write_config(root, profile_toml(emulator_url), secret=wrong)
    result = run_cli("check", "--config", str(path), "--online", env=clean_env(root))
    assert result.returncode == EXIT_UNAVAILABLE
    assert "profile default: FAILED" in result.stderr
    assert "HTTP 401" in result.stderr
    assert wrong not in result.stdout + result.stderr


# --- serve ------------------------------------------------------------------------------------


def test_serve_without_any_config_exits_2_mentioning_demo(root: Path) -> None:
    """No --config, no COLT_BROKER_CONFIG, empty HOME and XDG dirs: exit 2, pointing at --demo."""
    if SYSTEM_CONFIG_FILE.exists():
        pytest.skip(f"{SYSTEM_CONFIG_FILE} exists on this machine")
    result = run_cli("serve", env=clean_env(root), timeout=10)
    assert result.returncode == EXIT_USAGE
    assert "--demo" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_a_broken_config_exits_2_without_a_traceback(root: Path) -> None:
    """A file that is not TOML: exit 2, one message naming the file, no traceback."""
    path = root / "broken.toml"
    path.write_text("[profiles.default\nclient_id = \n")
    result = run_cli("serve", "--config", str(path), env=clean_env(root), timeout=10)
    assert result.returncode == EXIT_USAGE
    assert str(path) in result.stderr
    assert "TOML" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["--demo", "--config"])
def test_serve_with_its_port_taken_exits_2_without_a_traceback(root: Path, mode: str) -> None:
    """Another process listens on http_port: serve exits 2 with one line naming the port, and
    leaves no socket file behind."""
    path = write_config(root, profile_toml("http://127.0.0.1:9/t"))
    args = ["--demo"] if mode == "--demo" else ["--config", str(path)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(root, COLT_BROKER_BROKER__HTTP_PORT=str(port))
        result = run_cli("serve", *args, env=env, timeout=10)
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_USAGE
    assert f"port {port}" in result.stderr
    assert not list(root.rglob("broker.sock")), "a socket file was left behind"


def test_serve_demo_stops_cleanly_on_sigterm(root: Path) -> None:
    """SIGTERM: the daemon logs broker.stopping and exits 0."""
    env = clean_env(root, COLT_BROKER_BROKER__HTTP_PORT="0", COLT_BROKER_BROKER__LOG_FORMAT="json")
    with serve_demo(env) as process:
        assert run_cli("token", env=env).returncode == 0
        assert process.stop(signal.SIGTERM) == 0
        rest = process.drain()
    assert any(log_event("broker.stopping")(line) for line in rest.splitlines())
    assert "Traceback" not in rest
