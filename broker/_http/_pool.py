"""The connection budget of one service: how many may be open, and how many of them TCP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker._http import _problem
from broker._http._problem import Problem
from broker._http._request import Transport

if TYPE_CHECKING:
    from broker._http._protocol import HttpProtocol


class Pool:
    """The open connections of one service (all listeners): the max_connections cap, of
    which TCP may take only ``tcp_limit`` (the rest is the Unix socket's reserve)."""

    def __init__(self, limit: int, tcp_limit: int | None = None) -> None:
        self.limit = limit
        self.tcp_limit = limit if tcp_limit is None else tcp_limit
        self.open: set[HttpProtocol] = set()
        self.tcp = 0

    def admit(self, protocol: HttpProtocol, transport: Transport) -> Problem | None:
        """None if ``protocol`` may open (it is then counted), else the refusal."""
        if len(self.open) >= self.limit:
            return _problem.overloaded(self.limit)
        if transport == "tcp":
            if self.tcp >= self.tcp_limit:
                return _problem.overloaded(self.tcp_limit, transport="TCP")
            self.tcp += 1
        self.open.add(protocol)
        return None

    def release(self, protocol: HttpProtocol, transport: Transport) -> None:
        if protocol in self.open:
            self.open.discard(protocol)
            if transport == "tcp":
                self.tcp -= 1
