"""The event loop the daemon and the emulator run on: uvloop where it is installed."""

from __future__ import annotations

import importlib.util


def backend_options() -> dict[str, object]:
    """anyio.run's backend options: asyncio on uvloop when available, plain asyncio else."""
    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}
