"""``--profile``: where the broker's serving time goes, sampled by py-spy under load.

py-spy samples the daemon's Python stacks while uds_load keeps 16 connections busy on the
Unix socket. Time in C below a Python frame counts as that frame's own ("self") time, so the
event loop's C code and its syscalls (epoll, read) show as the loop's runner, and the write
syscall as the line that calls ``transport.write``.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from _gen import Load, LoadResult, Target, run

_LINE = re.compile(r" \([^()]*\)$")


def record(gen: Path, target: Target, seconds: float, out: Path) -> LoadResult:
    """Sample ``target`` for ``seconds`` under load; raw collapsed stacks go to ``out``."""
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy), "record", "-p", str(target.pid), "-d", str(int(seconds) + 1)]
    argv += ["-r", "250", "--nonblocking", "-f", "raw", "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the load starts
    result = run(gen, target, Load("unix", 16, seconds=seconds, warmup=0.3))
    proc.wait(timeout=seconds + 30)
    return result


def _leaf(stack: str) -> str:
    return _LINE.sub("", stack.rsplit(";", maxsplit=1)[-1])


def summarize(raw: Path, top: int = 20) -> list[str]:
    """Own time by function (line numbers folded), as markdown lines."""
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        own[_leaf(stack)] += int(count)
    total = sum(own.values()) or 1
    lines = [f"{total} samples of the daemon's busy time; own time by function:", ""]
    lines += ["| share | function |", "|--:|---|"]
    lines += [f"| {100 * n / total:.1f}% | `{name or '?'}` |" for name, n in own.most_common(top)]
    return lines
