"""Reading HTTP/1.1 requests within ``Limits``: httptools' callbacks, before any answer.

``RequestReader`` is the object httptools calls back while it parses a connection's input:
it keeps each request's target, the few headers the broker reads and the body, and decides
the connection mode and whether the request may take the hot lane. Request line, header
bytes, header count and body size are capped, and the framing headers checked; a request that
breaks a rule is refused from inside the callback (``_Refused``), and ``_parse_problem`` then
says which answer the client gets.

It is a base class, not a separate object, so that httptools calls these methods directly:
the per-request path keeps its call count. ``HttpProtocol`` (``_protocol.py``) subclasses it
and supplies what the connection decides: ``on_message_complete`` (answer the whole request)
and ``_continue`` (the interim 100 response).
"""

from __future__ import annotations

import httptools

from broker._http import _problem
from broker._http._problem import Problem
from broker._http._render import CONN_CLOSE, CONN_DEFAULT, CONN_KEEP_ALIVE
from broker._http._request import Limits, Request, split_target

_KEPT_HEADERS = frozenset(
    {b"host", b"x-colt-broker", b"accept", b"content-length", b"transfer-encoding",
     b"expect", b"connection", b"proxy-connection"}
)  # fmt: skip
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect"})
_CONNECTION_HEADERS = frozenset({b"connection", b"proxy-connection"})
# Header names as clients usually spell them -> the kept name in lower case, or b"" for one
# the broker ignores: a dict lookup instead of a .lower() and a set test per header.
_COMMON_NAMES = {
    spelling: spelling.lower() if spelling.lower() in _KEPT_HEADERS else b""
    for spelling in (b"Host", b"User-Agent", b"Accept", b"X-Colt-Broker", b"Content-Type",
                     b"Content-Length", b"Connection", b"Accept-Encoding", b"host",
                     b"user-agent", b"accept", b"x-colt-broker", b"connection")
}  # fmt: skip


class _Refused(Exception):  # a signal out of a parser callback, not an error
    pass


class RequestReader:
    """httptools' callbacks for one connection, within ``limits``.

    State shared with the subclass: ``_stopped`` (set by the connection: read no further
    request), ``_requests`` (requests begun, hot replays included), ``_in_request`` and
    ``_in_body`` (which the subclass's ``on_message_complete`` clears), ``_head_bytes``.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._head_limit = limits.max_request_line + limits.max_header_bytes + 1024
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._headers_left = self._header_room = self._head_bytes = 0
        self._body: bytearray | None = None
        self._in_request = self._in_body = self._stopped = False
        self._method, self._conn_mode, self._requests = b"", CONN_DEFAULT, 0
        self._refusal: Problem | None = None
        self._hot = False  # the request in parsing may take the hot lane

    def _continue(self) -> None:
        """An ``Expect: 100-continue`` request passed its checks: the connection may say so."""
        raise NotImplementedError

    def on_message_begin(self) -> None:
        if self._stopped:  # a pipelined request after one whose answer closes: not read
            raise _Refused
        self._in_request = True
        self._requests += 1  # its header deadline is set only if it spans reads: see _feed
        self._url, self._headers, self._body, self._head_bytes = b"", {}, None, 0
        self._headers_left = self._limits.max_headers
        self._header_room = self._limits.max_header_bytes

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            self._refuse(_problem.uri_too_long(self._limits.max_request_line))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_left -= 1
        self._header_room -= len(name) + len(value)
        if self._headers_left < 0 or self._header_room < 0:
            self._over_limit()
        key = _COMMON_NAMES.get(name)
        if key is None:
            key = name.lower()
            if key not in _KEPT_HEADERS:
                return
        elif not key:
            return
        if key in self._headers:
            self._keep_again(key, value)
        else:
            self._headers[key] = value

    def _over_limit(self) -> None:
        limits = self._limits
        if self._headers_left < 0:
            self._refuse(_problem.headers_too_large(f"At most {limits.max_headers} headers."))
        self._refuse(
            _problem.headers_too_large(f"Headers are limited to {limits.max_header_bytes} bytes.")
        )

    def _keep_again(self, key: bytes, value: bytes) -> None:
        old = self._headers[key]
        if key == b"host":
            self._refuse(_problem.bad_request("More than one Host header.", close=True))
        else:
            self._headers[key] = old + b", " + value

    def on_headers_complete(self) -> None:
        self._in_body, self._head_bytes = True, 0
        parser, headers = self._parser, self._headers
        method = self._method = parser.get_method()
        if not parser.should_keep_alive():
            mode = CONN_CLOSE
        elif not _CONNECTION_HEADERS.isdisjoint(headers) and parser.get_http_version() == "1.0":
            mode = CONN_KEEP_ALIVE  # HTTP/1.0 keeps alive only when a Connection header says so
        else:
            mode = CONN_DEFAULT
        self._conn_mode = mode
        if _FRAMING_HEADERS.isdisjoint(headers):
            self._hot = mode != CONN_CLOSE and method == b"GET"
        else:
            self._hot = False
            self._check_framing()

    def _check_framing(self) -> None:
        headers = self._headers
        if b"transfer-encoding" in headers and (
            b"content-length" in headers or self._method in (b"GET", b"HEAD")
        ):
            self._refuse(
                _problem.bad_request("Transfer-Encoding is not accepted here.", close=True)
            )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            self._refuse(_problem.bad_request("Content-Length is not a number.", close=True))
        if int(length) > self._limits.max_body:
            self._refuse(_problem.content_too_large(self._limits.max_body))
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self._continue()

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            self._body = bytearray()
        if len(self._body) + len(body) > self._limits.max_body:
            self._refuse(_problem.content_too_large(self._limits.max_body))
        self._body += body

    def _request(self) -> Request:
        """The whole request just parsed, for the general path."""
        path, query = split_target(self._url)
        body = bytes(self._body) if self._body else b""
        return Request(self._method, path, query, self._headers, body, self._conn_mode)

    def _refuse(self, problem: Problem) -> None:
        self._refusal = problem
        raise _Refused

    def _parse_problem(self, exc: httptools.HttpParserError) -> Problem | None:
        """The answer to input httptools rejected: the refusal a callback raised, a 400 for
        malformed input, or None for bytes after a final request (ignored)."""
        refusal, self._refusal = self._refusal, None
        if refusal is None and self._stopped:
            return None
        if refusal is None:
            refusal = _problem.bad_request(
                f"Malformed HTTP request: {_problem.clip(str(exc))}", close=True
            )
        return refusal
