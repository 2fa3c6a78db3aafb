"""The markdown the benchmark prints and keeps in bench/out/latest.md (and the README)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from _checks import ClientCalls, ColdCli, Memory, Startup
from _economy import Continuous, Herd
from _throughput import Cell, GeneratorCheck, disturbed

GOAL_CONNS = (16, 256)


@dataclass
class Results:
    """Everything one run of the benchmark measured (None: not measured this time)."""

    header: list[str]
    cells: list[Cell] = field(default_factory=list)
    generator: list[GeneratorCheck] = field(default_factory=list)
    cli: ColdCli | None = None
    client: ClientCalls | None = None
    herd: Herd | None = None
    continuous: Continuous | None = None
    memory: Memory | None = None
    startup: Startup | None = None
    profile: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _yes(met: bool) -> str:
    return "**yes**" if met else "**NO**"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def throughput_table(cells: Sequence[Cell]) -> list[str]:
    lines = [
        "| transport | conns | broker req/s | nginx req/s | uvicorn req/s | broker/nginx "
        "| broker/uvicorn | p50 µs broker/nginx/uvicorn | p99 µs broker/nginx/uvicorn |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cells:
        rps = {n: f"{_n(c.rps(n))} ±{c.spread_pct(n):.0f}%" for n in c.runs}
        p50 = "/".join(f"{c.p50(n):.0f}" for n in ("broker", "nginx", "uvicorn"))
        p99 = "/".join(f"{c.p99(n):.0f}" for n in ("broker", "nginx", "uvicorn"))
        lines.append(
            f"| {c.transport} | {c.conns} | {rps['broker']} | {rps['nginx']} | "
            f"{rps['uvicorn']} | {c.rps('broker') / c.rps('nginx'):.0%} | "
            f"{c.rps('broker') / c.rps('uvicorn'):.1f}x | {p50} | {p99} |"
        )
    return lines


def _throughput_goals(cells: Sequence[Cell]) -> list[str]:
    rows = []
    for c in cells:
        if c.conns not in GOAL_CONNS:
            continue
        vs_nginx = c.rps("broker") / c.rps("nginx")
        vs_uvicorn = c.rps("broker") / c.rps("uvicorn")
        where = f"{c.transport}, {c.conns} conns"
        rows.append(
            f"| throughput vs nginx, {where} | {vs_nginx:.0%} | ≥ 70% | {_yes(vs_nginx >= 0.7)} |"
        )
        rows.append(
            f"| throughput vs uvicorn, {where} | {vs_uvicorn:.1f}x | ≥ 3x "
            f"| {_yes(vs_uvicorn >= 3)} |"
        )
        if c.conns == 16:
            p99 = c.p99("broker") / c.p99("nginx")
            rows.append(
                f"| p99 latency vs nginx, {where} | {c.p99('broker'):.0f} µs vs "
                f"{c.p99('nginx'):.0f} µs = {p99:.1f}x | ≤ 2x | {_yes(p99 <= 2)} |"
            )
    return rows


def _cli_rows(cli: ColdCli | None) -> list[str]:
    if cli is None:
        return []
    return [
        f'| cold `colt-broker token` vs `python -c "import socket, json"` ({cli.runs} runs each) '
        f"| {cli.token_ms:.1f} ms vs {cli.python_ms:.1f} ms = {cli.ratio:.2f}x "
        f"(p90 {cli.token_p90_ms:.1f} / {cli.python_p90_ms:.1f} ms) | ≤ 1.5x | "
        f"{_yes(cli.ratio <= 1.5)} |"
    ]


def _client_rows(client: ClientCalls | None) -> list[str]:
    if client is None:
        return []
    if not client.present:
        return ["| `get_token()` | TODO: not measured: broker.client missing | ≤ 2 µs cached | — |"]
    return [
        f"| `get_token()` from the in-process cache | {client.cached_us:.2f} µs a call | ≤ 2 µs | "
        f"{_yes(client.cached_us <= 2)} |",
        f"| `get_token()` through the socket (cache cleared) | median {client.uncached_p50_us:.0f}"
        f" µs, p99 {client.uncached_p99_us:.0f} µs | (measured) | — |",
    ]


def _economy_rows(herd: Herd | None, cont: Continuous | None) -> list[str]:
    rows = []
    if herd is not None:
        rows.append(
            f"| {herd.consumers} concurrent consumers at a cold start | {herd.upstream_requests} "
            f"upstream request(s): {herd.served}/{herd.consumers} served, {herd.distinct_tokens} "
            f"distinct token(s), all answered in {herd.seconds:.2f} s | 1 request | "
            f"{_yes(herd.met)} |"
        )
    if cont is not None:
        rows.append(
            f"| continuous load across {cont.lifetimes} token lifetimes of {cont.lifetime:g} s | "
            f"{cont.upstream_requests} upstream requests (schedule needs "
            f"{cont.expected_requests:.1f}); {cont.checked:,} checked + {cont.pressure:,} other "
            f"answers, {cont.failed} failed, {cont.short} with < min_valid left (least left "
            f"{cont.least_left:.2f} s) | ±20%, 0 failed, 0 short | {_yes(cont.met)} |"
        )
    return rows


def _memory_rows(mem: Memory | None) -> list[str]:
    if mem is None:
        return []
    return [
        f"| resident memory after {mem.requests:,} requests | {mem.rss_mib[-1]:.1f} MiB; "
        f"{mem.growth_mib:+.2f} MiB from {2 * mem.batch:,} to {mem.requests:,} requests; "
        f"{mem.failed} failed | ≤ 60 MB, flat (≤ 1 MiB) | {_yes(mem.rss_met)} |",
        f"| descriptors after {mem.connections:,} connections opened and closed | "
        f"{mem.fds_baseline} before, {mem.fds_after_connections} after "
        f"(settled in {mem.settle_seconds:.1f} s) | back to baseline | {_yes(mem.fds_met)} |",
    ]


def _startup_rows(s: Startup | None) -> list[str]:
    if s is None:
        return []
    runs = len(s.cold_ready_ms)
    return [
        f"| start-up to READY=1, cold (empty state, emulator) | {_median(s.cold_ready_ms):.0f} ms"
        f" (first token served at {_median(s.cold_token_ms):.0f} ms; median of {runs}) | "
        "(measured) | — |",
        f"| start-up to READY=1, persisted token | {_median(s.warm_ready_ms):.0f} ms (first token "
        f"at {_median(s.warm_token_ms):.0f} ms); {s.warm_upstream_requests} upstream requests | "
        f"0 upstream requests | {_yes(s.warm_upstream_requests == 0)} |",
    ]


def _verdict(g: GeneratorCheck) -> str:
    server, generator = g.result.server_cpu_pct, g.result.gen_cpu_pct
    if g.generator_bound:
        return "generator-bound: nginx's figure is a floor"
    if server >= 90 and generator >= 95:
        return "both cores saturated: nginx's figure may be a floor"
    if server >= 90:
        return "server saturated: the generator keeps up"
    return "neither saturated: latency-bound, or the machine was busy"


def _generator_table(checks: Sequence[GeneratorCheck]) -> list[str]:
    lines = [
        "| transport | conns | generator | nginx req/s | nginx CPU | generator CPU | verdict |",
        "|---|--:|---|--:|--:|--:|---|",
    ]
    for g in checks:
        r = g.result
        verdict = _verdict(g)
        lines.append(
            f"| {g.transport} | {g.conns} | {r.tool} | {_n(r.rps)} | {r.server_cpu_pct:.0f}% | "
            f"{r.gen_cpu_pct:.0f}% | {verdict} |"
        )
    return lines


def _disturbed(cells: Sequence[Cell]) -> list[str]:
    found = [
        f"- round {i + 1}, {c.transport} {c.conns} conns, {name}: {r.disturbance.describe()}"
        f" after {r.retries} redo(s)"
        for c in cells
        for name, runs in c.runs.items()
        for i, r in enumerate(runs)
        if disturbed(r)
    ]
    redone = sum(r.retries for c in cells for runs in c.runs.values() for r in runs)
    summary = f"Runs redone for steal > 2% or other processes > 10% of the machine: {redone}."
    return [summary, *(found or ["No run stayed disturbed."])]


def render(res: Results) -> str:
    out = [*res.header, ""]
    if res.cells:
        out += ["### Token serving throughput", "", *throughput_table(res.cells), ""]
    goal_rows = (
        _throughput_goals(res.cells)
        + _cli_rows(res.cli)
        + _client_rows(res.client)
        + _economy_rows(res.herd, res.continuous)
        + _memory_rows(res.memory)
        + _startup_rows(res.startup)
    )
    out += ["### Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    out += [*goal_rows, ""]
    if res.generator:
        out += ["### Load generators against nginx", "", *_generator_table(res.generator), ""]
    if res.cells:
        out += ["### Disturbance", "", *_disturbed(res.cells), ""]
    if res.profile:
        out += ["### Profile of the broker under load", "", *res.profile, ""]
    if res.notes:
        out += ["### Notes", "", *(f"- {note}" for note in res.notes), ""]
    return "\n".join(out)
