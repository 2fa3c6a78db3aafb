"""The serving layer: the HTTP API over the Unix socket and loopback TCP.

The daemon opens the listeners (or inherits them from systemd), writes the key files, and
runs ``HttpService.serve`` for each socket in its task group.
"""

from broker._http._listeners import (
    new_http_key,
    open_tcp_listener,
    open_unix_listener,
    write_key_files,
)
from broker._http._request import Limits
from broker._http._service import HttpService

__all__ = [
    "HttpService",
    "Limits",
    "new_http_key",
    "open_tcp_listener",
    "open_unix_listener",
    "write_key_files",
]
