"""The serving layer: the HTTP API over the Unix socket and loopback TCP.

The daemon raises its descriptor limit and sizes the connection budget from it
(``Limits.for_nofile(raise_nofile_limit())``), opens the listeners (or inherits them from
systemd), writes the key files, runs ``HttpService.serve`` for each socket in its task group,
and at a clean stop calls ``remove_own_files``.
"""

from broker._http._listeners import (
    new_http_key,
    open_tcp_listener,
    open_unix_listener,
    raise_nofile_limit,
    remove_own_files,
    write_key_files,
)
from broker._http._request import Limits, Transport
from broker._http._service import HttpService

__all__ = [
    "HttpService",
    "Limits",
    "Transport",
    "new_http_key",
    "open_tcp_listener",
    "open_unix_listener",
    "raise_nofile_limit",
    "remove_own_files",
    "write_key_files",
]
