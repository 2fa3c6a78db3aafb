"""HTTP/1.1 on an ``asyncio.Protocol``: httptools parses, this module enforces the limits.

One ``HttpProtocol`` per connection. Requests are parsed by httptools' C parser (llhttp)
straight from ``data_received``; a request the handler can answer at once is answered with
one ``transport.write`` of prepared bytes. A request that must wait (a refresh) becomes a
task; responses still leave in request order (HTTP/1.1 pipelining), by queueing each reply
in a slot that the task fills.

Hostile or broken clients cannot hurt others: request line, header bytes, header count and
body size are capped (``_parse.RequestReader``, the parser callbacks this class inherits);
one timer per connection closes a client that is slow to send its request or idle too long;
a client that does not read its responses has its reading paused (input is parsed in
slices, so a pipelined burst cannot make unbounded output); any malformed input gets a 400
and a close. A final response is followed by a half-close and a short linger, so the client
reads it instead of a connection reset; a connection past the ``Pool``'s budget gets its 503
and is closed at once, so a flood cannot hold descriptors.
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
from broker._http._parse import RequestReader
from broker._http._pool import Pool
from broker._http._problem import Problem
from broker._http._render import CONN_CLOSE
from broker._http._request import ConnInfo, Handler, Limits, Request, Transport, conn_info

SLICE = 4096  # bytes parsed between checks for backpressure
MAX_PIPELINE = 64  # unanswered requests per connection before reading pauses
MAX_REPLAY = 2048  # longest request remembered for replay (see _remember)
LINGER = 2.0  # seconds to wait for the client to close after our final response
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Slot:
    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close


class HttpProtocol(RequestReader, asyncio.Protocol):
    """One HTTP/1.1 connection."""

    def __init__(
        self, handler: Handler, pool: Pool, kind: Transport, limits: Limits, tag: object
    ) -> None:
        super().__init__(limits)
        self.tag = tag  # which listener accepted it, for shutdown
        self._handler, self._pool, self._kind = handler, pool, kind
        self._loop = asyncio.get_running_loop()
        self._transport = cast(asyncio.Transport, None)  # set in connection_made
        self.conn = ConnInfo(kind, None, "")
        self._queue: deque[_Slot] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = self._lost = self._peer_eof = False
        self._write_paused = self._reading_paused = self._pumping = False
        self._paused_at = 0.0
        self._unfed: memoryview | None = None
        self._unfed_pos = 0
        self._deadline = Deadline(self._loop, self._expire)
        self._lane = cast(Lane, None)  # set in connection_made
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

    # --- parser callbacks (the rest in _parse.RequestReader) ---------------------------------

    def _continue(self) -> None:
        if not self._queue:  # an interim response must not overtake pending answers
            self._transport.write(_CONTINUE)

    def on_message_complete(self) -> None:
        self._in_request = self._in_body = False
        if self._hot and not self._queue:  # behind a pending answer: queue, the general way
            data = self._lane.answer(self._url, self._headers, self._conn_mode)
            if data is not None:
                self._transport.write(data)
                self._served += 1  # the idle deadline follows lazily: see _expire
                return
        request = self._request()
        if self._conn_mode == CONN_CLOSE:
            self._stopped = True  # nothing after this request is read
        self._dispatch(request)

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
            problem = self._parse_problem(exc)
            if problem is not None:
                self._fail(problem)
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
