"""``make soak``: minutes of mixed load against a real daemon while upstream misbehaves.

The daemon runs as its own process (so its memory and descriptors can be read from /proc)
against an in-process emulator that injects a random fault into some token requests. Load:
keep-alive GETs over the Unix socket and over TCP, the CLI in new processes, the Python
client library from a thread, and reports of rejected tokens. At the end the run fails if
any consumer saw an error the rules do not explain, if a served token had less than
min_valid left, if memory or descriptors grew, or if the daemon's count of upstream
requests disagrees with the emulator's.

    python bench/soak.py [--seconds 600]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from broker.emulator import Emulator, Fault

CLIENT_ID, SECRET = "soak-client", "soak-secret-made-up"
LIFETIME = 20.0
MIN_VALID = 3.0
FAULT_RATE = 0.15


@dataclass
class Tally:
    ok: int = 0
    short: int = 0  # served with less than min_valid left: never allowed
    explained: Counter[str] = field(default_factory=Counter)  # 503s with a stated upstream cause
    unexplained: list[str] = field(default_factory=list)

    def judge(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            self.ok += 1
            body = response.json()
            if body["expires_in"] < MIN_VALID - 1:  # expires_in is floored to whole seconds
                self.short += 1
            return
        problem = _problem(response)
        if response.status_code == 503 and (problem.get("upstream") or "retry" in str(problem)):
            self.explained[str(problem.get("title"))] += 1
        else:
            self.unexplained.append(f"{response.status_code} {problem}")


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"body": response.text[:200]}
    return body if isinstance(body, dict) else {"body": body}


def random_fault(_request: object) -> Fault | None:
    """Some token requests fail in one of the ways upstream can."""
    if random.random() > FAULT_RATE:  # noqa: S311  # load shaping, not security
        return None
    return random.choice(  # noqa: S311
        [
            Fault(status=503, body=b'{"code":"001","reason":"service unavailable"}'),
            Fault(status=500, body=b"<html>gateway</html>"),
            Fault(action="reset"),
            Fault(status=429, headers={"Retry-After": "2"}, body=b"{}"),
            Fault(delay=3.0),  # longer than upstream_timeout
            Fault(status=200, body=b"not json"),
        ]
    )


def write_config(root: Path, token_url: str, port: int) -> Path:
    secret = root / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    config = root / "config.toml"
    config.write_text(
        f"""[broker]
socket_path = "{root}/run/broker.sock"
state_dir = "{root}/state"
http_port = {port}
log_format = "json"
log_level = "warning"

[defaults]
min_valid = {MIN_VALID}
refresh_ahead = 0.4
upstream_timeout = 1.5
max_requests_per_minute = 60

[profiles.default]
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
token_url = "{token_url}"

[profiles.second]
client_id = "{CLIENT_ID}"
client_secret_file = "{secret}"
token_url = "{token_url}"
"""
    )
    return config


def proc_stats(pid: int) -> tuple[int, int]:
    """Resident memory (KiB) and open descriptors of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    with anyio.fail_after(20):
        while not await anyio.Path(path).exists():
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited with {proc.returncode}")
            await anyio.sleep(0.05)


async def hammer(client: httpx.AsyncClient, url: str, tally: Tally, until: float) -> None:
    """Keep-alive token requests as fast as one Python task makes them."""
    while time.monotonic() < until:
        profile = random.choice(["default", "second"])  # noqa: S311
        try:
            response = await client.get(f"{url}/v1/token/{profile}")
        except httpx.HTTPError as exc:
            tally.unexplained.append(f"transport: {exc!r}")
            continue
        tally.judge(response)
        await anyio.sleep(0.002)


async def reporter(client: httpx.AsyncClient, tally: Tally, until: float) -> None:
    """Now and then a consumer says its token was rejected."""
    while time.monotonic() < until:
        await anyio.sleep(5)
        current = await client.get("http://localhost/v1/token/default")
        if current.status_code != 200:
            continue
        sha = hashlib.sha256(current.json()["access_token"].encode()).hexdigest()
        response = await client.post(
            "http://localhost/v1/token/default/refresh", json={"sha256": sha}
        )
        tally.judge(response)


async def cli_runner(env: dict[str, str], tally: Tally, until: float) -> None:
    while time.monotonic() < until:
        result = await anyio.run_process(
            [str(Path(sys.executable).parent / "colt-broker"), "token"], env=env, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            tally.ok += 1
        elif result.returncode != 69:
            tally.unexplained.append(f"cli exit {result.returncode}: {result.stderr[-200:]!r}")
        else:
            tally.explained["cli: token unavailable"] += 1
        await anyio.sleep(0.5)


def library_runner(env: dict[str, str], tally: Tally, until: float) -> None:
    os.environ.update(env)
    from broker.client import TokenUnavailable, get_token

    while time.monotonic() < until:
        try:
            get_token("default", min_valid=MIN_VALID)
            tally.ok += 1
        except TokenUnavailable:
            tally.explained["library: token unavailable"] += 1
        except Exception as exc:  # any other failure is what we look for
            tally.unexplained.append(f"library: {exc!r}")
        time.sleep(0.01)


async def soak(seconds: float) -> int:
    root = Path(tempfile.mkdtemp(prefix="colt-soak-"))
    emulator = Emulator({CLIENT_ID: SECRET}, token_lifetime=LIFETIME)
    emulator.set_rule(random_fault)
    tally = Tally()
    async with anyio.create_task_group() as tg:
        await tg.start(emulator.run)
        with contextlib.closing(socket.socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = write_config(root, emulator.token_url, port)
        env = {**os.environ, "COLT_BROKER_SOCKET": str(root / "run/broker.sock")}
        daemon = subprocess.Popen(  # noqa: ASYNC220  # the daemon lives for the whole run
            [str(Path(sys.executable).parent / "colt-broker"), "serve", "--config", str(config)],
            env=env,
        )
        try:
            await wait_for_socket(root / "run/broker.sock", daemon)
            until = time.monotonic() + seconds
            samples: list[tuple[int, int]] = [proc_stats(daemon.pid)]
            key = (root / "run/curl-headers").read_text().split(":", 1)[1].strip()
            unix = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(root / "run/broker.sock"))
            )
            tcp = httpx.AsyncClient(headers={"X-Colt-Broker": key})
            async with unix, tcp, anyio.create_task_group() as load:
                for _ in range(4):
                    load.start_soon(hammer, unix, "http://localhost", tally, until)
                    load.start_soon(hammer, tcp, f"http://127.0.0.1:{port}", tally, until)
                load.start_soon(reporter, unix, tally, until)
                load.start_soon(cli_runner, env, tally, until)
                threading.Thread(
                    target=library_runner, args=(env, tally, until), daemon=True
                ).start()
                while time.monotonic() < until:
                    await anyio.sleep(min(10, max(until - time.monotonic(), 0)))
                    samples.append(proc_stats(daemon.pid))
                    print(
                        f"  rss {samples[-1][0] / 1024:.1f} MiB, fds {samples[-1][1]}, "
                        f"ok {tally.ok}, upstream {emulator.count()}",
                        flush=True,
                    )
                status, upstream = await settled_counts(unix, emulator)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(20)
        tg.cancel_scope.cancel()
    return verdict(tally, samples, status, upstream)


async def settled_counts(
    client: httpx.AsyncClient, emulator: Emulator
) -> tuple[dict[str, Any], range]:
    """The daemon's status once no refresh is in flight, and the emulator's count bracketing
    it: a scheduled refresh may start between the reads."""
    with anyio.move_on_after(10):
        while True:
            status = (await client.get("http://localhost/v1/status")).json()
            if all(p["state"] != "refreshing" for p in status["profiles"]):
                break
            await anyio.sleep(0.1)
    before = emulator.count()
    status = (await client.get("http://localhost/v1/status")).json()
    return status, range(before, emulator.count() + 1)


def verdict(
    tally: Tally, samples: list[tuple[int, int]], status: dict[str, Any], upstream: range
) -> int:
    counted = sum(p["counters"]["upstream_requests"] for p in status["profiles"])
    first, last = samples[min(1, len(samples) - 1)], samples[-1]
    growth = (last[0] - first[0]) / first[0]
    failures = []
    if tally.unexplained:
        failures.append(
            f"{len(tally.unexplained)} unexplained errors, e.g. {tally.unexplained[:3]}"
        )
    if tally.short:
        failures.append(f"{tally.short} tokens served with less than min_valid left")
    if growth > 0.10:
        failures.append(f"memory grew {growth:.0%} between the second and the last sample")
    if last[1] > first[1] + 2:
        failures.append(f"descriptors grew from {first[1]} to {last[1]}")
    if counted not in upstream:
        seen = f"{upstream.start}..{upstream.stop - 1}"
        failures.append(f"daemon counted {counted} upstream requests, the emulator {seen}")
    print(
        json.dumps(
            {
                "ok": tally.ok,
                "explained": tally.explained,
                "upstream": [upstream.start, upstream.stop - 1],
                "daemon_upstream": counted,
                "rss_kib": [first[0], last[0]],
                "fds": [first[1], last[1]],
            },
            indent=2,
        )
    )
    for failure in failures:
        print("FAIL:", failure)
    print("soak:", "FAILED" if failures else "passed")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    sys.exit(anyio.run(soak, args.seconds))


if __name__ == "__main__":
    main()
