"""The usual way to write such a service in Python: a raw ASGI app under uvicorn + httptools.

It answers every request with the same body and headers as the broker's token response (the
body is read from the file named by ``BENCH_BODY_FILE``), on a Unix socket and on loopback TCP
at once, in one process, like the broker:

    BENCH_BODY_FILE=body.json python bench/baseline_uvicorn.py UNIX_PATH PORT
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = Path(os.environ.get("BENCH_BODY_FILE", "/dev/null")).read_bytes()
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
END = {"type": "http.response.body", "body": BODY}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer any HTTP request with the fixed body."""
    if scope["type"] != "http":
        return
    await send(START)
    await send(END)


def _listeners(unix_path: str, port: int) -> list[socket.socket]:
    Path(unix_path).unlink(missing_ok=True)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    return [unix, tcp]


def main() -> None:
    """Serve until SIGTERM."""
    unix_path, port = sys.argv[1], int(sys.argv[2])
    config = uvicorn.Config(
        app,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )
    uvicorn.Server(config).run(sockets=_listeners(unix_path, port))


if __name__ == "__main__":
    main()
