"""Real TLS handshakes on loopback against the sidecar's per-container CA (gvmrt.proxy.certs).

A thread accepts on 127.0.0.1 with `make_server_context`; clients are the standard library's
verifying clients, trusting only ca.pem, as an agent in the jail would. No internet.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from gvmrt.proxy.certs import CertificateAuthority, LeafCache, make_server_context

TIMEOUT = 5.0


class Server:
    """Accepts TLS on loopback, one thread; records each handshake's outcome and SNI refusals."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.address = self.sock.getsockname()
        self.outcomes: list[tuple[str, Any]] = []
        self.refused: list[tuple[str, str | None]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.outcomes.append(("ok", tls.selected_alpn_protocol()))
                    tls.sendall(b"hello")
                    tls.recv(1)   # wait for the client to close
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.append(("error", exc))
                conn.close()

    def close(self) -> None:
        self._stop = True
        # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("gvmrt integration CA", valid_hours=1)


@pytest.fixture
def cafile(ca: CertificateAuthority, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.cert_pem)
    return str(path)


@pytest.fixture
def cache(ca: CertificateAuthority) -> LeafCache:
    return LeafCache(ca, max_entries=8)


@pytest.fixture
def server(cache: LeafCache) -> Iterator[Server]:
    holder: list[Server] = []
    ctx = make_server_context(cache, on_refused=lambda obj, why, name: holder[0].refused.append((why, name)))
    srv = Server(ctx)
    holder.append(srv)
    yield srv
    srv.close()


def connect(server: Server, ctx: ssl.SSLContext, server_hostname: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection(server.address, timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def agent_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)   # verifies the chain and the host name
    ctx.set_alpn_protocols(["h2", "http/1.1"])        # like curl: offers h2; the sidecar speaks 1.1
    return ctx


def test_handshake_verifies_and_negotiates_http11(server: Server, cafile: str, cache: LeafCache) -> None:
    with connect(server, agent_context(cafile), "api.example.com") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert ("DNS", "api.example.com") in tls.getpeercert()["subjectAltName"]
        assert tls.recv(5) == b"hello"
    assert server.refused == []
    assert (cache.stats.misses, cache.stats.hits) == (1, 0)


def test_each_name_gets_its_own_certificate(server: Server, cafile: str, cache: LeafCache) -> None:
    ctx = agent_context(cafile)
    for name in ["api.example.com", "Other.Example.NET", "api.example.com"]:
        with connect(server, ctx, name) as tls:
            assert tls.getpeercert()["subjectAltName"] == (("DNS", name.lower()),)
            assert tls.recv(5) == b"hello"
    assert (cache.stats.misses, cache.stats.hits) == (2, 1)


def test_tls12_client(server: Server, cafile: str) -> None:
    ctx = agent_context(cafile)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(server, ctx, "api.example.com") as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_client_without_sni_is_refused_and_recorded(server: Server, cafile: str, cache: LeafCache) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        connect(server, ctx, None).close()
    assert server.refused == [("no-sni", None)]
    assert len(cache) == 0


def test_invalid_sni_is_refused_and_recorded(server: Server, cafile: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        connect(server, ctx, "under score.example").close()
    assert server.refused == [("invalid-sni", "under score.example")]


def test_client_trusting_another_ca_fails(server: Server, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(CertificateAuthority.create("someone else").cert_pem)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        connect(server, agent_context(str(other)), "api.example.com").close()


def test_client_with_system_trust_fails(server: Server) -> None:
    """The CA is trusted only where it is installed (the jail), never by the host's store."""
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(server, ssl.create_default_context(), "api.example.com").close()


def test_ip_literal_sends_no_sni_so_is_refused(server: Server, cafile: str) -> None:
    """RFC 6066 §3: no SNI for an IP literal (CPython and OpenSSL comply). Through the SNI context
    such a client is refused like any client without SNI; see the next test for serving it."""
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        connect(server, agent_context(cafile), "127.0.0.1").close()
    assert server.refused == [("no-sni", None)]


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_ip_literal_served_by_destination_context(cache: LeafCache, cafile: str, ip: str) -> None:
    """A sidecar that knows the destination IP (getsockname of a captured connection, or
    CONNECT 127.0.0.1:443) can pick the context itself; the client verifies the IP SAN."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        probe = socket.socket(family)
        probe.bind((ip, 0))
        probe.close()
    except OSError:
        pytest.skip(f"no {ip} loopback here")
    srv_ctx = cache.context_for(ip)
    listener = socket.create_server((ip, 0), family=family)
    listener.settimeout(TIMEOUT)
    outcome: list[Any] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with srv_ctx.wrap_socket(conn, server_side=True) as tls:
            outcome.append(tls.selected_alpn_protocol())
            tls.sendall(b"ok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        raw = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
        with agent_context(cafile).wrap_socket(raw, server_hostname=ip) as tls:
            assert tls.recv(2) == b"ok"
            shown = {"127.0.0.1": "127.0.0.1", "::1": "0:0:0:0:0:0:0:1"}[ip]   # CPython's rendering
            assert tls.getpeercert()["subjectAltName"] == (("IP Address", shown),)
        t.join(TIMEOUT)
        assert outcome == ["http/1.1"]
    finally:
        listener.close()


def test_eviction_does_not_break_new_handshakes(ca: CertificateAuthority, cafile: str) -> None:
    cache = LeafCache(ca, max_entries=2)
    srv = Server(make_server_context(cache))
    try:
        ctx = agent_context(cafile)
        for i in range(5):
            with connect(srv, ctx, f"h{i}.example") as tls:
                assert tls.recv(5) == b"hello"
        assert len(cache) == 2 and cache.stats.evictions == 3
    finally:
        srv.close()
