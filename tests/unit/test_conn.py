"""gvmrt.proxy.conn.Conn on real sockets (a socketpair), on both event loops the sidecar runs on:
bounded reading, the lazy per-connection timer, and writes that wait only when paused."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gvmrt.proxy import h1
from gvmrt.proxy.conn import MAX_EVENTS, READ_LIMIT, Conn

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


OPEN: list[Any] = []      # what a test opened: closed after it, pass or fail, so a failure never hangs


def run(factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        try:
            async with asyncio.timeout(30):
                await main()
        finally:
            for thing in reversed(OPEN):
                if isinstance(thing, asyncio.Future):
                    thing.cancel()
                else:
                    thing.close()
            OPEN.clear()
            for _ in range(3):          # let the transports finish closing before the loop goes
                await asyncio.sleep(0)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(bounded())


async def connected(parser: h1.RequestParser | h1.ResponseParser) -> tuple[Conn, socket.socket]:
    ours, peer = socket.socketpair()
    conn = Conn(parser)
    OPEN.append(peer)               # `ours` belongs to the transport: closed through conn
    await asyncio.get_running_loop().create_connection(lambda: conn, sock=ours)
    OPEN.append(conn)
    peer.setblocking(False)
    return conn, peer


def track(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    OPEN.append(fut)
    return fut


@pytest.mark.parametrize("loop", LOOPS)
def test_reading_pauses_while_body_waits_and_every_byte_arrives(loop: str) -> None:
    size = 4 * 1024 * 1024

    async def main() -> None:
        ev = asyncio.get_running_loop()
        parser = h1.ResponseParser()
        parser.expect(b"GET")
        conn, peer = await connected(parser)
        sender = track(asyncio.ensure_future(ev.sock_sendall(
            peer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size)))
        deadline = time.monotonic() + 5
        while conn._paused is None:
            assert time.monotonic() < deadline, "reading never paused"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        # Paused: what waits is bounded by the limit plus one read, not the 4 MiB body.
        assert conn._queued <= READ_LIMIT + 256 * 1024, conn._queued
        assert not sender.done()
        got = 0
        head = await conn.next(1)
        assert isinstance(head, h1.ResponseHead) and head.content_length == size
        while True:
            event = await conn.next(2)
            if isinstance(event, h1.EndOfMessage):
                break
            assert isinstance(event, h1.Data)
            got += len(event.data)
        assert got == size
        await sender
        conn.close()
        peer.close()
    run(LOOPS[loop], main)


@pytest.mark.parametrize("loop", LOOPS)
def test_pipelined_heads_nobody_takes_pause_reading_too(loop: str) -> None:
    """Not only body bytes count: a client that pipelines bodiless requests faster than they are
    served (or never reads its answers) must be held back by TCP, not queued without limit."""
    async def main() -> None:
        ev = asyncio.get_running_loop()
        conn, peer = await connected(h1.RequestParser())
        request = b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n"
        sender = track(asyncio.ensure_future(ev.sock_sendall(peer, request * 200_000)))   # ~9 MB of heads
        deadline = time.monotonic() + 5
        while conn._paused is None:
            assert time.monotonic() < deadline, "reading never paused"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        # Bounded by the event limit plus what one read can carry, not by what the peer sent.
        assert len(conn.events) <= MAX_EVENTS + 2 * (256 * 1024 // len(request)), len(conn.events)
        assert not sender.done()
        heads = 0
        while heads < 200_000:
            event = await conn.next(2)
            if isinstance(event, h1.RequestHead):
                heads += 1
        await sender
        conn.close()
        peer.close()
    run(LOOPS[loop], main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_read_and_a_drain_waiting_at_once_each_time_out(loop: str) -> None:
    async def main() -> None:
        conn, peer = await connected(h1.RequestParser())
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not conn.put(b"w" * 65536):
            await asyncio.sleep(0)
        t = time.monotonic()
        read = track(asyncio.ensure_future(conn.next(0.3)))
        drain = track(asyncio.ensure_future(conn.drained(0.6)))
        for fut, low in ((read, 0.28), (drain, 0.58)):
            with pytest.raises(TimeoutError):
                await fut
            assert low <= time.monotonic() - t < low + 1.0
        conn.close()
        peer.close()
    run(LOOPS[loop], main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_wait_times_out_at_its_own_deadline_after_an_earlier_wait_ended(loop: str) -> None:
    async def main() -> None:
        ev = asyncio.get_running_loop()
        conn, peer = await connected(h1.RequestParser())
        ev.call_later(0.1, peer.send, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        t0 = time.monotonic()
        head = await conn.next(0.3)                 # arms the timer for t0 + 0.3; ends at ~0.1
        assert isinstance(head, h1.RequestHead)
        assert isinstance(await conn.next(0.3), h1.EndOfMessage)
        t1 = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.next(0.4)                    # its deadline is t1 + 0.4, not the stale t0 + 0.3
        waited = time.monotonic() - t1
        assert 0.38 <= waited < 1.5, waited
        assert t1 - t0 < 0.3
        with pytest.raises(TimeoutError):           # and a shorter wait than the armed timer re-arms it
            await conn.next(0.05)
        conn.close()
        peer.close()
    run(LOOPS[loop], main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_write_waits_only_when_paused_and_then_under_its_timeout(loop: str) -> None:
    async def main() -> None:
        conn, peer = await connected(h1.RequestParser())
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        chunk = b"w" * 65536
        writes = 0
        while not conn.put(chunk):                  # the peer never reads: the transport pauses us
            writes += 1
            assert writes < 1000, "never paused"
            await asyncio.sleep(0)
        t = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.drained(0.2)
        assert 0.18 <= time.monotonic() - t < 1.5
        peer.close()                                # the peer goes away: a write now fails at once
        for _ in range(100):
            if conn.is_closing():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(ConnectionError):
            await conn.send(b"x", 1)
        conn.close()
    run(LOOPS[loop], main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_malformed_message_and_a_reset_are_raised_to_the_reader(loop: str) -> None:
    async def main() -> None:
        conn, peer = await connected(h1.RequestParser())
        peer.send(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
        with pytest.raises(h1.ProtocolError):
            await conn.next(1)
        conn.close()
        peer.close()
        conn2, peer2 = await connected(h1.RequestParser())
        peer2.send(b"GET / HTTP/1.1\r\nHo")
        peer2.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer2.close()                               # RST in the middle of a head
        with pytest.raises((ConnectionError, h1.ProtocolError)):
            await conn2.next(1)
        conn2.close()
    run(LOOPS[loop], main)


def test_the_sidecar_runs_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from gvmrt import evloop

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv("GVMRT_EVENT_LOOP", raising=False)
    assert evloop.name() == "uvloop" and evloop.run(which()).startswith("uvloop")
    monkeypatch.setenv("GVMRT_EVENT_LOOP", "asyncio")
    assert evloop.name() == "asyncio" and evloop.run(which()).startswith("asyncio")
