"""The sidecar's socket and TLS I/O: an explicit HTTP proxy that decides every request by policy.

This is the one module of the proxy with side effects (STYLE.md habit 2): `h1` parses,
`gvmrt.policy` decides, `audit` records, `upstream` dials; here they are wired to sockets.

Clients speak to it as to any explicit proxy (HTTP_PROXY/HTTPS_PROXY):

- ``GET http://host/path HTTP/1.1`` (absolute form, RFC 9112 §3.2.2): decided on the URL's host,
  forwarded in origin form with Host set from the URL (a Host header never chooses the target).
- ``CONNECT host:443``: answered 200 by the sidecar itself, then TLS is terminated with a leaf for
  the CONNECT host from the per-container CA, and the HTTP/1.1 requests inside are decided on the
  CONNECT authority; a Host header that names anything else is denied.

TLS runs in the event loop's native SSL transport (`loop.start_tls`, `create_connection(ssl=)`)
because driving TLS from Python measured ~3x slower (DESIGN.md §6). Each connection is a
`conn.Conn` protocol that parses as bytes arrive; bodies are streamed as h1 `Data` events, with
reading paused while more than READ_LIMIT of them wait; the only buffering is a request body of at
most MAX_JSON_BODY, read before the decision so JSON body rules can see it.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import functools
import itertools
import json
import os
import secrets
import socket
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gvmrt.policy.canon import BadHost, canonical_host
from gvmrt.policy.decision import Decision
from gvmrt.policy.matcher import MAX_JSON_BODY, CompiledPolicy, Verdict
from gvmrt.proxy import dns, h1, sniff
from gvmrt.audit.chain import VERSION, Entry, json_string, json_value
from gvmrt.audit.writer import AuditError, AuditLog, record_time
from gvmrt.linux.netns import BACKLOG
from gvmrt.proxy.certs import CertificateAuthority, LeafCache
from gvmrt.proxy.credentials import Credentials
from gvmrt.proxy.operator import Approvals, Events, Held
from gvmrt.proxy.conn import Conn
from gvmrt.proxy.upstream import Pool, Resolver, Upstream, UpstreamError

__all__ = ["serve", "Sidecar", "Timeouts", "tune_gc"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds; every socket read and write is under one of these (STYLE.md habit 8)."""

    client_idle: float = 60.0      # waiting for the next request head on a kept-alive connection
    read: float = 30.0             # any other read, client or upstream
    write: float = 30.0            # each write + drain
    tls_handshake: float = 10.0


@dataclass(slots=True)
class _Exchange:
    """What the audit line of one request says."""

    request_id: str
    method: str
    host: str
    port: int
    path: str
    started: float = field(default_factory=time.monotonic)
    rule: str | None = None
    decision: str = "deny"
    reason: str = ""
    status: int | None = 0
    bytes_out: int = 0             # request body bytes, agent -> upstream
    bytes_in: int | None = 0       # response body bytes, upstream -> agent (declared length when streamed)
    flagged: bool = False
    container: str = ""
    mode: str = "proxy"            # "proxy" (explicit), "transparent" (a captured port)
    approval: dict[str, Any] | None = None   # a held request: how it was answered
    would: str | None = None                 # watch mode: what enforce mode would have decided
    credential: str | None = None            # the credential injected (its name, never its value)
    decided: bool = False                    # its decision record is written (an outcome follows)
    ended: tuple[str, float] | None = None   # (time, duration_ms) when its response head came

    def plain(self) -> bool:
        """No approval, credential or watch-mode note: its records have the fixed shape that
        `render_decision` and `render_outcome` write."""
        return self.approval is None and self.credential is None and self.would is None

    def entry(self) -> dict[str, Any]:
        """The decision record: everything known when the request was decided (and, for a request
        answered by the sidecar itself, its status). A forwarded request's decision is written
        before a byte of it goes upstream, with status null; `outcome()` follows it."""
        entry = {
            "time": record_time(), "record": "decision",
            "container": self.container, "mode": self.mode, "request_id": self.request_id, "method": self.method, "host": self.host, "port": self.port,
            "path": self.path, "rule": self.rule, "decision": self.decision, "reason": self.reason,
            "status": self.status, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3), "flagged": self.flagged,
        }
        if self.approval is not None:
            entry["approval"] = self.approval
        if self.credential is not None:
            entry["credential"] = self.credential
        if self.would is not None:
            entry["would"] = self.would
        return entry

    # The same records as canonical JSON (audit.chain.Rendered), for a plain exchange: written
    # out field by field rather than built as a dict and sorted by the general encoder, which
    # costs ~3 µs more per record, two records per request. Keys in sorted order; strings
    # through json_string like the encoder's; tests/unit/test_audit_render.py holds both to
    # `canonical` of entry() and outcome().

    def render_decision(self, seq: int, prev: str) -> str:
        return (f'{{"bytes_in":{_json_int(self.bytes_in)},"bytes_out":{self.bytes_out:d},'
                f'"container":{_js(self.container)},"decision":{_js(self.decision)},'
                f'"duration_ms":{round((time.monotonic() - self.started) * 1000, 3)!r},'
                f'"flagged":{_json_bool(self.flagged)},"host":{_js(self.host)},'
                f'"method":{_js(self.method)},"mode":{_js(self.mode)},"path":{_js(self.path)},'
                f'"port":{self.port:d},"prev":"{prev}","reason":{_js(self.reason)},"record":"decision",'
                f'"request_id":{_js(self.request_id)},"rule":{"null" if self.rule is None else _js(self.rule)},'
                f'"seq":{seq:d},"status":{_json_int(self.status)},"time":"{record_time()}","v":{VERSION:d}}}')

    def render_outcome(self, seq: int, prev: str) -> str:
        when, duration = self.ended or (record_time(), round((time.monotonic() - self.started) * 1000, 3))
        return (f'{{"bytes_in":{_json_int(self.bytes_in)},"bytes_out":{self.bytes_out:d},'
                f'"container":{_js(self.container)},"duration_ms":{duration!r},'
                f'"flagged":{_json_bool(self.flagged)},"prev":"{prev}","record":"outcome",'
                f'"request_id":{_js(self.request_id)},"seq":{seq:d},"status":{_json_int(self.status)},'
                f'"time":"{when}","v":{VERSION:d}}}')

    def outcome(self, reason: str | None = None) -> dict[str, Any]:
        """How a forwarded request ended: status (0 if the client went away), bytes, duration."""
        entry = {
            "time": record_time(), "record": "outcome", "container": self.container,
            "request_id": self.request_id, "status": self.status, "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out, "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "flagged": self.flagged,
        }
        if reason:
            entry["reason"] = reason
        if self.credential is not None:
            entry["credential"] = self.credential
        return entry


_js = json_string


def _json_int(value: int | None) -> str:
    if type(value) is int:
        return f"{value:d}"
    return "null" if value is None else json_value(value)     # a bool, say: as canonical() has it


def _json_bool(value: bool) -> str:
    return "true" if value is True else "false" if value is False else json_value(value)


# Request ids: a random prefix per process and a counter (unique, and no getrandom(2) per request).
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def tune_gc() -> None:
    """For a long-lived sidecar: what was imported and built at start is never garbage, so move it
    out of the collector's way (gc.freeze), and look at the older generations rarely.

    The young generation keeps the default threshold (700): what a request allocates dies by
    reference count and never counts towards it, so young collections stay rare and small. A
    threshold of 20,000 (tried first, to collect "less often") made each young collection walk
    ~20k live objects: ~4.6 ms, cache-cold, several times a second, and p99 at 16 HTTPS
    connections went from 2.5 to 6-7 ms with no gain in throughput (HTTP at 64 connections lost
    13 %), measured side by side in one bench-proxy setup."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 100, 100)


def _request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids) & 0xFFFFFFFF:08x}"


# asyncio's TLS protocol allocates (and zero-fills) a 256 KiB read buffer per connection, two
# per proxied HTTPS request: 64 client tunnels cost 32 MB. A TLS record is at most 16 KiB.
asyncio.sslproto.SSLProtocol.max_size = 16 * 1024   # one TLS record


class _Close(Exception):
    """End this client connection quietly (EOF, timeout, reset, or after a response that closes it)."""


class Sidecar:
    """One proxy instance: the policy, CA, audit writer and upstream pool shared by all connections."""

    def __init__(self, policy: CompiledPolicy, ca: CertificateAuthority, audit: AuditLog, *,
                 upstream_cafile: str | None = None, allow_private: Collection[str] = frozenset(),
                 resolve: Resolver | None = None, timeouts: Timeouts = Timeouts(), container: str = "",
                 credentials: Credentials | None = None, dns_conf: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.credentials = credentials
        conf = dns_conf or {}
        self.dns_unknown_delay = conf.get("unknown_delay_ms", 300) / 1000
        self.dns_tunnel_delay = conf.get("tunnel_delay_ms", 2000) / 1000
        self.tunnelling = dns.Tunnelling(per_parent=conf.get("tunnel_threshold", 20))
        self.container = container
        self.leaves = LeafCache(ca)
        self.audit = audit
        self.timeouts = timeouts
        self.pool = Pool(resolve=resolve, allow_private={_canon(h) for h in allow_private},
                         upstream_cafile=upstream_cafile)
        # Live client connections: asyncio.start_server's handler tasks are not cancelled when the
        # server stops (3.11), so serve() cancels them itself and nothing is left to the GC.
        self.tasks: set[asyncio.Task] = set()
        self.events = Events()
        self.approvals = Approvals(self.events)
        self._outcomes: list[Entry] = []
        self._loop: asyncio.AbstractEventLoop | None = None     # set by start(); see conn.Conn._loop

    # --- DNS -------------------------------------------------------------------------------

    async def dns_query(self, msg: bytes, dst: str, transport: str) -> bytes | None:
        """Answer one DNS query the jail sent to `dst`:53, and record it. None: drop it."""
        ex = _Exchange(_request_id(), "DNS", dst, 53, "", container=self.container, mode=f"dns-{transport}")
        try:
            q = dns.parse(msg)
        except dns.DNSError as exc:
            ex.decision, ex.reason, ex.flagged, ex.status = "deny", f"malformed DNS query: {exc.reason}", True, \
                exc.rcode if exc.rcode is not None else -1
            if not await self._dns_record(ex):
                return None
            return dns.error_reply(exc)
        ex.host, ex.path = q.name, q.type_name
        status, rule, why = self._dns_status(q.name)
        ex.rule = rule
        if status == "denied":
            ex.decision, ex.reason, ex.status, ex.flagged = "deny", why, dns.NXDOMAIN, True
            if not await self._dns_record(ex):
                return dns.answer(q, [], rcode=dns.REFUSED)     # a denial nobody can see is not given
            return dns.answer(q, [], rcode=dns.NXDOMAIN)
        ex.status = dns.NOERROR       # the answer's rcode is decided after the record; see the log's reason
        tunnel = self.tunnelling.observe(q.name)
        delay = self.dns_tunnel_delay if tunnel else self.dns_unknown_delay if status == "unknown" else 0.0
        ex.decision = "delay" if delay else "allow"
        ex.flagged = bool(tunnel) or status == "unknown"
        ex.reason = "; ".join(r for r in (why, tunnel) if r)
        # Recorded before the name goes anywhere (the host's resolver included); a query that
        # cannot be recorded is refused, not resolved (fail closed).
        if not await self._dns_record(ex):
            return dns.answer(q, [], rcode=dns.REFUSED)
        if delay:
            await asyncio.sleep(delay)
        addresses: list[str] = []
        rcode = dns.NOERROR
        if q.qtype in (dns.A, dns.AAAA) and q.name:
            try:
                addresses = await self.pool.resolve_name(q.name)
            except OSError:
                rcode = dns.NXDOMAIN
            except Exception:  # noqa: BLE001 - whatever the resolver makes of a name: no answer
                rcode = dns.SERVFAIL
        return dns.answer(q, addresses, rcode=rcode)

    def _dns_status(self, name: str) -> tuple[str, str | None, str]:
        """("known" | "unknown" | "denied", rule id, why) for a name, from the policy's host index."""
        try:
            host = canonical_host(name)
        except BadHost:
            return "unknown", None, "name the policy cannot name"
        cands = self.policy.candidates(host)
        if not cands:
            if self.policy.default.action == "deny":
                return "denied", None, "no rule covers this name and the default is deny"
            return "unknown", None, "no rule covers this name"
        flat = [c for c in cands if c.decision.action == "deny" and c.methods is None and c.ports is None
                and c.path_match is None and c.query is None and c.json_fields is None]
        if len(flat) == len(cands):
            return "denied", flat[0].id, f"rule {flat[0].id!r} denies every request to this name"
        return "known", cands[0].id, ""

    async def _dns_record(self, ex: _Exchange) -> bool:
        try:
            await self._write_entry(ex.entry(), sync=ex.decision != "allow")
        except AuditError:
            return False
        return True

    async def dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP (RFC 7766): two-byte length, message; several per connection."""
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        dst = _unmapped(writer.get_extra_info("sockname")[0])
        try:
            while True:
                async with asyncio.timeout(self.timeouts.client_idle):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    msg = await reader.readexactly(size)
                reply = await self.dns_query(msg, dst, "tcp")
                if reply is None:
                    return
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(self.timeouts.write):
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _prefetch(self, host: str, port: int) -> None:
        """On a new tunnel to a name the policy names: resolve it during the TLS handshake."""
        if self._dns_status(host)[0] == "known":
            self.pool.prefetch(("https", host, port))

    def reload(self, policy: CompiledPolicy, allow_private: Collection[str]) -> None:
        """Swap the policy: one reference assignment on the loop's thread, so a request is decided
        wholly by the old set or wholly by the new (each reads `self.policy` once), and requests
        already decided finish under the rules they started with."""
        self.policy = policy
        self.pool.allow_private = frozenset(_canon(h) for h in allow_private)

    def start(self) -> None:
        """Begin the log's periodic work (seals, group commit): once the event loop runs."""
        self._loop = asyncio.get_running_loop()
        self._audit_task = asyncio.ensure_future(self.audit.run())

    async def shutdown(self) -> None:
        """Cancel every client connection still being served and wait for each to close."""
        if getattr(self, "_audit_task", None) is not None:
            self._audit_task.cancel()
        tasks = [t for t in self.tasks if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._outcomes:
            self._flush_outcomes()
        for conn in self.pool.close():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await conn.wait_closed()

    # --- connections -----------------------------------------------------------------------

    def protocol(self) -> Conn:
        """The protocol of one explicit-proxy client connection (`loop.create_server`'s factory):
        once connected, a task serves it."""
        return Conn(h1.RequestParser(), on_made=self._spawn)

    def _spawn(self, conn: Conn) -> None:
        task = asyncio.get_running_loop().create_task(self.handle(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, conn: Conn) -> None:
        """Serve one client connection until it closes or errs."""
        try:
            await self._serve(conn, tunnel=None)
        except (_Close, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            await _closed(conn)

    async def captured(self, sock: socket.socket) -> None:
        """Serve a connection the jail made to any address on a captured port (transparent mode).

        The kernel delivered it here because of the jail's local routes; getsockname() is the
        address the agent dialled. The first bytes (peeked, so TLS still sees them) say whether it
        is TLS, decided and dialled by its SNI, or plain HTTP, decided and dialled by its Host
        header; the dialled address is only recorded. Anything else is closed and recorded.
        """
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        loop = asyncio.get_running_loop()
        conn: Conn | None = None
        try:
            dst = sock.getsockname()
            address, port = _unmapped(dst[0]), dst[1]
            sock.setblocking(False)
            try:
                first = await self._peek(sock)
            except (TimeoutError, ConnectionError) as exc:
                await self._refused(address, port, "nothing sent within the read timeout"
                                    if isinstance(exc, TimeoutError) else f"connection reset ({exc})")
                return
            if not first:
                await self._refused(address, port, "closed without sending anything")
                return
            hello = sniff.classify(first)
            protocol = Conn(h1.RequestParser())
            if hello.tls:
                host = None
                if hello.sni is not None:
                    try:
                        host = _canon(hello.sni)
                        ctx = self.leaves.context_for(host)
                    except (BadHost, ValueError):
                        hello = sniff.Hello(tls=True, problem=f"TLS SNI {hello.sni!r} is not a valid host name")
                if hello.problem is not None or host is None:
                    await self._refused(address, port, hello.problem or "no SNI")
                    return
                self._prefetch(host, port)
                try:
                    await loop.connect_accepted_socket(
                        lambda: protocol, sock, ssl=ctx, ssl_handshake_timeout=self.timeouts.tls_handshake)
                except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
                    await self._refused(address, port, f"TLS handshake for {host} failed: {_why(exc)}")
                    return
                conn = protocol
                await self._serve(conn, tunnel=(host, port), mode="transparent", address=address)
            else:
                await loop.connect_accepted_socket(lambda: protocol, sock)
                conn = protocol
                await self._serve(conn, tunnel=None, origin_port=port, mode="transparent", address=address)
        except (_Close, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            if conn is not None:
                await _closed(conn)
            else:
                sock.close()

    async def _peek(self, sock: socket.socket) -> bytes:
        """The connection's first bytes, left in the socket (MSG_PEEK): a whole TLS record if it is TLS."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeouts.read):
            want = 1
            while True:
                ready = loop.create_future()
                loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(sock.fileno())
                data = sock.recv(sniff.MAX_HELLO, socket.MSG_PEEK)
                if not data:
                    return b""
                more = sniff.needed(data)
                if not more or more > sniff.MAX_HELLO or len(data) >= more:
                    return data
                if len(data) == want:
                    # The rest of the record is on its way; the socket stays readable with what
                    # is already queued, so wait a little rather than spin.
                    await asyncio.sleep(0.002)
                want = len(data)

    async def _refused(self, address: str, port: int, reason: str, mode: str = "transparent") -> None:
        """Record a connection that was closed before any request (no SNI, not TLS/HTTP, a failed handshake)."""
        ex = _Exchange(_request_id(), "-", address, port, "", container=self.container, mode=mode)
        ex.reason, ex.flagged = f"connection to {address}:{port} closed: {reason}", True
        with contextlib.suppress(AuditError):
            await self._write_entry(ex.entry(), sync=True)

    async def _serve(self, client: Conn, tunnel: tuple[str, int] | None, *, origin_port: int | None = None,
                     mode: str = "proxy", address: str | None = None) -> None:
        writer = client
        served = 0
        while True:
            try:
                event = client.take() or await client.next(self.timeouts.client_idle)
            except h1.ProtocolError as exc:
                if mode == "transparent" and address is not None and served == 0:
                    await self._refused(address, tunnel[1] if tunnel else origin_port or 0,
                                        f"not HTTP/1.1: {exc.reason}")
                await self._error(writer, exc.status, exc.reason)
                return
            if event is None:
                return
            assert isinstance(event, h1.RequestHead), event
            if event.method == b"CONNECT":
                if tunnel is not None or origin_port is not None:
                    await self._error(writer, 400, "CONNECT is for the explicit proxy, not inside a tunnel "
                                                   "or on a captured port")
                    return
                await self._connect(client, event)
                return
            served += 1
            keep = await self._request(client, writer, event, tunnel, origin_port, mode)
            if not keep:
                return

    async def _connect(self, client: Conn, head: h1.RequestHead) -> None:
        """Answer CONNECT, terminate TLS as the CONNECT host, then serve the requests inside."""
        writer = client
        if head.body is not h1.BodyKind.NONE:
            await self._error(writer, 400, "CONNECT with a body")
            return
        authority = head.target.decode("ascii")
        host_part, _, port_s = authority.rpartition(":")
        try:
            host = _canon(host_part)
        except BadHost as exc:
            await self._error(writer, 400, str(exc))
            return
        event = await client.next(self.timeouts.read)       # the CONNECT's EndOfMessage
        assert isinstance(event, h1.EndOfMessage)
        if client.pending or client.parser.buffered or client.error is not None:
            # Bytes after CONNECT before our 200: a client that does not wait (or smuggles).
            await self._error(writer, 400, "data sent before the CONNECT was answered")
            return
        await self._send(writer, b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self._prefetch(host, int(port_s))
        # The leaf names the CONNECT host: that is what the policy decides on. A client whose SNI
        # names another host then fails its own verification (fail safe), and a client without SNI
        # still gets the right certificate (issue 3: "the CONNECT authority is the host").
        ctx = self.leaves.context_for(host[1:-1] if host.startswith("[") else host)
        # The tunnel's requests get their own parser, in place before the handshake ends: the
        # client may send its first request at once, and it is read before we resume.
        client.parser = h1.RequestParser()
        try:
            client.transport = await asyncio.get_running_loop().start_tls(
                client.transport, client, ctx, server_side=True, ssl_handshake_timeout=self.timeouts.tls_handshake)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            # Typically a client that does not trust the sidecar's CA: it sent nothing, but an
            # agent trying to get around the MITM is worth a line.
            await self._refused(host, int(port_s), f"TLS handshake failed: {_why(exc)}", mode="proxy")
            raise _Close() from None
        await self._serve(client, tunnel=(host, int(port_s)))

    # --- one request -----------------------------------------------------------------------

    async def _request(self, client: Conn, writer: Conn, head: h1.RequestHead,
                       tunnel: tuple[str, int] | None, origin_port: int | None = None,
                       mode: str = "proxy") -> bool:
        """Decide, answer or forward one request; True to keep the client connection."""
        method = head.method.decode("ascii")
        target = head.target.decode("latin-1")
        request_id = _request_id()
        host_hdr = [] if head.host is None else [head.host]
        # Where the request goes. Never from a Host header alone.
        problem = None
        if tunnel is not None:
            scheme, (host, port) = "https", tunnel
            path = target
            if not target.startswith("/"):
                problem = "absolute-form or asterisk-form target inside a CONNECT tunnel"
            elif host_hdr and _host_port(host_hdr[0], port) != (host, port):
                problem = (f"Host header {host_hdr[0].decode('latin-1')!r} does not match the CONNECT "
                           f"target {host}:{port}")
        elif origin_port is not None:
            # Plain HTTP captured on a port: origin form, the name from Host, the port the agent dialled.
            scheme, path, port = "http", target, origin_port
            parsed = _host_port(host_hdr[0], origin_port) if len(host_hdr) == 1 else None
            if parsed is None:
                await self._error(writer, 400, "a request on a captured port needs exactly one valid Host header")
                return False
            host = parsed[0]
            if not target.startswith("/"):
                problem = "absolute-form or asterisk-form target on a captured port (use the proxy at HTTP_PROXY)"
            elif parsed[1] != origin_port:
                problem = f"Host header port {parsed[1]} does not match the port dialled ({origin_port})"
        else:
            url = urlsplit(target)
            scheme = url.scheme.lower()
            if scheme not in ("http", "https") or not url.netloc:
                await self._error(writer, 400, "an explicit proxy needs an absolute-form target (http://host/path)")
                return False
            try:
                host = _canon(url.hostname or "")
                port = url.port or (443 if scheme == "https" else 80)
            except (BadHost, ValueError) as exc:
                await self._error(writer, 400, f"bad host in request target: {exc}")
                return False
            if url.username is not None or url.password is not None:
                problem = "userinfo in the request target"
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        ex = _Exchange(request_id, method, host, port, path, container=self.container, mode=mode)
        if problem is None and self.credentials:
            problem = self.credentials.misuse(method.upper(), host, path, head.headers, scheme)

        # Read a small body before deciding, so JSON body rules can see it (bounded: MAX_JSON_BODY).
        prefix: list[h1.Event] = []
        body: bytes | None = None
        # (A bodiless request is read to its EndOfMessage here too.) A larger or chunked body is
        # streamed after the decision, and JSON rules see it as uninspectable.
        if head.body is h1.BodyKind.NONE or (
                head.body is h1.BodyKind.LENGTH and (head.content_length or 0) <= MAX_JSON_BODY):
            while True:
                event = client.take() or await self._client_event(client)
                prefix.append(event)
                if type(event) is h1.EndOfMessage:
                    break
            # Usually just the EndOfMessage.
            body = b"".join([e.data for e in prefix if type(e) is h1.Data]) if len(prefix) > 1 else b""

        if problem is not None:
            verdict = Verdict(None, _deny(problem), True, f"refused: {problem}")
        else:
            verdict = self.policy.decide(method, host, port, path, head.headers, body)
        decision = verdict.decision
        ex.rule, ex.decision, ex.reason = verdict.rule_id, decision.action, verdict.reason
        if verdict.would is not None:
            ex.would = verdict.would.action
        ex.flagged = verdict.flagged or decision.action == "audit_only"
        body_done = bool(prefix)

        if decision.action == "require_approval":
            earlier = self.approvals.allowed_before(method, host, port, path)
            if earlier is not None:
                ex.decision, ex.reason = "allow", f"{verdict.reason}: allowed by the approval of {earlier} (--for)"
                ex.approval = {"outcome": "approved earlier", "request_id": earlier}
                return await self._forward(client, writer, head, ex, scheme, prefix, body_done)
            # Held: the agent's connection stays open until an operator answers or the timeout.
            size = head.content_length if head.body is h1.BodyKind.LENGTH else (None if body is None else len(body))
            held = Held(request_id, method, host, port, path, size, verdict.rule_id, decision.timeout_s)
            outcome = await self.approvals.hold(held)
            ex.approval = {"outcome": "approved" if outcome.approved else "denied" if outcome.by is not None
                           else "timeout", "by_uid": outcome.by,
                           "waited_ms": round((time.monotonic() - ex.started) * 1000, 3)}
            if outcome.approved:
                ex.decision, ex.reason = "allow", f"{verdict.reason}: {outcome.reason}"
                return await self._forward(client, writer, head, ex, scheme, prefix, body_done)
            ex.decision, ex.reason = "deny", f"{verdict.reason}: {outcome.reason}"
            return await self._deny(writer, ex, head, body_done, ex.reason)
        if decision.action == "deny":
            return await self._deny(writer, ex, head, body_done, verdict.reason)
        if decision.action == "delay":
            await asyncio.sleep(decision.ms / 1000)
        return await self._forward(client, writer, head, ex, scheme, prefix, body_done)

    async def _deny(self, writer: Conn, ex: _Exchange, head: h1.RequestHead,
                    body_done: bool, reason: str) -> bool:
        ex.status = 403
        payload = {"decision": "deny", "rule": ex.rule, "reason": reason, "request_id": ex.request_id}
        keep = head.keep_alive and body_done     # an unread request body: close rather than drain it
        if not await self._record(writer, ex, sync=True):
            return False
        await self._respond(writer, 403, "Forbidden", json.dumps(payload).encode(), keep,
                            extra=((b"X-Gvm-Decision", b"deny"), (b"X-Gvm-Request-Id", ex.request_id.encode())))
        return keep

    async def _record(self, writer: Conn, ex: _Exchange, sync: bool,
                      reason: str | None = None) -> bool:
        """Write the request's record (its decision, or, once that is written, its outcome); on
        failure answer 503 and return False (fail closed)."""
        try:
            await self._write_entry(ex.outcome(reason) if ex.decided else ex.entry(), sync)
        except AuditError as exc:
            await self._unrecorded(writer, ex, exc)
            return False
        return True

    def _record_now(self, ex: _Exchange) -> AuditError | None:
        """`_record` of a decision nothing waits on the disk for (an allow): written at once,
        without a coroutine; the error, if any, for the caller to answer with `_unrecorded`."""
        if not self.events.subscribers and ex.plain():
            try:
                self.audit.append(ex.render_decision)
            except AuditError as exc:
                return exc
            return None
        entry = ex.entry()
        try:
            self.audit.append(entry)
        except AuditError as exc:
            return exc
        if self.events.subscribers:
            self.events.publish({"event": "decision", **entry})
        return None

    async def _unrecorded(self, writer: Conn, ex: _Exchange, exc: AuditError) -> None:
        await self._respond(writer, 503, "Service Unavailable",
                            json.dumps({"decision": "error", "reason": f"cannot record the request: {exc}",
                                        "request_id": ex.request_id}).encode(), False,
                            extra=((b"X-Gvm-Request-Id", ex.request_id.encode()),))

    def _outcome_later(self, ex: _Exchange) -> None:
        if not self.events.subscribers and ex.plain():
            # Rendered at the flush, as of now: the exchange changes no more (its response is
            # relayed, and the next request is a new exchange).
            ex.ended = (record_time(), round((time.monotonic() - ex.started) * 1000, 3))
            self._outcomes.append(ex.render_outcome)
        else:
            self._outcomes.append(ex.outcome())
        if len(self._outcomes) == 1:
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush_outcomes)

    def _flush_outcomes(self) -> None:
        entries, self._outcomes = self._outcomes, []
        try:
            self.audit.append_many(entries)
        except AuditError as exc:
            # The decisions are on record; the next one that cannot be written refuses its request.
            with contextlib.suppress(OSError):
                os.write(2, f"gvmrt sidecar: outcome records lost: {exc}\n".encode())
        if self.events.subscribers:
            for entry in entries:
                if type(entry) is dict:     # rendered ones were made while nobody listened
                    self.events.publish({"event": "decision", **entry})

    def _abandoned(self, ex: _Exchange, reason: str) -> None:
        """Best effort, on the way out: the outcome of a forwarded request that ended without one."""
        if ex.decided and ex.status is None:
            ex.status, ex.flagged = 0, True
            with contextlib.suppress(AuditError):
                self.audit.append(ex.outcome(reason))

    async def _write_entry(self, entry: dict[str, Any], sync: bool) -> None:
        """The one way a record leaves: the audit log first, then live subscribers."""
        seq = self.audit.append(entry)
        if sync:
            await self.audit.durable(seq)
        if self.events.subscribers:
            self.events.publish({"event": "decision", **entry})

    async def _client_event(self, client: Conn) -> h1.Event:
        """The next event of a request body; a cut or malformed body ends the connection."""
        try:
            event = await client.next(self.timeouts.read)
        except h1.ProtocolError:
            raise _Close() from None
        if event is None:
            raise _Close()
        return event

    # --- forwarding ------------------------------------------------------------------------

    async def _forward(self, client: Conn, writer: Conn, head: h1.RequestHead,
                       ex: _Exchange, scheme: str, prefix: list[h1.Event], body_done: bool) -> bool:
        key = (scheme, ex.host, ex.port)
        authority = ex.host if ex.port == (443 if scheme == "https" else 80) else f"{ex.host}:{ex.port}"
        headers = h1.strip_hop_by_hop(head.headers, also=_HOST)
        if self.credentials:
            # After the decision (only allowed requests get here): the agent's own credentials
            # never reach a covered host, the real one only a request in scope.
            headers, ex.credential = self.credentials.apply(ex.method.upper(), ex.host, ex.path, headers, scheme)
        headers = ((b"Host", authority.encode("ascii")),) + headers
        chunked = head.body is h1.BodyKind.CHUNKED
        if chunked:
            headers += ((b"Transfer-Encoding", b"chunked"),)
        # Fields from the request parser (checked there), our Host and framing: checked again
        # only when a credential was injected (its value comes from a file, not the parser).
        out_head = h1.request_head_11(head.method, ex.path.encode("latin-1"), headers,
                                      checked=ex.credential is not None)
        # The decision goes on record before anything of the request leaves (a name lookup
        # included): a request that cannot be recorded is not forwarded, and one whose client
        # goes away mid-body is still on record (its outcome says so).
        ex.status = None                # not known until the upstream answers
        if ex.decision in ("delay", "require_approval") or ex.approval is not None:
            if not await self._record(writer, ex, sync=True):
                return False
        else:
            failed = self._record_now(ex)
            if failed is not None:
                await self._unrecorded(writer, ex, failed)
                return False
        ex.decided = True
        # One retry on a stale pooled connection (issue 3, trap 2): only when the request is
        # replayable, i.e. its body (if any) is still in hand.
        up: Upstream | None = self.pool.take_idle(key)
        reused = up is not None
        try:
            if up is None:
                up = await self.pool.connect(key)
            while True:
                try:
                    if body_done and not chunked:
                        # Head and body in hand (every bodiless request): one write, one TLS
                        # record, no coroutine.
                        up.uses += 1
                        up.conn.parser.expect(head.method)
                        payload = out_head
                        if len(prefix) > 1:     # not just the EndOfMessage
                            data = [e.data for e in prefix if type(e) is h1.Data]
                            ex.bytes_out = sum(map(len, data))
                            payload = b"".join([out_head, *data])
                        if up.conn.put(payload):
                            await up.conn.drained(self.timeouts.write)
                    else:
                        await self._send_request(up, client, out_head, prefix, body_done, chunked, ex)
                    response = await self._response_head(up)
                    break
                except (ConnectionError, _StaleUpstream):
                    up.close()
                    if not (reused and body_done):
                        raise
                    reused = False
                    ex.bytes_out = 0
                    up = await self.pool.connect(key)
        except UpstreamError as exc:
            return await self._fail(writer, ex, exc.status, exc.reason, head, body_done and up is None)
        except (ConnectionError, _StaleUpstream, TimeoutError, ssl.SSLError) as exc:
            if up is not None:
                up.close()
            return await self._fail(writer, ex, 502 if not isinstance(exc, TimeoutError) else 504,
                                    f"upstream {ex.host}:{ex.port}: {exc.__class__.__name__} {exc}".strip(),
                                    head, False)
        except h1.ProtocolError as exc:
            up.close()
            return await self._fail(writer, ex, 502, f"upstream {ex.host}: {exc.reason}", head, False)
        except BaseException:
            # The client went away mid-body (_Close), or we are cancelled: the upstream connection
            # is in an unknown state, so it is closed rather than pooled.
            if up is not None:
                up.close()
            self._abandoned(ex, "the client went away before the upstream answered")
            raise

        # Relay the response, recording it first: if the line cannot be written, the agent gets
        # 503 instead of the upstream's answer.
        ex.status = response.status
        ex.bytes_in = response.content_length if response.body is h1.BodyKind.LENGTH else (
            0 if response.body is h1.BodyKind.NONE else None)
        # The outcome gates nothing (the decision is on record already): written with the other
        # outcomes of this loop iteration in one append.
        self._outcome_later(ex)
        keep = head.keep_alive
        # The X-Gvm-* headers the agent sees are the sidecar's alone: an upstream cannot add its own.
        r_headers = h1.strip_hop_by_hop(response.headers, prefix=b"x-gvm-")
        reframe = response.body in (h1.BodyKind.CHUNKED, h1.BodyKind.UNTIL_CLOSE)
        if reframe:
            if head.version == b"1.1":
                r_headers += ((b"Transfer-Encoding", b"chunked"),)
            else:
                keep = False       # an HTTP/1.0 client: the body ends when we close
                reframe = False
        r_headers += ((b"X-Gvm-Decision", ex.decision.encode()), (b"X-Gvm-Request-Id", ex.request_id.encode()))
        if not keep:
            r_headers += ((b"Connection", b"close"),)
        # Upstream's fields as its parser checked them, and ours.
        out = h1.response_head_11(response.status, response.reason, r_headers, checked=False)
        try:
            await self._relay(writer, up.conn, reframe, out)
        except (h1.ProtocolError, ConnectionError, TimeoutError, ssl.SSLError):
            # Mid-body: the status line is gone, so all we can do is cut the client connection.
            up.close()
            raise _Close() from None
        except BaseException:
            up.close()
            raise
        if response.keep_alive:
            self.pool.release(up)          # checks that nothing follows the response
        else:
            up.close()
        return keep

    async def _relay(self, writer: Conn, up_stream: Conn, reframe: bool, head: bytes) -> None:
        """Send the response head and copy the body to the client, one upstream read at a time
        (bounded memory). The head goes out with the body's first piece: one TLS record and one
        send(2) for a small response, instead of two."""
        pending = head
        timeout = self.timeouts
        while True:
            event = up_stream.take() or await up_stream.next(timeout.read)
            if event is None or type(event) is h1.EndOfMessage:
                if writer.put(pending + h1.last_chunk() if reframe else pending):
                    await writer.drained(timeout.write)
                return
            data = h1.chunk(event.data) if reframe else event.data  # type: ignore[union-attr]
            if pending:
                data, pending = pending + data, b""
            if writer.put(data):
                await writer.drained(timeout.write)

    async def _send_request(self, up: Upstream, client: Conn, out_head: bytes, prefix: list[h1.Event],
                            body_done: bool, chunked: bool, ex: _Exchange) -> None:
        up.uses += 1
        conn = up.conn
        conn.parser.expect(out_head.split(b" ", 1)[0])
        await self._send(conn, out_head)
        events: list[h1.Event] = list(prefix)
        while True:
            for event in events:
                if isinstance(event, h1.Data):
                    ex.bytes_out += len(event.data)
                    await self._send(conn, h1.chunk(event.data) if chunked else event.data)
                elif isinstance(event, h1.EndOfMessage):
                    if chunked:
                        await self._send(conn, h1.last_chunk())
                    return
            if body_done:
                return
            events = [await self._client_event(client)]

    async def _response_head(self, up: Upstream) -> h1.ResponseHead:
        stream = up.conn
        before = stream.received
        while True:
            event = stream.take() or await stream.next(self.timeouts.read)
            if event is None:
                if stream.received == before:
                    raise _StaleUpstream("upstream closed the connection before answering")
                raise ConnectionError("upstream closed the connection")
            if isinstance(event, h1.ResponseHead) and event.status >= 200:
                return event
            # 1xx interim responses are dropped: the whole request body is already sent.

    async def _fail(self, writer: Conn, ex: _Exchange, status: int, reason: str,
                    head: h1.RequestHead, keep: bool) -> bool:
        ex.status, ex.reason = status, f"{ex.reason}; {reason}" if ex.reason else reason
        ex.flagged = True
        if not await self._record(writer, ex, sync=True, reason=reason):
            return False
        keep = keep and head.keep_alive
        payload = {"decision": ex.decision, "rule": ex.rule, "reason": reason, "request_id": ex.request_id}
        await self._respond(writer, status, "Bad Gateway" if status == 502 else "Forbidden" if status == 403
                            else "Gateway Timeout", json.dumps(payload).encode(), keep,
                            extra=((b"X-Gvm-Decision", ex.decision.encode()),
                                   (b"X-Gvm-Request-Id", ex.request_id.encode())))
        return keep

    # --- writing ---------------------------------------------------------------------------

    async def _send(self, writer: Conn, data: bytes) -> None:
        # Waits (under the write timeout) only when the peer is slow and the transport has
        # paused us: no timer at all on the usual path.
        await writer.send(data, self.timeouts.write)

    async def _respond(self, writer: Conn, status: int, reason: str, body: bytes, keep: bool,
                       extra: h1.Headers = ()) -> None:
        headers = ((b"Content-Type", b"application/json"), (b"Content-Length", str(len(body)).encode())) + extra
        if not keep:
            headers += ((b"Connection", b"close"),)
        await self._send(writer, b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
            status, reason.encode(), b"".join(b"%s: %s\r\n" % h for h in headers), body))

    async def _error(self, writer: Conn, status: int, reason: str) -> None:
        """Answer a malformed request (no decision was made) and let the caller close."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            await self._respond(writer, status, _REASONS.get(status, "Error"),
                                json.dumps({"decision": "error", "reason": reason}).encode(), False)


_HOST = frozenset({b"host"})


class _StaleUpstream(Exception):
    """A reused upstream connection closed before sending a byte of the response."""


_REASONS = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 502: "Bad Gateway", 505: "HTTP Version Not Supported"}


async def _closed(conn: Conn) -> None:
    conn.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            await conn.wait_closed()


def _deny(reason: str) -> Decision:
    return Decision("deny", reason=reason)


def _canon(host: str) -> str:
    return canonical_host(host)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return f"{type(exc).__name__} {exc}".strip()


def _unmapped(address: str) -> str:
    """::ffff:a.b.c.d (a dual-stack listener's view of an IPv4 peer) as a.b.c.d."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


@functools.lru_cache(maxsize=1024)   # pure; every request in a tunnel checks the same Host value
def _host_port(value: bytes, default_port: int) -> tuple[str, int] | None:
    """A Host header value as (canonical host, port), or None if it does not parse."""
    text = value.decode("latin-1")
    try:
        host = canonical_host(text)
    except BadHost:
        return None
    port = default_port
    tail = text[text.rfind("]") + 1:] if text.startswith("[") else text
    if ":" in tail:
        digits = tail.rsplit(":", 1)[1]
        if not digits.isdigit():
            return None
        port = int(digits)
    return host, port


async def serve(listen: tuple[str, int], policy: CompiledPolicy, ca: CertificateAuthority, audit: AuditLog,
                upstream_cafile: str | None = None, allow_private: Collection[str] = frozenset(),
                ready: asyncio.Event | None = None, *, resolve: Resolver | None = None,
                timeouts: Timeouts = Timeouts(), bound: list[tuple[str, int]] | None = None) -> None:
    """Run the explicit proxy on `listen` until cancelled.

    `allow_private` names hosts (as in the policy) that may resolve to loopback/private addresses.
    `resolve(host, port) -> [address, ...]` replaces getaddrinfo (tests map names to loopback).
    `ready` is set once listening; `bound`, if given, receives the bound address (for port 0).
    """
    sidecar = Sidecar(policy, ca, audit, upstream_cafile=upstream_cafile, allow_private=allow_private,
                      resolve=resolve, timeouts=timeouts)
    sidecar.start()
    server = await asyncio.get_running_loop().create_server(sidecar.protocol, listen[0], listen[1],
                                                            backlog=BACKLOG)
    if bound is not None:
        bound.extend(sock.getsockname()[:2] for sock in server.sockets)
    try:
        async with server:
            if ready is not None:
                ready.set()
            await server.serve_forever()
    finally:
        await sidecar.shutdown()
