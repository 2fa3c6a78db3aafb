"""Load generators: wrk for TCP, uds_load (bench/uds_load.c) for the Unix socket.

Each run is pinned to the load core, measured with the server's CPU and the machine's steal
time around it, and reported as a ``LoadResult``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from _sys import LOAD_CPU, CpuSample, Disturbance, disturbance, pinned, process_cpu_seconds

Transport = Literal["unix", "tcp"]


@dataclass(frozen=True)
class Target:
    """Where a server listens, and the headers every request carries."""

    name: str
    pid: int
    unix_path: str
    port: int
    headers: tuple[str, ...] = ()


@dataclass
class LoadResult:
    """One measured run."""

    rps: float
    p50_us: float
    p99_us: float
    requests: int
    failed: int  # socket errors plus non-2xx answers
    gen_cpu_pct: float  # the generator's own CPU, % of one core
    tool: str
    server_cpu_pct: float = 0.0
    disturbance: Disturbance = field(default_factory=lambda: Disturbance(0.0, 0.0))
    retries: int = 0


@dataclass(frozen=True)
class Load:
    """One kind of run: transport, connections, and how long or how many."""

    transport: Transport
    conns: int
    seconds: float = 0.0
    requests: int = 0  # uds_load only: stop after this many instead of a duration
    warmup: float = 0.0
    keep_alive: bool = True


def run(gen: Path, target: Target, load: Load) -> LoadResult:
    """Run one load against ``target``, with the server's CPU and the machine's disturbance."""
    argv = _wrk_argv(target, load) if _use_wrk(load) else _uds_argv(gen, target, load)
    cpu_before, sample_before, wall_before = (
        process_cpu_seconds(target.pid),
        CpuSample.now(),
        time.monotonic(),
    )
    output, gen_cpu = _run_measured(pinned(LOAD_CPU, argv))
    wall = time.monotonic() - wall_before
    server_cpu = process_cpu_seconds(target.pid) - cpu_before
    result = _parse_wrk(output) if _use_wrk(load) else parse_uds(output)
    result.server_cpu_pct = 100.0 * server_cpu / wall
    if result.tool == "wrk":
        result.gen_cpu_pct = 100.0 * gen_cpu / wall
    result.disturbance = disturbance(sample_before, CpuSample.now(), server_cpu + gen_cpu)
    return result


def _use_wrk(load: Load) -> bool:
    # wrk has no Unix sockets and no request count; uds_load covers those (and -k 0).
    return load.transport == "tcp" and not load.requests and load.keep_alive


def _run_measured(argv: list[str]) -> tuple[str, float]:
    """Run to completion; its stdout and the CPU seconds it used (wait4's rusage)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.strip()}")
        out.seek(0)
        return out.read().decode(), usage.ru_utime + usage.ru_stime


def _uds_argv(gen: Path, target: Target, load: Load) -> list[str]:
    where = ["-u", target.unix_path] if load.transport == "unix" else ["-t", _tcp(target)]
    amount = ["-n", str(load.requests)] if load.requests else ["-d", str(load.seconds)]
    argv = [str(gen), *where, "-c", str(load.conns), *amount, "-w", str(load.warmup)]
    for header in target.headers if load.transport == "tcp" else ():
        argv += ["-H", header]
    return argv + ([] if load.keep_alive else ["-k", "0"])


def _wrk_argv(target: Target, load: Load) -> list[str]:
    argv = ["wrk", "-t1", f"-c{load.conns}", f"-d{math.ceil(load.seconds)}s", "--latency"]
    for header in target.headers:
        argv += ["-H", header]
    return [*argv, f"http://{_tcp(target)}/v1/token"]


def _tcp(target: Target) -> str:
    return f"127.0.0.1:{target.port}"


def parse_uds(output: str) -> LoadResult:
    data = json.loads(output)
    return LoadResult(
        rps=data["rps"],
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        requests=data["requests"],
        failed=data["errors"] + data["non2xx"],
        gen_cpu_pct=data["cpu_pct"],
        tool="uds_load",
    )


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _wrk_latency(output: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    if match is None:
        raise RuntimeError(f"no {percent}% latency in wrk's output:\n{output}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _wrk_number(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    return float(match.group(1)) if match else 0.0


def _parse_wrk(output: str) -> LoadResult:
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    failed = sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    failed += int(_wrk_number(output, r"Non-2xx or 3xx responses: (\d+)"))
    return LoadResult(
        rps=_wrk_number(output, r"Requests/sec:\s+([\d.]+)"),
        p50_us=_wrk_latency(output, "50"),
        p99_us=_wrk_latency(output, "99"),
        requests=int(_wrk_number(output, r"(\d+) requests in")),
        failed=failed,
        gen_cpu_pct=0.0,  # wrk does not say: run() measures it
        tool="wrk",
    )
