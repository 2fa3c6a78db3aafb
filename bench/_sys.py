"""The machine under the benchmark: CPU accounting, steal time, pinning, tools, processes."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
TWO_CORES = (os.cpu_count() or 1) >= 2
SERVER_CPU = 0  # the server under test
LOAD_CPU = 1  # the load generator, and this driver


@dataclass(frozen=True)
class CpuSample:
    """The whole machine's CPU ticks (all cores) at one moment, from /proc/stat."""

    busy: int
    steal: int
    total: int

    @classmethod
    def now(cls) -> CpuSample:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = user + nice + system + irq + softirq
        return cls(busy=busy, steal=steal, total=sum(fields))


@dataclass(frozen=True)
class Disturbance:
    """What happened on the machine during a run besides the run itself."""

    steal_pct: float  # hypervisor steal, % of all cores' time
    foreign_pct: float  # CPU used by processes other than ours, % of all cores' time

    def describe(self) -> str:
        return f"steal {self.steal_pct:.1f}%, other processes {self.foreign_pct:.0f}%"


def disturbance(before: CpuSample, after: CpuSample, our_cpu_seconds: float) -> Disturbance:
    """Steal and foreign load between two samples, given the CPU our processes used."""
    total = max(after.total - before.total, 1)
    foreign = (after.busy - before.busy) - our_cpu_seconds * TICK
    return Disturbance(
        steal_pct=100.0 * (after.steal - before.steal) / total,
        foreign_pct=max(0.0, 100.0 * foreign / total),
    )


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU of a running process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    """How many descriptors a process has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run on one core (taskset, util-linux), or as is on a one-core machine."""
    if not TWO_CORES or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def pin_self(cpu: int) -> None:
    """Keep this driver off the server's core."""
    if TWO_CORES:
        os.sched_setaffinity(0, {cpu})


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only this process, never a name match."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Stop ``proc`` on the way out, whatever happens."""
    try:
        yield proc
    finally:
        stop(proc)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate()`` every 10 ms until true; raise naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.01)


# --- tools ---------------------------------------------------------------------------------


def ensure_apt(binaries: dict[str, str]) -> None:
    """Install the Debian packages of missing binaries (``{binary: package}``)."""
    missing = sorted({pkg for binary, pkg in binaries.items() if _which(binary) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"bench: install {', '.join(missing)} (no apt-get here)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"bench: installing {' '.join(missing)} (apt-get)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def _which(binary: str) -> str | None:
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")


def nginx_binary() -> str:
    found = _which("nginx")
    if found is None:
        raise SystemExit("bench: nginx is not installed")
    return found


def ensure_pip(modules: dict[str, str]) -> None:
    """pip-install into this interpreter's environment the packages of missing modules.

    uvicorn is only the baseline's server, so it is not a runtime dependency of the broker.
    """
    missing = []
    for module, requirement in modules.items():
        try:
            __import__(module)
        except ImportError:
            missing.append(requirement)
    if missing:
        print(f"bench: installing {' '.join(missing)} (pip, into {sys.prefix})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def ensure_pip_tool(tool: str, requirement: str) -> Path:
    """A command-line tool that PyPI ships (e.g. py-spy) in this environment's bin/."""
    path = Path(sys.executable).with_name(tool)
    if not path.exists():
        print(f"bench: installing {requirement} (pip, into {sys.prefix})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True)
    return path


def build_generator(source: Path, out: Path) -> Path:
    """Compile the Unix-socket load generator with the system compiler (if stale)."""
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        ensure_apt({"gcc": "gcc"})
        compiler = "gcc"
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(out), str(source)], check=True)
    return out


def machine() -> str:
    """One line naming the machine the figures come from."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} x {model}, {mem_gib:.1f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
