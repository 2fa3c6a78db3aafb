"""Shared fixtures: every async test runs on asyncio and on asyncio + uvloop; the HTTP tests
share a short socket directory and a live service over a fake token source."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _http_harness import Harness, running
from _procs import short_tmpdir


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The event loops the daemon supports."""
    return request.param  # type: ignore[no-any-return]  # pytest types param as Any


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory short enough for Unix socket paths."""
    with short_tmpdir() as path:
        yield path


@pytest.fixture
async def h(sockdir: Path) -> AsyncIterator[Harness]:
    """The HTTP service on a Unix socket and a loopback port, over a FakeSource."""
    async with running(sockdir) as harness:
        yield harness
