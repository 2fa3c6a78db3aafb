"""``make bench``: the broker's figures against baselines measured in the same run.

    python bench/run.py            # the full run, about 8 minutes
    python bench/run.py --quick    # a smoke run, about a minute: the figures are indicative

Installs what it needs when missing (Debian's nginx and wrk with apt-get, uvicorn into this
virtual environment with pip), builds bench/uds_load.c with the system compiler, prints each
measurement as it goes, and ends with a markdown table, also written to bench/out/latest.md.
The server under test runs on CPU 0, the load generator (and this driver) on CPU 1.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import _checks
import _economy
import _gen
import _micro
import _profile
import _servers
import _sys
import _throughput
from _report import Results, render

T = TypeVar("T")
BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"


@dataclass(frozen=True)
class Plan:
    """How much of everything to run."""

    rounds: int
    seconds: float
    conn_counts: tuple[int, ...]
    check_conns: tuple[int, ...]
    cli_runs: int
    cached_calls: int
    uncached_calls: int
    lifetime: float
    lifetimes: int
    batches: int
    batch: int
    connections: int
    startups: int


FULL = Plan(3, 4.0, (1, 16, 256), (16, 256), 40, 200_000, 2000, 4.0, 10, 10, 100_000, 10_000, 5)
QUICK = Plan(1, 1.0, (1, 16, 256), (16,), 10, 50_000, 300, 2.0, 5, 4, 50_000, 2_000, 1)


def say(text: str) -> None:
    print(text, flush=True)


def prepare() -> Path:
    """Tools, the load generator, limits, and this driver's own core."""
    _sys.ensure_apt({"nginx": "nginx", "wrk": "wrk", "taskset": "util-linux"})
    _sys.ensure_pip({"uvicorn": "uvicorn", "httptools": "httptools"})
    OUT.mkdir(exist_ok=True)
    gen = _sys.build_generator(BENCH / "uds_load.c", OUT / "uds_load")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    _sys.pin_self(_sys.LOAD_CPU)
    return gen


@contextlib.contextmanager
def contenders(work: Path) -> Iterator[tuple[_servers.Broker, dict[str, _gen.Target]]]:
    """The broker (with an emulator), nginx and uvicorn, all up on both transports."""
    with _servers.upstream() as up:
        broker = _servers.Broker(work / "broker", up.token_url, _servers.free_port())
        broker.start()
        baselines: list[_servers.Baseline] = []
        try:
            status, real = _servers.http_get(broker.unix_path)
            assert status == 200, f"the broker answered {status} to its first token request"
            body = _servers.same_size_body(real)
            nginx = _servers.nginx(_sys.nginx_binary(), work / "nginx", _servers.free_port(), body)
            uvicorn, env = _servers.uvicorn(work, _servers.free_port(), body)
            baselines += [nginx, uvicorn]
            nginx.start()
            uvicorn.start(env)
            say(f"bench: body {len(body)} bytes from each contender")
            headers = broker.tcp_headers()
            yield (
                broker,
                {
                    "broker": broker.target(),
                    "nginx": nginx.target(headers),
                    "uvicorn": uvicorn.target(headers),
                },
            )
        finally:
            for baseline in baselines:
                baseline.stop()
            broker.stop()


def serving(gen: Path, work: Path, plan: Plan, res: Results, *, profile: bool) -> None:
    """Throughput, the generator check, the cold CLI and the client, on one set of servers."""
    with contenders(work) as (broker, targets):
        if profile:
            say("bench: profiling the broker (py-spy, Unix socket, 16 connections)")
            loaded = _profile.record(gen, targets["broker"], 10.0, OUT / "profile.raw")
            res.profile = [
                f"Under {loaded.rps:,.0f} req/s ({loaded.disturbance.describe()}).",
                *_profile.summarize(OUT / "profile.raw"),
                "",
                *_micro.per_request_cost(),
            ]
        say("bench: load generators against nginx (the server's core should saturate)")
        res.generator = _throughput.check_generators(
            gen, targets["nginx"], min(plan.seconds, 2.0), plan.check_conns
        )
        for g in res.generator:
            cell = _throughput.Cell(g.transport, g.conns)
            say(_throughput.describe_run(0, cell, "nginx", g.result))
        say(f"bench: throughput, {plan.rounds} round(s) of {plan.seconds:g} s per run")
        res.cells = _throughput.matrix(
            gen,
            targets,
            transports=("unix", "tcp"),
            conn_counts=plan.conn_counts,
            rounds=plan.rounds,
            seconds=plan.seconds,
            progress=say,
        )
        say(f"bench: cold `colt-broker token`, {plan.cli_runs} runs each")
        res.cli = attempt(res, "cold CLI", lambda: _checks.cold_cli(broker, plan.cli_runs))
        say("bench: broker.client.get_token()")
        res.client = attempt(
            res,
            "get_token()",
            lambda: _checks.client_calls(broker, plan.cached_calls, plan.uncached_calls),
        )


def attempt(res: Results, what: str, measure: Callable[[], T]) -> T | None:
    """``measure()``, or None with a note saying why: one broken measurement (a component
    being rewritten, say) must not lose the others."""
    try:
        result = measure()
    except Exception as exc:
        res.notes.append(f"{what}: not measured: {type(exc).__name__}: {exc}")
        say(f"  not measured: {type(exc).__name__}: {exc}")
        return None
    say(f"  {result}")
    return result


def the_rest(gen: Path, work: Path, plan: Plan, res: Results) -> None:
    """Upstream economy, memory and descriptors, start-up: each with a broker of its own."""
    say("bench: 1,000 consumers at a cold start")
    res.herd = attempt(res, "herd", lambda: _economy.herd(work / "herd", _servers.free_port()))
    say(f"bench: continuous load over {plan.lifetimes} lifetimes of {plan.lifetime:g} s")
    res.continuous = attempt(
        res,
        "continuous load",
        lambda: _economy.continuous(
            work / "continuous", _servers.free_port(), gen, plan.lifetime, plan.lifetimes
        ),
    )
    say(f"bench: memory over {plan.batches * plan.batch:,} requests, then descriptors")
    res.memory = attempt(
        res,
        "memory and descriptors",
        lambda: _checks.memory(
            work / "memory",
            _servers.free_port(),
            gen,
            batches=plan.batches,
            batch=plan.batch,
            connections=plan.connections,
        ),
    )
    say(f"bench: start-up to READY, {plan.startups} time(s) cold and persisted")
    res.startup = attempt(
        res,
        "start-up",
        lambda: _checks.startup(work / "startup", _servers.free_port(), plan.startups),
    )


def header(plan: Plan, quick: bool, argv: list[str]) -> list[str]:
    pinning = "server on CPU 0, load generator on CPU 1" if _sys.TWO_CORES else "no pinning"
    command = "make bench" if not argv else f"python bench/run.py {shlex.join(argv)}"
    kind = "quick smoke run: indicative figures only" if quick else "full run"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "## Benchmark",
        "",
        f"`{command}` ({kind}), {when}.  ",
        f"Machine: {_sys.machine()}; {pinning}.  ",
        f"Throughput: median of {plan.rounds} round(s) of {plan.seconds:g} s per run, contenders "
        "alternated; ± is half the range over the rounds. Keep-alive, no pipelining; wrk on TCP, "
        "bench/uds_load.c on the Unix socket. nginx: Debian's, one worker; uvicorn: httptools + "
        "uvloop, raw ASGI app; both answer a static body of the broker's response size.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 3; quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per throughput run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--profile", action="store_true", help="also sample the broker with py-spy under load"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds or args.seconds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds or plan.rounds,
                       "seconds": args.seconds or plan.seconds})  # fmt: skip
    started = time.monotonic()
    gen = prepare()
    if args.profile:
        _sys.ensure_pip_tool("py-spy", "py-spy")
    res = Results(header(plan, args.quick, sys.argv[1:] if argv is None else argv))
    work = Path(tempfile.mkdtemp(prefix="colt-bench-"))
    try:
        serving(gen, work, plan, res, profile=args.profile)
        the_rest(gen, work, plan, res)
    finally:
        if args.keep:
            say(f"bench: logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.notes.append(f"The whole run took {time.monotonic() - started:.0f} s.")
    table = render(res)
    (OUT / "latest.md").write_text(table + "\n")
    say("\n" + table)
    say(f"bench: written to {OUT / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
