"""The single-figure measurements: the cold CLI, the Python client, memory and descriptors,
and start-up to READY."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _gen import Load, run
from _servers import Broker, http_get, upstream
from _sys import open_fds, rss_kib, wait_for


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


# --- cold `colt-broker token` ---------------------------------------------------------------


@dataclass
class ColdCli:
    runs: int
    token_ms: float  # median wall time of `colt-broker token`
    python_ms: float  # median wall time of `python -c "import socket, json"`
    token_p90_ms: float
    python_p90_ms: float

    @property
    def ratio(self) -> float:
        return self.token_ms / self.python_ms


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def cold_cli(broker: Broker, runs: int) -> ColdCli:
    """A new process each time, alternating the two commands (same interpreter, the venv's)."""
    env = dict(os.environ, COLT_BROKER_SOCKET=broker.unix_path)
    env.pop("COLT_BROKER_URL", None)
    token = [str(Path(sys.executable).with_name("colt-broker")), "token"]
    python = [sys.executable, "-c", "import socket, json"]
    for argv in (token, python):
        _wall(argv, env)  # warm the page cache once
    times: dict[str, list[float]] = {"token": [], "python": []}
    for _ in range(runs):
        times["token"].append(_wall(token, env))
        times["python"].append(_wall(python, env))
    ms = {k: [1000 * x for x in v] for k, v in times.items()}
    return ColdCli(
        runs=runs,
        token_ms=statistics.median(ms["token"]),
        python_ms=statistics.median(ms["python"]),
        token_p90_ms=percentile(ms["token"], 0.9),
        python_p90_ms=percentile(ms["python"], 0.9),
    )


# --- broker.client.get_token ----------------------------------------------------------------


@dataclass
class ClientCalls:
    present: bool
    cached_us: float = 0.0
    uncached_p50_us: float = 0.0
    uncached_p99_us: float = 0.0


def client_calls(broker: Broker, cached_calls: int, uncached_calls: int) -> ClientCalls:
    """get_token() from the in-process cache, and through the socket with the cache cleared."""
    if importlib.util.find_spec("broker.client") is None:
        return ClientCalls(present=False)
    os.environ["COLT_BROKER_SOCKET"] = broker.unix_path
    os.environ.pop("COLT_BROKER_URL", None)
    from broker import client

    client.clear_cache()
    client.get_token()
    cached = min(_per_call(client.get_token, cached_calls) for _ in range(5))
    uncached = []
    for _ in range(uncached_calls):
        client.clear_cache()
        started = time.perf_counter_ns()
        client.get_token()
        uncached.append((time.perf_counter_ns() - started) / 1000)
    return ClientCalls(
        present=True,
        cached_us=cached,
        uncached_p50_us=statistics.median(uncached),
        uncached_p99_us=percentile(uncached, 0.99),
    )


def _per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        call()
    return (time.perf_counter_ns() - started) / calls / 1000


# --- memory and descriptors -----------------------------------------------------------------


@dataclass
class Memory:
    requests: int
    rss_mib: list[float]  # after each batch
    batch: int
    fds_baseline: int = 0
    fds_after_load: int = 0
    connections: int = 0
    fds_after_connections: int = 0
    settle_seconds: float = 0.0
    failed: int = 0

    @property
    def growth_mib(self) -> float:
        """RSS growth from the end of the second batch to the end of the last."""
        return self.rss_mib[-1] - self.rss_mib[1]

    @property
    def rss_met(self) -> bool:
        return self.rss_mib[-1] <= 60.0 and self.growth_mib <= 1.0 and self.failed == 0

    @property
    def fds_met(self) -> bool:
        return self.fds_after_connections <= self.fds_baseline


def memory(
    workdir: Path, port: int, gen: Path, *, batches: int, batch: int, connections: int
) -> Memory:
    """RSS over ``batches`` x ``batch`` requests (Unix and TCP in turn), then descriptors
    over ``connections`` connections each opened for one request and closed."""
    with upstream() as up:
        broker = Broker(workdir, up.token_url, port)
        broker.start()
        try:
            return _memory(broker, gen, batches, batch, connections)
        finally:
            broker.stop()


def _memory(broker: Broker, gen: Path, batches: int, batch: int, connections: int) -> Memory:
    assert http_get(broker.unix_path)[0] == 200, "the broker served no first token"
    pid = broker.pid
    baseline = _steady_fds(pid)
    result = Memory(requests=batches * batch, rss_mib=[], batch=batch, fds_baseline=baseline)
    target = broker.target()
    for i in range(batches):
        load = Load("unix" if i % 2 == 0 else "tcp", 16, requests=batch)
        result.failed += run(gen, target, load).failed
        result.rss_mib.append(rss_kib(pid) / 1024)
    result.fds_after_load = _settled_fds(pid, result.fds_baseline)[0]
    for transport in ("unix", "tcp"):
        load = Load(transport, 16, requests=connections // 2, keep_alive=False)
        result.failed += run(gen, target, load).failed
        result.connections += connections // 2
    result.fds_after_connections, result.settle_seconds = _settled_fds(pid, result.fds_baseline)
    return result


def _steady_fds(pid: int, quiet: float = 0.5, timeout: float = 5.0) -> int:
    """The descriptor count once it has not changed for ``quiet`` seconds (a connection
    just closed by a client may still be lingering in the broker)."""
    deadline = time.monotonic() + timeout
    count, since = open_fds(pid), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = open_fds(pid)
        if now != count:
            count, since = now, time.monotonic()
    return count


def _settled_fds(pid: int, baseline: int, timeout: float = 10.0) -> tuple[int, float]:
    """Descriptors once back at ``baseline`` (or after ``timeout``), and how long that took."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):  # then the count says it did not come back
        wait_for(lambda: open_fds(pid) <= baseline, timeout, "descriptors back to baseline")
    return open_fds(pid), time.monotonic() - started


# --- start-up -------------------------------------------------------------------------------


@dataclass
class Startup:
    cold_ready_ms: list[float] = field(default_factory=list)
    cold_token_ms: list[float] = field(default_factory=list)
    warm_ready_ms: list[float] = field(default_factory=list)
    warm_token_ms: list[float] = field(default_factory=list)
    warm_upstream_requests: int = 0  # must stay 0: the persisted token is used


def _start_and_ask(broker: Broker) -> tuple[float, float]:
    started = time.perf_counter()
    ready = broker.start()
    status, _ = http_get(broker.unix_path)
    token = time.perf_counter() - started
    broker.stop()
    if status != 200:
        raise RuntimeError(f"the first token request after start answered {status}")
    return 1000 * ready, 1000 * token


def startup(workdir: Path, port: int, runs: int) -> Startup:
    """Spawn to READY=1 (and to the first token served): cold, and with a persisted token."""
    result = Startup()
    with upstream() as up:
        for i in range(runs):
            broker = Broker(workdir / f"start-{i}", up.token_url, port)
            ready, token = _start_and_ask(broker)  # cold: an empty state directory
            result.cold_ready_ms.append(ready)
            result.cold_token_ms.append(token)
            before = up.count()
            ready, token = _start_and_ask(broker)  # the same state directory: a persisted token
            result.warm_ready_ms.append(ready)
            result.warm_token_ms.append(token)
            result.warm_upstream_requests += up.count() - before
    return result
