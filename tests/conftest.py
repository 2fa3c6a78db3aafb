"""Shared fixtures: every async test runs on asyncio and on asyncio + uvloop."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The event loops the daemon supports."""
    return request.param  # type: ignore[no-any-return]  # pytest types param as Any
