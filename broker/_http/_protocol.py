"""HTTP/1.1 on an ``asyncio.Protocol``: httptools parses, this module enforces the limits.

One ``HttpProtocol`` per connection. Requests are parsed by httptools' C parser (llhttp)
straight from ``data_received``; a request the handler can answer at once is answered with
one ``transport.write`` of prepared bytes. A request that must wait (a refresh) becomes a
task; responses still leave in request order (HTTP/1.1 pipelining), by queueing each reply
in a slot that the task fills.

Hostile or broken clients cannot hurt others: request line, header bytes, header count and
body size are capped; one timer per connection closes a client that is slow to send its
request or idle too long; a client that does not read its responses has its reading paused
(input is parsed in slices, so a pipelined burst cannot make unbounded output); any
malformed input gets a 400 and a close. A final response is followed by a half-close and a
short linger, so the client reads it instead of a connection reset; a connection past the
``Pool``'s budget gets its 503 and is closed at once, so a flood cannot hold descriptors.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast

import httptools

from broker._http import _problem
from broker._http._deadline import Deadline
from broker._http._hot import Choice, Lane
from broker._http._pool import Pool
from broker._http._problem import Problem
from broker._http._render import CONN_CLOSE, CONN_DEFAULT, CONN_KEEP_ALIVE
from broker._http._request import (
    ConnInfo,
    Handler,
    Limits,
    Request,
    Transport,
    conn_info,
    split_target,
)

SLICE = 4096  # bytes parsed between checks for backpressure
MAX_PIPELINE = 64  # unanswered requests per connection before reading pauses
MAX_REPLAY = 2048  # longest request remembered for replay (see _remember)
LINGER = 2.0  # seconds to wait for the client to close after our final response
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
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refused(Exception):  # a signal out of a parser callback, not an error
    pass


class _Slot:
    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection."""

    def __init__(
        self, handler: Handler, pool: Pool, kind: Transport, limits: Limits, tag: object
    ) -> None:
        self.tag = tag  # which listener accepted it, for shutdown
        self._handler, self._pool, self._kind, self._limits = handler, pool, kind, limits
        self._loop = asyncio.get_running_loop()
        self._transport = cast(asyncio.Transport, None)  # set in connection_made
        self._parser = httptools.HttpRequestParser(self)
        self._head_limit = limits.max_request_line + limits.max_header_bytes + 1024
        self.conn = ConnInfo(kind, None, "")
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._headers_left = self._header_room = self._head_bytes = 0
        self._body: bytearray | None = None
        self._in_request = self._in_body = False
        self._method, self._conn_mode, self._requests = b"", CONN_DEFAULT, 0
        self._queue: deque[_Slot] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = self._closing = self._lost = self._peer_eof = False
        self._write_paused = self._reading_paused = self._pumping = False
        self._paused_at = 0.0
        self._unfed: memoryview | None = None
        self._unfed_pos = 0
        self._refusal: Problem | None = None
        self._deadline = Deadline(self._loop, self._expire)
        self._lane = cast(Lane, None)  # set in connection_made
        self._hot = False  # the request in parsing may take the hot lane
        self._served = self._idle_mark = 0  # hot answers, and their count when idling began
        self._timed = 0  # the request whose header deadline is set
        self._replay: bytes = b""  # see _remember
        self._replay_choice: Choice = (None, None)

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self.conn = conn_info(self._kind, self._transport)
        refusal = self._pool.admit(self, self._kind)
        if refusal is not None:
            # Closed at once, without the usual linger: a flood of refused connections must
            # not hold descriptors, and this answer may be lost to a reset at worst.
            self._stopped = self._closing = True
            self._transport.write(self._handler.refuse(refusal, self.conn))
            self._transport.close()
            return
        self._handler.connected(self.conn)
        self._lane = self._handler.lane(self.conn)
        self._deadline.set(self._loop.time() + self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = self._stopped = True
        self._unfed = None
        self._deadline.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._pool.release(self, self._kind)

    def data_received(self, data: bytes) -> None:
        if data == self._replay and not (
            self._queue
            or self._in_request
            or self._write_paused
            or self._stopped
            or self._unfed is not None
        ):
            reply = self._lane.serve(self._replay_choice)
            if reply is not None:
                self._transport.write(reply)
                self._served += 1
                self._requests += 1
                return
        if self._stopped:
            return  # after the final response: discard until the client closes
        if (
            self._unfed is None
            and len(data) <= SLICE
            and not self._write_paused
            and len(self._queue) < MAX_PIPELINE
        ):
            served, requests = self._served, self._requests
            self._feed(data)
            if self._served != served:
                self._remember(data, served, requests)
            return
        self._stash(data)
        self._pump()

    def _remember(self, data: bytes, served: int, requests: int) -> None:
        """``data`` was one whole request, answered from the hot lane: the same bytes again
        on this connection (what keep-alive clients send) get the same answer without
        parsing. Their every check passed for these very bytes; the token is checked anew."""
        if (
            self._served == served + 1
            and self._requests == requests + 1
            and not self._in_request
            and len(data) <= MAX_REPLAY
        ):
            self._replay, self._replay_choice = data, self._lane.chosen

    def eof_received(self) -> bool:
        if self._closing:
            return False
        self._peer_eof = self._stopped = True
        return bool(self._queue)  # keep the socket half-open until pending answers are out

    def pause_writing(self) -> None:
        self._write_paused, self._paused_at = True, self._loop.time()
        self._settle()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._settle()
        self._pump()

    def close(self) -> list[asyncio.Task[None]]:
        """Close at once (service shutdown); returns the cancelled tasks, to be awaited."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not self._lost:
            self._transport.abort()
        return tasks

    # --- parser callbacks (httptools) --------------------------------------------------------

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
        if headers.get(b"expect", b"").lower() == b"100-continue" and not self._queue:
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._body is None:
            self._body = bytearray()
        if len(self._body) + len(body) > self._limits.max_body:
            self._refuse(_problem.content_too_large(self._limits.max_body))
        self._body += body

    def on_message_complete(self) -> None:
        self._in_request = self._in_body = False
        if self._hot and not self._queue:  # behind a pending answer: queue, the general way
            data = self._lane.answer(self._url, self._headers, self._conn_mode)
            if data is not None:
                self._transport.write(data)
                self._served += 1  # the idle deadline follows lazily: see _expire
                return
        path, query = split_target(self._url)
        body = bytes(self._body) if self._body else b""
        request = Request(self._method, path, query, self._headers, body, self._conn_mode)
        if self._conn_mode == CONN_CLOSE:
            self._stopped = True  # nothing after this request is read
        self._dispatch(request)

    def _refuse(self, problem: Problem) -> None:
        self._refusal = problem
        raise _Refused

    # --- requests and responses --------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        try:
            reply = self._handler.handle(request, self.conn)
        except Exception as exc:  # the handler should not raise; never let it kill the parser
            reply, request.conn_mode = self._handler.crashed(exc, self.conn), CONN_CLOSE
        if not isinstance(reply, bytes):
            self._defer(reply, request)
            return
        close = request.conn_mode == CONN_CLOSE  # the handler may have decided to close
        self._stopped = self._stopped or close
        self._send(reply, close)

    def _defer(self, reply: Coroutine[Any, Any, bytes], request: Request) -> None:
        slot = _Slot(None, request.conn_mode == CONN_CLOSE)
        self._queue.append(slot)
        task = self._loop.create_task(self._complete(slot, reply, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._settle()

    async def _complete(
        self, slot: _Slot, reply: Coroutine[Any, Any, bytes], request: Request
    ) -> None:
        try:
            slot.data = await reply
        except Exception as exc:  # as in _dispatch: a bug answers 500 (others carry on)
            slot.data, request.conn_mode = self._handler.crashed(exc, self.conn), CONN_CLOSE
        if request.conn_mode == CONN_CLOSE:
            slot.close = self._stopped = True
        self._flush()

    def _send(self, data: bytes, close: bool) -> None:
        if self._queue:
            self._queue.append(_Slot(data, close))
        else:
            self._write(data, close)

    def _flush(self) -> None:
        queue = self._queue
        while queue and queue[0].data is not None:
            slot = queue.popleft()
            self._write(cast(bytes, slot.data), slot.close)
            if slot.close:
                queue.clear()
                return
        self._settle()
        self._pump()

    def _write(self, data: bytes, close: bool) -> None:
        if self._lost:
            return
        self._transport.write(data)
        if close:
            self._shutdown()
        else:
            self._settle()

    def _fail(self, problem: Problem) -> None:
        self._stopped = True
        self._send(self._handler.refuse(problem, self.conn), close=True)

    def _shutdown(self) -> None:
        """After the final response: half-close, drain the client's input, then close."""
        self._stopped = self._closing = True
        self._unfed = None
        if self._transport.can_write_eof() and not self._peer_eof:
            self._transport.write_eof()
            self._deadline.set(self._loop.time() + min(LINGER, self._limits.header_timeout))
            if self._reading_paused:
                self._transport.resume_reading()
                self._reading_paused = False
        else:
            self._transport.close()

    # --- input: slices, backpressure ---------------------------------------------------------

    def _blocked(self) -> bool:
        return self._write_paused or len(self._queue) >= MAX_PIPELINE

    def _stash(self, data: bytes) -> None:
        if self._unfed is None:
            self._unfed, self._unfed_pos = memoryview(data), 0
        else:
            self._unfed, self._unfed_pos = (
                memoryview(bytes(self._unfed[self._unfed_pos :]) + data),
                0,
            )

    def _pump(self) -> None:
        """Parse stashed input a slice at a time while the client keeps up with its answers."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._unfed is not None and not self._stopped and not self._blocked():
                view, start = self._unfed, self._unfed_pos
                end = start + SLICE
                if end >= len(view):
                    self._unfed = None
                self._unfed_pos = end
                self._feed(view[start:end])
        finally:
            self._pumping = False
        self._throttle_reading()

    def _throttle_reading(self) -> None:
        if self._stopped:
            self._unfed = None
        want_pause = self._unfed is not None
        if want_pause != self._reading_paused and not self._closing:
            if want_pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()
            self._reading_paused = want_pause

    def _feed(self, chunk: bytes | memoryview) -> None:
        if not self._in_body:
            self._head_bytes += len(chunk)  # what httptools may be buffering for this head
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            self._stopped = True  # no protocol switch here: answer what came, then close
            self._settle()
        except httptools.HttpParserError as exc:
            self._on_parse_error(exc)
        else:
            if self._in_request or self._head_bytes > self._head_limit:
                self._unfinished()

    def _unfinished(self) -> None:
        """A request spans reads: cap its head; from now (about its first byte) it has
        header_timeout. (A request read whole needs neither; the first request's clock
        started with the connection.)"""
        if not self._in_body and self._head_bytes > self._head_limit:
            self._fail(_problem.headers_too_large("The request head is too large."))
        elif self._in_request and self._timed != self._requests:
            self._timed = self._requests
            if self._requests > 1:
                self._deadline.set(self._loop.time() + self._limits.header_timeout)

    def _on_parse_error(self, exc: httptools.HttpParserError) -> None:
        refusal, self._refusal = self._refusal, None
        if refusal is None and self._stopped:
            return  # bytes after a "Connection: close" request: ignored
        if refusal is None:
            refusal = _problem.bad_request(
                f"Malformed HTTP request: {_problem.clip(str(exc))}", close=True
            )
        self._fail(refusal)

    # --- the one timer -----------------------------------------------------------------------

    def _settle(self) -> None:
        """Set the deadline for what the connection waits on now (between requests)."""
        if self._closing or self._in_request:
            return
        if self._write_paused:
            deadline = self._paused_at + self._limits.idle_timeout
        elif self._queue:
            deadline = math.inf  # the broker is the slow one: its waits are bounded
        elif self._stopped:
            self._shutdown()
            return
        else:
            deadline = self._loop.time() + self._limits.idle_timeout
            self._idle_mark = self._served
        self._deadline.set(deadline)

    def _expire(self) -> None:
        if self._closing or self._write_paused:
            self._transport.abort()  # lingered long enough, or the client does not read
        elif self._in_request:
            self._fail(_problem.request_timeout(self._limits.header_timeout))
        elif self._queue:
            pass
        elif self._served != self._idle_mark:
            # Hot answers since the deadline was set (they do not move it, to stay cheap):
            # idle from now, so a busy connection is closed idle_timeout to twice that after
            # its last request.
            self._idle_mark = self._served
            self._deadline.set(self._loop.time() + self._limits.idle_timeout)
        else:
            self._transport.close()  # idle
