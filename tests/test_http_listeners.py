"""Listening sockets and key files: modes, groups, stale and live sockets, loopback only."""

from __future__ import annotations

import grp
import os
import resource
import socket
import stat
from pathlib import Path

import pytest
from _clocks import FakeClock
from _fake_source import FakeSource
from structlog.testing import capture_logs

from broker._http import (
    HttpService,
    Limits,
    new_http_key,
    open_tcp_listener,
    open_unix_listener,
    raise_nofile_limit,
    remove_own_files,
    write_key_files,
)
from broker._http._request import RESERVED_FDS
from broker._metrics import Metrics
from broker._paths import CURL_HEADERS_FILE, KEY_FILE
from broker.exceptions import ConfigError


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


def _other_group() -> grp.struct_group:
    """A group this process may give its files that is not its own primary group."""
    mine = set(os.getgroups()) if os.geteuid() else {g.gr_gid for g in grp.getgrall()}
    for group in grp.getgrall():
        if group.gr_gid in mine and group.gr_gid != os.getgid():
            return group
    pytest.skip("no second group to give files to")


def test_created_directory_gets_the_socket_group(sockdir: Path) -> None:
    """A directory the daemon creates gets socket_group too, so its members can traverse it."""
    group = _other_group()
    path = sockdir / "run" / "broker.sock"
    with open_unix_listener(path, group=group.gr_name):
        assert path.parent.stat().st_gid == group.gr_gid and _mode(path.parent) == 0o750
        assert path.lstat().st_gid == group.gr_gid


def test_existing_directory_of_another_group_is_warned_about(sockdir: Path) -> None:
    """An existing 0750 directory whose group is not socket_group is kept, with a warning."""
    group = _other_group()
    os.chmod(sockdir, 0o750)
    with capture_logs() as logs, open_unix_listener(sockdir / "broker.sock", group=group.gr_name):
        pass
    (warning,) = [e for e in logs if e["event"] == "socket.directory_group"]
    assert warning["log_level"] == "warning" and group.gr_name in warning["hint"]
    assert sockdir.stat().st_gid == os.getgid()  # the operator's directory is left alone


def test_world_traversable_directory_is_not_warned_about(sockdir: Path) -> None:
    """A directory anyone may traverse cannot lock socket_group out: no warning."""
    os.chmod(sockdir, 0o711)
    group = _other_group()
    with capture_logs() as logs, open_unix_listener(sockdir / "broker.sock", group=group.gr_name):
        pass
    assert [e for e in logs if e["event"] == "socket.directory_group"] == []


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


def test_tcp_listener_on_bracketed_ipv6_loopback() -> None:
    """[::1], as a URL spells it, binds ::1."""
    try:
        sock = open_tcp_listener("[::1]", 0)
    except ConfigError as exc:
        pytest.skip(f"::1 unavailable here: {exc}")
    with sock:
        assert sock.getsockname()[0] == "::1"


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "localhost", "", "::1%lo"]
)
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


# --- clean stop ------------------------------------------------------------------------------


def _own_files(sockdir: Path) -> list[Path]:
    write_key_files(sockdir, new_http_key())
    return [sockdir / "broker.sock", sockdir / KEY_FILE, sockdir / CURL_HEADERS_FILE]


def test_remove_own_files(sockdir: Path) -> None:
    """At a clean stop the socket and both key files this process made are removed."""
    with open_unix_listener(sockdir / "broker.sock"):
        files = _own_files(sockdir)
    remove_own_files(sockdir / "broker.sock", sockdir)
    assert [p for p in files if p.exists()] == []


def test_remove_own_files_keeps_an_inherited_socket(sockdir: Path) -> None:
    """With no socket path (systemd's socket), only the key files are removed."""
    with open_unix_listener(sockdir / "broker.sock"):
        files = _own_files(sockdir)
    remove_own_files(None, sockdir)
    assert [p for p in files if p.exists()] == [sockdir / "broker.sock"]


def test_remove_own_files_keeps_what_others_made(sockdir: Path) -> None:
    """Files replaced since (another daemon's live socket and its keys), or never ours, are
    kept, even where the file system gave the new file the old one's inode number."""
    with open_unix_listener(sockdir / "broker.sock"):
        files = _own_files(sockdir)
    (sockdir / "broker.sock").unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(sockdir / "broker.sock"))
        other.listen()
        (sockdir / KEY_FILE).unlink()
        (sockdir / KEY_FILE).write_text("another daemon's key\n")
        with capture_logs() as logs:
            remove_own_files(sockdir / "broker.sock", sockdir)
            remove_own_files(sockdir / "elsewhere.sock", sockdir)  # missing: no error
    assert [p for p in files if p.exists()] == [sockdir / "broker.sock", sockdir / KEY_FILE]
    assert logs == []  # nothing went wrong: they simply are not ours


# --- descriptors ------------------------------------------------------------------------------


def test_raise_nofile_limit() -> None:
    """The soft descriptor limit is raised to the hard one, and the new limit returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"hard limit {hard}: nothing to test against")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_nofile_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert raise_nofile_limit() == hard  # already there: unchanged
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("nofile", [1024, 4096, 20000, 65536, 1 << 20])
def test_limits_for_nofile_leave_headroom(nofile: int) -> None:
    """The connection cap, plus two accept bursts and the daemon's own descriptors, fits
    in the limit; beyond that the cap stays at a sane maximum."""
    limits = Limits.for_nofile(nofile)
    assert limits.max_connections + 2 * limits.backlog + RESERVED_FDS <= nofile
    assert 0 < limits.tcp_connections < limits.max_connections <= 8192
    assert Limits.for_nofile(1024).max_connections >= 512  # systemd's default still serves


def test_service_budget_follows_the_descriptor_limit() -> None:
    """Without explicit limits, HttpService sizes its connection cap from RLIMIT_NOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard limit {hard}")
    source = FakeSource(FakeClock())
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        service = HttpService(
            source, {}, default_profile=None, http_auth="none", http_key="", metrics=Metrics()
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert service.limits == Limits.for_nofile(1024)
    assert service.limits.max_connections < 1024 - RESERVED_FDS
