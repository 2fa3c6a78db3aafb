"""Listening sockets and key files: modes, groups, stale and live sockets, loopback only."""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from _http_harness import short_tmpdir

from broker._http import new_http_key, open_tcp_listener, open_unix_listener, write_key_files
from broker.exceptions import ConfigError


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_unix_socket_mode_and_directory(sockdir: Path) -> None:
    """The socket is 0660 by default, in a directory created 0750."""
    path = sockdir / "run" / "broker.sock"
    with open_unix_listener(path) as sock:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert _mode(path) == 0o660 and _mode(path.parent) == 0o750
        assert sock.getsockname() == str(path)


def test_unix_socket_custom_mode_and_group(sockdir: Path) -> None:
    """socket_mode and socket_group are applied."""
    group = grp.getgrgid(os.getgid()).gr_name
    path = sockdir / "broker.sock"
    with open_unix_listener(path, mode=0o600, group=group):
        assert _mode(path) == 0o600 and path.lstat().st_gid == os.getgid()


def test_unknown_group_is_a_config_error(sockdir: Path) -> None:
    """A socket_group that does not exist is refused by name."""
    with pytest.raises(ConfigError, match="no-such-group-xyz"):
        open_unix_listener(sockdir / "broker.sock", group="no-such-group-xyz")


def test_existing_directory_is_left_alone(sockdir: Path) -> None:
    """An existing directory keeps the mode its owner gave it."""
    os.chmod(sockdir, 0o700)
    with open_unix_listener(sockdir / "broker.sock"):
        assert _mode(sockdir) == 0o700


def test_stale_socket_is_replaced(sockdir: Path) -> None:
    """A socket file nobody listens on (a crash's leftover) is replaced."""
    path = sockdir / "broker.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    with open_unix_listener(path) as sock:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))
        conn, _ = sock.accept()
        conn.close()
        probe.close()


def test_live_socket_is_refused(sockdir: Path) -> None:
    """A socket another daemon listens on is not taken over."""
    path = sockdir / "broker.sock"
    with open_unix_listener(path), pytest.raises(ConfigError, match="already listening"):
        open_unix_listener(path)
    assert not path.exists() or stat.S_ISSOCK(path.lstat().st_mode)


def test_non_socket_file_is_refused(sockdir: Path) -> None:
    """A regular file at socket_path is never deleted."""
    path = sockdir / "broker.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        open_unix_listener(path)
    assert path.read_text() == "precious"


def test_too_long_socket_path(sockdir: Path) -> None:
    """A path longer than a Unix socket allows is a clear config error."""
    with pytest.raises(ConfigError, match="longer than"):
        open_unix_listener(sockdir / ("x" * 120))


def test_tcp_listener_on_loopback() -> None:
    """127.0.0.1 with port 0 listens on an ephemeral port with SO_REUSEADDR."""
    with open_tcp_listener("127.0.0.1", 0) as sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


def test_tcp_listener_on_ipv6_loopback() -> None:
    """::1 is accepted (where the host has IPv6)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock = open_tcp_listener("::1", 0)
    except ConfigError as exc:
        pytest.skip(f"::1 unavailable here: {exc}")
    with sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "localhost", ""])
def test_non_loopback_host_is_refused(host: str) -> None:
    """Any address that is not loopback is refused."""
    with pytest.raises(ConfigError, match="not a loopback address"):
        open_tcp_listener(host, 0)


def test_port_in_use_is_a_config_error() -> None:
    """A port already taken is a config error that names it."""
    with open_tcp_listener("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port}"):
            open_tcp_listener("127.0.0.1", port)


def test_key_files(sockdir: Path) -> None:
    """http-key and curl-headers hold the key, 0640, with no temporary files left."""
    key = new_http_key()
    write_key_files(sockdir, key, group=grp.getgrgid(os.getgid()).gr_name)
    assert (sockdir / "http-key").read_text() == f"{key}\n"
    assert (sockdir / "curl-headers").read_text() == f"X-Colt-Broker: {key}\n"
    assert _mode(sockdir / "http-key") == 0o640 and _mode(sockdir / "curl-headers") == 0o640
    assert sorted(p.name for p in sockdir.iterdir()) == ["curl-headers", "http-key"]


def test_key_files_are_replaced(sockdir: Path) -> None:
    """Writing new keys replaces the old files."""
    write_key_files(sockdir, "old-key")
    write_key_files(sockdir, "new-key")
    assert (sockdir / "http-key").read_text() == "new-key\n"


def test_new_http_key() -> None:
    """Keys are long, URL-safe and never repeat."""
    keys = {new_http_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(len(k) >= 43 and k.replace("-", "").replace("_", "").isalnum() for k in keys)
