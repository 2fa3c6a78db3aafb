"""The unit files in systemd/: systemd's own tools accept them, the service is rated
"OK" by ``systemd-analyze security``, and they agree with each other and with the
daemon's default paths."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import pytest

from broker._paths import DEFAULT_URL, SOCKET_NAME, SYSTEM_RUNTIME_DIR, daemon_socket_path

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM = [UNITS / "colt-broker.service", UNITS / "colt-broker.socket"]
USER = [UNITS / "user" / "colt-broker.service", UNITS / "user" / "colt-broker.socket"]
MAX_EXPOSURE = 2.0  # "OK" in systemd-analyze security's scale
WAIT = 60  # seconds: bound for one systemd-analyze run on a loaded machine

Unit = dict[str, list[tuple[str, str]]]  # section -> (key, value) in file order


def _parse(path: Path) -> Unit:
    """A unit file as systemd reads it: repeated keys kept, comments dropped."""
    unit: Unit = {}
    section: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), [])
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            section.append((key, value))
    return unit


def _values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for k, value in unit[section] if k == key]


def _value(unit: Unit, section: str, key: str) -> str:
    values = _values(unit, section, key)
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def _run(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )


def _with_stub_command(units: list[Path], dest: Path) -> list[Path]:
    """Copies of ``units`` whose ExecStart= binary is an executable stub.

    ``verify`` insists that the binary exists, and where colt-broker is installed is the
    one thing a site changes (/usr/bin, a venv, ~/.local/bin); every other line is
    verified exactly as shipped."""
    stub = dest / "bin" / "colt-broker"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for unit in units:
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={stub}", unit.read_text(), flags=re.M)
        copies.append(dest / unit.name)
        copies[-1].write_text(text)
    return copies


# --- systemd's verdict ----------------------------------------------------------------


def test_system_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the system units without a single complaint."""
    result = _run(["verify", *map(str, _with_stub_command(SYSTEM, tmp_path))])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_user_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze --user verify` accepts the user units without a single complaint."""
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    units = _with_stub_command(USER, tmp_path / "units")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    result = _run(["--user", "verify", *map(str, units)], env=env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The two tests above can fail: verify reports an unknown key (it still exits 0)."""
    service, sock_unit = _with_stub_command(SYSTEM, tmp_path)
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = _run(["verify", str(service), str(sock_unit)])
    assert "Unknown key 'NoNewPrivilege'" in result.stderr


def test_service_exposure_is_ok() -> None:
    """`systemd-analyze security --offline=true` rates the service 2.0 or lower (OK)."""
    result = _run(["security", "--offline=true", "--no-pager", str(SYSTEM[0])])
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}{result.stderr}"
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


# --- the files agree with each other and with the daemon -------------------------------


def test_system_socket_serves_the_default_addresses() -> None:
    """The socket unit listens where clients look first: /run/colt-broker/broker.sock
    (0660, group colt-broker) and the default loopback URL, for colt-broker.service."""
    sock_unit = _parse(SYSTEM[1])
    port = DEFAULT_URL.removeprefix("http://")
    assert _values(sock_unit, "Socket", "ListenStream") == [
        f"{SYSTEM_RUNTIME_DIR}/{SOCKET_NAME}",
        port,
    ]
    assert _value(sock_unit, "Socket", "SocketMode") == "0660"
    assert _value(sock_unit, "Socket", "DirectoryMode") == "0750"
    assert _value(sock_unit, "Socket", "Service") == SYSTEM[0].name


def test_system_units_share_one_identity_and_directory() -> None:
    """Service user/group, socket owner, sysusers.d and tmpfiles.d all name colt-broker,
    and tmpfiles.d creates the socket's directory 0750 for it before the service runs."""
    service, sock_unit = _parse(SYSTEM[0]), _parse(SYSTEM[1])
    sysusers = (UNITS / "sysusers.d" / "colt-broker.conf").read_text()
    tmpfiles = (UNITS / "tmpfiles.d" / "colt-broker.conf").read_text()
    assert _value(service, "Service", "User") == _value(service, "Service", "Group")
    user = _value(service, "Service", "User")
    owner = [_value(sock_unit, "Socket", key) for key in ("SocketUser", "SocketGroup")]
    assert owner == [user, user]
    assert re.search(rf"^u {user} ", sysusers, flags=re.M)
    runtime = _value(service, "Service", "RuntimeDirectory")
    assert f"/run/{runtime}" == SYSTEM_RUNTIME_DIR
    assert re.search(rf"^d /run/{runtime} 0750 {user} {user} -$", tmpfiles, flags=re.M)


@pytest.mark.parametrize("unit", [SYSTEM[0], USER[0]], ids=["system", "user"])
def test_service_speaks_the_daemons_protocols(unit: Path) -> None:
    """notify with the main process as speaker, a watchdog, SIGHUP reload, the runtime
    directory kept for the socket unit, and the default profile's secret as a credential."""
    service = _parse(unit)
    assert _value(service, "Service", "Type") == "notify"
    assert _value(service, "Service", "NotifyAccess") == "main"
    assert _value(service, "Service", "WatchdogSec")
    assert _value(service, "Service", "ExecReload") == "kill -HUP $MAINPID"
    assert _value(service, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert _value(service, "Service", "UMask") == "0077"
    assert _value(service, "Service", "LoadCredential").startswith("default:")


def test_user_socket_is_where_the_daemon_and_clients_look() -> None:
    """The user socket is $XDG_RUNTIME_DIR/colt-broker/broker.sock, the daemon's default."""
    sock_unit = _parse(USER[1])
    listen = _values(sock_unit, "Socket", "ListenStream")
    assert listen[0].replace("%t", "/run/user/1000") == str(
        daemon_socket_path({"XDG_RUNTIME_DIR": "/run/user/1000"})
    )


# Options that need a mount namespace (or other privileges): a user manager cannot apply
# them without PrivateUsers=, and the unit would fail to start on many machines.
_PRIVILEGED_ONLY = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork",
    "PrivateIPC", "PrivateMounts", "ProtectHostname", "ProtectClock", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem",
    "RemoveIPC", "CapabilityBoundingSet", "AmbientCapabilities", "User", "Group", "DynamicUser",
    "PrivateUsers",
}  # fmt: skip


def test_user_service_asks_only_for_unprivileged_sandboxing() -> None:
    """The user unit uses no option a user manager cannot apply without privileges."""
    keys = {key for key, _ in _parse(USER[0])["Service"]}
    assert not keys & _PRIVILEGED_ONLY


@pytest.mark.skipif(os.geteuid() != 0, reason="creating files owned by another user needs root")
def test_sysusers_and_tmpfiles_create_user_and_directory(tmp_path: Path) -> None:
    """systemd-sysusers and systemd-tmpfiles accept our files and, in a scratch root, make
    the colt-broker user and a 0750 /run/colt-broker owned by it."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    for tool, conf in [("sysusers", "sysusers.d"), ("tmpfiles", "tmpfiles.d")]:
        argv = [f"systemd-{tool}", f"--root={tmp_path}"]
        argv += ["--create"] if tool == "tmpfiles" else []
        result = subprocess.run(
            [*argv, str(UNITS / conf / "colt-broker.conf")],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    entry = re.search(r"^colt-broker:x:(\d+):(\d+):", passwd, flags=re.M)
    assert entry, passwd
    uid, gid = map(int, entry.groups())
    stat = (tmp_path / "run" / "colt-broker").stat()
    assert (oct(stat.st_mode & 0o7777), stat.st_uid, stat.st_gid) == ("0o750", uid, gid)


# --- the daemon itself stays inside the service's sandbox -------------------------------


def _expand(group: str) -> set[str]:
    """System call names in a seccomp group such as @system-service, nested groups too."""
    listing = _run(["syscall-filter", "--no-pager", group]).stdout.splitlines()[1:]
    names = {line.strip() for line in listing if line.strip() and not line.strip().startswith("#")}
    return set().union(*(_expand(n) if n.startswith("@") else {n} for n in names))


def _allowed_syscalls(filters: list[str]) -> set[str]:
    """SystemCallFilter= lines as systemd combines them: the allow list, minus ~ lines."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        names = set().union(*map(_expand, line.removeprefix("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-o", os.devnull, "true"], capture_output=True, check=False)
    return probe.returncode == 0


def _get_token_over_unix(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(WAIT)
        client.connect(str(path))
        client.sendall(b"GET /v1/token HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return b"".join(iter(lambda: client.recv(65536), b""))


def _run_daemon_traced(tmp_path: Path, trace: Path) -> bytes:
    """`colt-broker serve --demo` under strace, as systemd would start it: wait for
    broker.ready, take a token over the Unix socket, SIGTERM it; its first answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLT_BROKER_")}
    env |= {"RUNTIME_DIRECTORY": str(tmp_path / "run"), "STATE_DIRECTORY": str(tmp_path)}
    env |= {"COLT_BROKER_BROKER__HTTP_PORT": str(_free_tcp_port())}
    env |= {"PYTHONDONTWRITEBYTECODE": "1"}  # __pycache__ would be read-only under systemd
    (tmp_path / "run").mkdir(mode=0o750)
    daemon = [sys.executable, "-c", "import sys; from broker._cli import main; sys.exit(main())"]
    with subprocess.Popen(
        ["strace", "-f", "-qq", "-o", str(trace), *daemon, "serve", "--demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        try:
            assert proc.stdout is not None
            _wait_for_output(proc.stdout, b'"broker.ready"')
            answer = _get_token_over_unix(tmp_path / "run" / "broker.sock")
            os.kill(int(trace.read_text().split(maxsplit=1)[0]), signal.SIGTERM)
            proc.communicate(timeout=WAIT)
        finally:
            proc.kill()
    return answer


def _free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_output(stream: IO[bytes], marker: bytes) -> None:
    seen, deadline = b"", time.monotonic() + WAIT
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while marker not in seen and time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
    assert marker in seen, f"no {marker!r} within {WAIT}s; the daemon said:\n{seen.decode()}"


# Calls that change the file system; open* only with a write or create flag.
_WRITE_CALL = re.compile(
    r"^\d+\s+(?:(?:mkdir|mkdirat|rmdir|rename|renameat2?|unlink|unlinkat|chmod|fchmodat"
    r"|link|linkat|symlink|symlinkat|truncate|mknod|mknodat)\(|(?:open|openat|creat)\("
    r".*O_(?:WRONLY|RDWR|CREAT)).*$",
    flags=re.M,
)


def _written_paths(trace: str) -> set[str]:
    """Absolute paths the traced process created, changed or removed."""
    lines = (m[0] for m in _WRITE_CALL.finditer(trace))
    return {path for line in lines for path in re.findall(r'"(/[^"]*)"', line)}


@pytest.mark.skipif(not _strace_works(), reason="strace is missing or may not trace here")
def test_daemon_stays_inside_the_service_sandbox(tmp_path: Path) -> None:
    """The daemon serving a token (`serve --demo`, traced) makes only system calls that
    SystemCallFilter= allows, opens only RestrictAddressFamilies= sockets, asks for no
    memory that MemoryDenyWriteExecute= refuses, and writes only in its runtime and state
    directories (ProtectSystem=strict): the hardening does not break it."""
    trace = tmp_path / "trace"
    answer = _run_daemon_traced(tmp_path, trace)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    service = _parse(SYSTEM[0])
    calls = re.findall(r"^\d+\s+(\w+)\((.*)", trace.read_text(), flags=re.M)
    allowed = _allowed_syscalls(_values(service, "Service", "SystemCallFilter"))
    assert {name for name, _ in calls} - allowed == set()
    families = {args.split(",")[0] for name, args in calls if name == "socket"}
    assert families <= set(_value(service, "Service", "RestrictAddressFamilies").split())
    wx = [f"{n}({a}" for n, a in calls if n == "mmap" and "PROT_WRITE|PROT_EXEC" in a]
    wx += [f"{n}({a}" for n, a in calls if "mprotect" in n and "PROT_EXEC" in a]
    assert wx == []
    assert {
        p for p in _written_paths(trace.read_text()) if not p.startswith(f"{tmp_path}/")
    } == set()
