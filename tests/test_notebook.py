"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel against
``colt-broker serve --demo``, and leaks no token into its outputs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from _daemon import DemoProcess, demo_process
from nbclient import NotebookClient

from broker._locate import call

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT = 20  # seconds per cell; the whole notebook takes a few seconds
PROBE = "import sys; print(sys.prefix)"  # appended to the run: which interpreter ran it?


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoProcess]:
    with demo_process() as running:
        yield running


def _outputs(nb: Any) -> list[str]:
    """Every output's text (streams, results, errors), one string per cell."""
    texts = []
    for cell in nb.cells:
        parts = []
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
            parts.extend(out.get("traceback", []))
        texts.append("".join(parts))
    return texts


def _read() -> Any:
    return nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]  # untyped lib


def _execute(demo: DemoProcess, tmp_path: Path) -> Any:
    nb = _read()
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))  # type: ignore[no-untyped-call]  # ditto
    env = {
        **os.environ,
        "COLT_BROKER_SOCKET": str(demo.socket_path),
        "COLT_DEMO_API_URL": demo.api_url,
        "IPYTHONDIR": str(tmp_path / "ipython"),  # keep the user's ~/.ipython out of it
    }
    # kernel_name "python3": jupyter_client launches the spec's "python" as sys.executable,
    # this venv's interpreter (the PROBE cell checks it).
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        startup_timeout=30,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    return client.execute(env=env)  # raises CellExecutionError on any failing cell


def test_the_quickstart_runs_top_to_bottom(demo: DemoProcess, tmp_path: Path) -> None:
    """Every cell runs in a real kernel against serve --demo; the API call and errors show."""
    outputs = _outputs(_execute(demo, tmp_path))
    text = "\n".join(outputs)
    assert outputs[-1].strip() == sys.prefix, "the kernel did not run this venv's interpreter"
    assert "+442071234567 GB active" in text, "the ColtAuth call to the demo API did not run"
    assert "async: 200 2 numbers" in text
    assert "<token sha256:" in text and "colt-broker" in text  # %colt_token, %colt_status
    assert "BrokerUnavailable: colt-broker daemon not reachable" in text
    assert "/nonexistent/colt-broker/broker.sock" in text and "colt-broker serve" in text
    assert "TokenUnavailable: no token for profile 'no-such-profile'" in text
    token = call(
        "GET", "/v1/token?format=raw", environ={"COLT_BROKER_SOCKET": str(demo.socket_path)}
    )
    assert token.status == 200 and token.body.decode() not in text, "a token leaked"


def test_the_committed_notebook_has_no_outputs() -> None:
    """The notebook in the repository is saved with outputs cleared (no token, no noise)."""
    nb = _read()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
