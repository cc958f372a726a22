"""One sidecar connection's I/O: an asyncio Protocol that feeds an h1 parser as bytes arrive.

Both ends of a proxied request (the agent's connection and each pooled upstream connection) are a
`Conn`. Bytes go from the transport straight into the connection's parser (`data_received`); the
events wait in a deque until the serving coroutine takes them with `next(timeout)`. Nothing in
between: no StreamReader buffer to copy through, no read() slicing, and a wait costs one future
and one timer handle rather than an `asyncio.timeout` context (which looks up the current task,
a getpid(2) on this Python, and reschedules). On the hot path of a keep-alive request the data is
usually there already, and `next` returns without suspending at all.

Memory stays bounded the way a StreamReader bounds it: when the body bytes waiting in the deque
pass `READ_LIMIT`, or more than `MAX_EVENTS` events wait (a client pipelining bodiless requests
faster than they are served, or not reading its answers), the transport stops reading until the
consumer has taken them, and TCP holds the peer back. Writes go
straight to the transport; a writer waits (under its timeout) only while the transport has paused
it (its buffer above the high-water mark), so a slow reader at the other end slows the sender
instead of filling the sidecar's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from gvmrt.proxy import h1

__all__ = ["Conn", "MAX_EVENTS", "READ_LIMIT", "WRITE_HIGH_WATER"]

READ_LIMIT = 64 * 1024          # body bytes parsed but not yet taken, before reading pauses
MAX_EVENTS = 8                  # events of any kind waiting, before reading pauses (heads are <= 64 KiB)
WRITE_HIGH_WATER = 64 * 1024    # transport buffer above which a writer waits


class Conn(asyncio.Protocol):
    """A connection whose incoming bytes are parsed as they arrive (see the module docstring)."""

    def __init__(self, parser: h1.RequestParser | h1.ResponseParser,
                 on_made: Any = None) -> None:
        self.parser = parser
        self.transport: asyncio.Transport | None = None
        self.events: deque[h1.Event] = deque()
        self.eof = False               # the peer closed its side (or the connection is gone)
        self.received = 0              # bytes read so far (tells a stale pooled upstream apart)
        self.error: BaseException | None = None   # a parse error or the reset that ended it
        self._queued = 0               # body bytes in `events`
        self._paused: asyncio.BaseTransport | None = None   # the transport whose reading we paused
        self._waiter: asyncio.Future[None] | None = None    # a read waiting for bytes
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None     # a write waiting for resume_writing
        # One lazy timer per connection instead of one per wait: a wait sets its deadline (a
        # float; a read and a drain each have their own); the timer is armed only when no armed
        # one fires early enough, and when it fires before a deadline (the wait ended and a later
        # one began) it re-arms for the earliest one left.
        self._read_deadline: float | None = None
        self._drain_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed: asyncio.Future[None] | None = None
        self._lost = False
        self._on_made = on_made
        # The loop, looked up once: asyncio.get_running_loop() costs a getpid(2) per call on
        # this Python (3.11 checks for a fork), ~5 % of the sidecar's time when done per wait.
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        if self._on_made is not None:
            on_made, self._on_made = self._on_made, None
            on_made(self)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.error is not None:
            return
        try:
            events = self.parser.feed(data)
        except h1.ProtocolError as exc:
            self.error = exc
        else:
            for event in events:
                if type(event) is h1.Data:
                    self._queued += len(event.data)
            self.events.extend(events)
            if (self._queued > READ_LIMIT or len(self.events) > MAX_EVENTS) and self._paused is None \
                    and self.transport is not None:
                # Remembered: during start_tls this is the raw transport, not the TLS one after it.
                self._paused = self.transport
                self.transport.pause_reading()  # type: ignore[attr-defined]
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        if self.error is None:
            try:
                self.events.extend(self.parser.feed_eof())
            except h1.ProtocolError as exc:
                self.error = exc
        self._wake()
        # Plain TCP: keep our side open to answer a client that half-closed after its request
        # (as StreamReaderProtocol does). TLS cannot half-close: let the transport close.
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof:
            self.eof = True
            if exc is not None and self.error is None:
                self.error = exc if isinstance(exc, ConnectionError) else ConnectionResetError(str(exc))
            elif self.error is None:
                try:
                    self.events.extend(self.parser.feed_eof())
                except h1.ProtocolError as perr:
                    self.error = perr
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("connection lost"))
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- reading --------------------------------------------------------------------------

    async def next(self, timeout: float) -> h1.Event | None:
        """The next event, or None at EOF between messages. Raises h1.ProtocolError, TimeoutError,
        ConnectionError."""
        while True:
            if self.events:
                return self.take()
            if self.error is not None:
                raise self.error
            if self.eof:
                return None
            loop = self._loop or asyncio.get_running_loop()
            fut = self._waiter = loop.create_future()
            self._read_deadline = loop.time() + timeout
            self._arm(loop, self._read_deadline)
            try:
                await fut
            finally:
                self._waiter = None
                self._read_deadline = None

    def take(self) -> h1.Event | None:
        """The next event if it is parsed already, else None (never waits, never raises): the
        serving coroutine's fast path, `ev = conn.take() or await conn.next(timeout)`."""
        if not self.events:
            return None
        event = self.events.popleft()
        if type(event) is h1.Data:
            self._queued -= len(event.data)
        paused = self._paused
        if paused is not None and self._queued <= READ_LIMIT // 2 and len(self.events) <= MAX_EVENTS // 2:
            self._paused = None
            if not paused.is_closing():
                paused.resume_reading()  # type: ignore[attr-defined]
        return event

    @property
    def pending(self) -> bool:
        """Events parsed and not yet taken."""
        return bool(self.events)

    # --- writing --------------------------------------------------------------------------

    def put(self, data: bytes) -> bool:
        """Write without waiting; True if the transport asked us to stop, and the caller must
        `await drained(timeout)` before writing more. Raises ConnectionResetError once closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        if data:
            transport.write(data)
        return self._write_paused

    async def send(self, data: bytes, timeout: float) -> None:
        """Write, then wait (under `timeout`) only if the transport asked us to stop."""
        if self.put(data):
            await self.drained(timeout)

    async def drained(self, timeout: float) -> None:
        """Wait (under `timeout`) until the transport takes writes again."""
        if self._write_paused:
            loop = self._loop or asyncio.get_running_loop()
            fut = self._drain = loop.create_future()
            self._drain_deadline = loop.time() + timeout
            self._arm(loop, self._drain_deadline)
            try:
                await fut
            finally:
                self._drain = None
                self._drain_deadline = None

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = loop.call_at(deadline, self._on_timer), deadline

    def _on_timer(self) -> None:
        self._timer = None
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        left = []
        for deadline, fut in ((self._read_deadline, self._waiter), (self._drain_deadline, self._drain)):
            if deadline is None or fut is None or fut.done():
                continue                # nothing waits there now; its next wait arms the timer again
            if now >= deadline:
                fut.set_exception(TimeoutError())
            else:
                left.append(deadline)
        if left:
            self._arm(loop, min(left))

    # --- the rest of a StreamWriter's face ------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        if self._lost or self.transport is None:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await self._closed

    def usable(self) -> bool:
        """For a pooled connection: still open, nothing unexpected read (issue 3's EOF check)."""
        return not (self.eof or self.events or self.error is not None or self.parser.buffered
                    or self.transport is None or self.transport.is_closing())
