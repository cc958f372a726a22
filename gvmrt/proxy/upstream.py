"""Upstream side of the sidecar: name resolution, the SSRF guard, and a small connection pool.

The sidecar connects by the *name* the policy decided on, resolved here, never by an address the
agent chose (DESIGN.md §5). Every resolved address must be public: the sidecar runs in the host
namespace and must not become the agent's path to host or cloud-internal services.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from gvmrt.errors import GvmrtError
from gvmrt.proxy.conn import Conn
from gvmrt.proxy.h1 import ResponseParser

__all__ = ["UpstreamError", "Resolver", "Upstream", "Pool", "address_problem", "default_resolve"]

CONNECT_TIMEOUT = 10.0
IDLE_CUTOFF = 15.0          # below common server keep-alive timeouts (nginx 75 s, Apache 5 s..15 s)
# At least as many as the client connections one host may see at once: a smaller pool closes and
# re-dials (TLS) an upstream connection on most requests under load (bench-proxy: ~400 new
# upstream connections per 1000 requests at 64 client connections with 8).
MAX_IDLE_PER_KEY = 256
PREFETCH_TTL = 10.0         # a name resolved ahead of its first request, if that request is slow to come
MAX_PREFETCHED = 256

Resolver = Callable[[str, int], Awaitable[list[str]]]
Key = tuple[str, str, int]  # (scheme, host, port)


class UpstreamError(GvmrtError):
    """Cannot reach the upstream; `status` is what the client is answered (403 for the guard)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


async def default_resolve(host: str, port: int) -> list[str]:
    """All addresses of `host` (the event loop's getaddrinfo, in a worker thread)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def host_trust_context() -> ssl.SSLContext:
    """`ssl.create_default_context()`, verifying servers against the host's trust store, but with
    the store read from its hashed directory (one file per CA, read when a chain needs it) rather
    than parsing the whole bundle up front, which costs every sidecar ~2.5 MB and ~22 ms.

    Only when that trusts exactly the same CAs: OpenSSL's defaults trust the bundle
    (SSL_CERT_FILE or its default) plus the directory (SSL_CERT_DIR or its default), so the
    directory alone is the same store when every certificate of the bundle is also one of the
    directory's files, and those files can be read now, as the sidecar (a root monitor reads them
    as nobody). update-ca-certificates writes both from the same certificates; a CA appended to
    the bundle by hand, a bundle of one's own in SSL_CERT_FILE, or a CA file only root can read
    means the defaults, as before."""
    paths = ssl.get_default_verify_paths()     # SSL_CERT_FILE / SSL_CERT_DIR applied; None if missing
    capath, cafile = paths.capath, paths.cafile
    if capath is not None and (cafile is None or _bundle_in_directory(cafile, capath)):
        return ssl.create_default_context(capath=capath)
    return ssl.create_default_context()


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
_HASH_NAME = re.compile(r"[0-9a-f]{8}\.[0-9]+")      # c_rehash / update-ca-certificates names


def _certs_of(pem: bytes) -> set[bytes]:
    return {b"".join(m.split()) for m in _PEM_CERT.findall(pem)}


def _bundle_in_directory(cafile: str, capath: str) -> bool:
    """Every certificate of the bundle `cafile` is one of the hashed directory's files, all of
    which this process can read (compared as PEM text: nothing is parsed)."""
    try:
        with open(cafile, "rb") as f:
            text = f.read()
        bundle = _certs_of(text)
        if not bundle or b"-----BEGIN TRUSTED CERTIFICATE-----" in text:
            return False               # OpenSSL's own trust format: not compared here
        hashed: set[bytes] = set()
        with os.scandir(capath) as entries:
            for entry in entries:
                if _HASH_NAME.fullmatch(entry.name):
                    with open(entry.path, "rb") as f:
                        hashed |= _certs_of(f.read())
    except OSError:
        return False
    return bundle <= hashed


def address_problem(address: str) -> str | None:
    """Why `address` may not be dialled, or None for a public unicast address.

    ``is_global`` is False for loopback, RFC 1918, CGNAT, link-local (169.254.0.0/16, hence the
    cloud metadata address 169.254.169.254, and fe80::/10), ULA (fc00::/7, hence AWS's
    fd00:ec2::254), unspecified, documentation and reserved ranges. Multicast is checked apart
    because some multicast scopes count as global. IPv4-mapped (::ffff:a.b.c.d) and NAT64
    (64:ff9b::/96) forms are judged by the IPv4 address they carry, since the kernel (or a NAT64
    gateway) delivers them there.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if not ip.is_global:
        kind = ("loopback" if ip.is_loopback else "link-local (cloud metadata range)" if ip.is_link_local
                else "unspecified" if ip.is_unspecified else "private")
        return f"{ip} is a {kind} address"
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(eq=False)
class Upstream:
    """One connection to an upstream server; its `conn` parses the responses."""

    key: Key
    conn: Conn
    idle_since: float = 0.0
    uses: int = 0

    def usable(self) -> bool:
        return self.conn.usable()

    def close(self) -> None:
        self.conn.close()


def _quiet(task: asyncio.Task[list[str]]) -> None:
    """A prefetch nobody collects (the tunnel closed first) must not log "exception never retrieved"."""
    if not task.cancelled():
        task.exception()


class Pool:
    """Idle upstream connections keyed by (scheme, host, port), with an idle cut-off."""

    def __init__(self, *, resolve: Resolver | None = None, allow_private: Collection[str] = frozenset(),
                 upstream_cafile: str | None = None, idle_cutoff: float = IDLE_CUTOFF,
                 max_idle_per_key: int = MAX_IDLE_PER_KEY) -> None:
        self._resolve = resolve or default_resolve
        self.allow_private = frozenset(h.lower() for h in allow_private)
        self._cafile = upstream_cafile
        self._cadata: str | None = None
        self._tls_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._idle: dict[Key, list[Upstream]] = {}
        self.idle_cutoff = idle_cutoff
        self.max_idle_per_key = max_idle_per_key
        self.connects = 0               # fresh connections opened (tests and stats)
        # Names being (or just) resolved ahead of a tunnel's first request: (name, port) -> (when, task).
        self._prefetched: dict[tuple[str, int], tuple[float, asyncio.Task[list[str]]]] = {}

    def read_ca(self) -> None:
        """Read the upstream CA file now (a root monitor cannot once it runs as nobody); the
        context is built from these bytes later."""
        if self._cafile is not None and self._cadata is None:
            with open(self._cafile) as f:
                self._cadata = f.read()

    def tls_context(self) -> ssl.SSLContext:
        # Once per pool, lazily, or ahead in a worker thread (the monitor warms it while it
        # already serves); the lock makes the two meet safely.
        if self._tls is None:
            with self._tls_lock:
                if self._tls is None:
                    ctx = host_trust_context()
                    # Added to the system store, not instead of it.
                    if self._cadata is not None:
                        ctx.load_verify_locations(cadata=self._cadata)
                    elif self._cafile is not None:
                        ctx.load_verify_locations(cafile=self._cafile)
                    ctx.set_alpn_protocols(["http/1.1"])
                    self._tls = ctx
        return self._tls

    def take_idle(self, key: Key) -> Upstream | None:
        """A pooled connection for `key` that still looks alive, or None."""
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            up = conns.pop()
            if now - up.idle_since < self.idle_cutoff and up.usable():
                return up
            up.close()
        return None

    async def resolve_name(self, name: str) -> list[str]:
        """The sidecar's own answer for a name (static or looked up), for the jail's DNS stub."""
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await self._resolve(name, 0)

    def prefetch(self, key: Key) -> None:
        """Start resolving `key`'s host now, while the client's TLS handshake runs, so that the
        tunnel's first request does not wait for DNS after its decision. Only for a name the
        policy names (the caller checks), which the jail's DNS stub would resolve anyway; nothing
        is dialled before a decision. Skipped when a pooled connection is there to be used."""
        scheme, host, port = key
        name = host[1:-1] if host.startswith("[") else host
        now = time.monotonic()
        earlier = self._prefetched.get((name, port))
        if (earlier is not None and now - earlier[0] < PREFETCH_TTL) or self._idle.get(key):
            return
        if earlier is not None:
            earlier[1].cancel()         # stale: replaced below
        if len(self._prefetched) >= MAX_PREFETCHED:
            for k, (when, task) in list(self._prefetched.items()):
                if now - when >= PREFETCH_TTL or len(self._prefetched) >= MAX_PREFETCHED:
                    del self._prefetched[k]
                    task.cancel()
        task = asyncio.ensure_future(self._resolve(name, port))
        task.add_done_callback(_quiet)
        self._prefetched[(name, port)] = (now, task)

    async def _lookup(self, name: str, port: int) -> list[str]:
        entry = self._prefetched.pop((name, port), None)
        if entry is not None:
            if time.monotonic() - entry[0] < PREFETCH_TTL:
                try:
                    return await entry[1]
                except OSError:
                    pass                # a lookup that failed ahead of time gets one fresh try now
            else:
                entry[1].cancel()
        return await self._resolve(name, port)

    async def connect(self, key: Key) -> Upstream:
        """A fresh connection: resolve by name, refuse non-public addresses, then dial (TLS for https)."""
        scheme, host, port = key
        name = host[1:-1] if host.startswith("[") else host
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                addresses = await self._lookup(name, port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(502, f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise UpstreamError(502, f"{host} has no address")
        if host not in self.allow_private:
            # All of them, not just the one we would dial: a name that mixes public and private
            # answers is a rebinding attempt as far as the sidecar is concerned.
            for address in addresses:
                problem = address_problem(address)
                if problem is not None:
                    raise UpstreamError(403, f"upstream {host} resolves to {address}: {problem}; refused "
                                             f"(add it to gvm.egress.allow_private to allow it)")
        tls = self.tls_context() if scheme == "https" else None
        last: Exception | None = None
        for address in addresses:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    _, conn = await asyncio.get_running_loop().create_connection(
                        lambda: Conn(ResponseParser()), address, port, ssl=tls,
                        server_hostname=name if tls else None)
            except ssl.SSLError as exc:
                raise UpstreamError(502, f"TLS to upstream {host} failed: {exc.reason or exc}") from exc
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            self.connects += 1
            return Upstream(key, conn)
        raise UpstreamError(502, f"cannot connect to {host}:{port}: {last}")

    def release(self, up: Upstream) -> None:
        """Return a connection after a complete, keep-alive exchange."""
        if not up.usable():
            up.close()
            return
        conns = self._idle.setdefault(up.key, [])
        if len(conns) >= self.max_idle_per_key:
            up.close()
            return
        up.idle_since = time.monotonic()
        conns.append(up)

    def close(self) -> list[Conn]:
        """Close every idle connection; returns them so an async caller can wait for the sockets
        to be released (a transport only lets go of its socket on a later loop iteration)."""
        for _, task in self._prefetched.values():
            task.cancel()
        self._prefetched.clear()
        closed = []
        for conns in self._idle.values():
            for up in conns:
                up.close()
                closed.append(up.conn)
        self._idle.clear()
        return closed
