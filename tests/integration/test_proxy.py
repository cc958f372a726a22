"""The standalone sidecar (gvmrt.proxy.server.serve) with real sockets and real TLS on loopback.

Upstreams are standard-library HTTP servers on 127.0.0.1: one plain, one HTTPS with a leaf from a
separate test CA (passed as upstream_cafile). Clients are http.client, trusting only the sidecar's
CA, as an agent would. Upstream names (api.test, plain.test, ...) resolve through the injected
resolver, so nothing touches DNS or the internet.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gvmrt.policy import CompiledPolicy, parse_egress
from gvmrt.audit.read import merge, records
from gvmrt.audit.verify import verify_log
from gvmrt.audit.writer import AuditLog
from gvmrt.proxy.certs import CertificateAuthority, LeafCache
from gvmrt.proxy.server import Timeouts, serve
from gvmrt.proxy.upstream import address_problem, default_resolve

TIMEOUT = 10.0
BIG = 5 * 1024 * 1024
BIG_BLOCK = bytes(range(256)) * 256          # 64 KiB, so corruption or reordering shows in the hash

LOOPBACK_NAMES = {"api.test", "plain.test", "other.test", "evil.test", "flaky.test"}
PRIVATE_OK = {"api.test", "plain.test", "other.test", "flaky.test"}   # evil.test resolves to loopback but is not allowed

EGRESS = {
    "rules": [
        {"id": "deny-admin", "hosts": ["api.test", "plain.test"], "paths": ["/admin*"],
         "decision": {"action": "deny", "reason": "admin endpoints are off limits"}},
        {"id": "slow", "hosts": ["api.test"], "paths": ["/slow"], "decision": {"action": "delay", "ms": 200}},
        {"id": "review", "hosts": ["api.test"], "paths": ["/review"], "decision": {"action": "audit_only"}},
        {"id": "ask", "hosts": ["api.test"], "paths": ["/ask"],
         "decision": {"action": "require_approval", "timeout_s": 1}},
        {"id": "api", "hosts": ["api.test", "plain.test", "flaky.test", "evil.test", "169.254.169.254", "[::ffff:127.0.0.1]"],
         "decision": {"action": "allow"}},
    ],
}


# --- upstreams --------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = TIMEOUT

    def setup(self) -> None:
        super().setup()
        with self.server.lock:                      # type: ignore[attr-defined]
            self.server.connections += 1            # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG))
            self.end_headers()
            for _ in range(BIG // len(BIG_BLOCK)):
                self.wfile.write(BIG_BLOCK)
            return
        if self.path == "/spoof":
            body = b"spoof"
            self.send_response(200)
            self.send_header("X-Gvm-Decision", "allow")
            self.send_header("x-gvm-request-id", "0000000000000000")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"streamed ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self._echo(b"")

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass                                # trailer section
            self._echo(body)
            return
        length = int(self.headers.get("Content-Length", "0"))
        self._echo(self.rfile.read(length))

    def _echo(self, body: bytes) -> None:
        payload = json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("Host"),
                              "body": body.decode("latin-1"),
                              "hop": self.headers.get("Proxy-Authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class Upstream:
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.lock = threading.Lock()         # type: ignore[attr-defined]
        self.server.connections = 0                 # type: ignore[attr-defined]
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def connections(self) -> int:
        return self.server.connections              # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


# --- the sidecar in a background event loop ---------------------------------------------------

class Proxy:
    def __init__(self, policy: CompiledPolicy, ca: CertificateAuthority, audit: AuditLog, cafile: str,
                 timeouts: Timeouts = Timeouts(client_idle=TIMEOUT, read=TIMEOUT, write=TIMEOUT)) -> None:
        self.loop = asyncio.new_event_loop()
        self.bound: list[tuple[str, int]] = []
        ready = threading.Event()
        self.error: BaseException | None = None
        # Anything the loop reports (a handler task that died, an unclosed transport) is a bug.
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))

        async def resolve(host: str, port: int) -> list[str]:
            if host in LOOPBACK_NAMES:
                return ["127.0.0.1"]
            if host.endswith(".test"):
                raise OSError(f"{host}: no such test name")
            return await default_resolve(host, port)   # IP literals only, in these tests

        async def main() -> None:
            started = asyncio.Event()
            self.task = asyncio.current_task()
            runner = asyncio.create_task(serve(("127.0.0.1", 0), policy, ca, audit, upstream_cafile=cafile,
                                               allow_private=PRIVATE_OK, ready=started, resolve=resolve,
                                               timeouts=timeouts,
                                               bound=self.bound))
            await started.wait()
            ready.set()
            await runner

        def run() -> None:
            try:
                self.loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:              # surfaced by close()
                self.error = exc
                ready.set()
            finally:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(TIMEOUT), "proxy did not start"
        if self.error:
            raise self.error
        self.host, self.port = self.bound[0]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(TIMEOUT)
        assert self.error is None, self.error
        assert not self.loop_errors, self.loop_errors


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gvm_ca() -> CertificateAuthority:
    return CertificateAuthority.create("gvmrt test sidecar CA", valid_hours=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxy")


@pytest.fixture(scope="module")
def upstream_ca(dirs: Path) -> tuple[CertificateAuthority, str]:
    ca = CertificateAuthority.create("gvmrt test upstream CA", valid_hours=1)
    path = dirs / "upstream-ca.pem"
    path.write_bytes(ca.cert_pem)
    return ca, str(path)


@pytest.fixture(scope="module")
def https_upstream(upstream_ca: tuple[CertificateAuthority, str]) -> Iterator[Upstream]:
    up = Upstream(LeafCache(upstream_ca[0]).context_for("api.test"))
    yield up
    up.close()


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[Upstream]:
    up = Upstream(None)
    yield up
    up.close()


@pytest.fixture(scope="module")
def audit_path(dirs: Path) -> Path:
    return dirs / "audit.jsonl"


@pytest.fixture(scope="module")
def proxy(gvm_ca: CertificateAuthority, upstream_ca: tuple[CertificateAuthority, str], audit_path: Path,
          https_upstream: Upstream, http_upstream: Upstream) -> Iterator[Proxy]:
    writer = AuditLog(audit_path, container="test")
    p = Proxy(CompiledPolicy.compile(parse_egress(EGRESS)), gvm_ca, writer, upstream_ca[1])
    yield p
    p.close()
    writer.close()


@pytest.fixture(scope="module")
def client_ctx(gvm_ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=gvm_ca.cert_pem.decode())
    return ctx


def tunnel(proxy: Proxy, ctx: ssl.SSLContext, host: str, port: int) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(proxy.host, proxy.port, context=ctx, timeout=TIMEOUT)
    conn.set_tunnel(host, port)
    return conn


def get(conn: http.client.HTTPConnection, target: str, **headers: str) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request("GET", target, headers=headers)
    resp = conn.getresponse()
    return resp, resp.read()


def audit_line(path: Path, request_id: str) -> dict[str, Any]:
    """The request's record, decision and outcome merged. A forwarded request's outcome is
    written just after its response (batched with others on the next loop turn): wait for it."""
    deadline = time.monotonic() + 5
    while True:
        found = None
        for entry in merge(records([str(path)])):       # a line being written is skipped
            if entry.get("request_id") == request_id:
                found = entry
        if found is not None and (found.get("status") is not None or time.monotonic() > deadline):
            return found
        if found is None and time.monotonic() > deadline:
            raise AssertionError(f"no audit line for {request_id}")
        time.sleep(0.01)


# --- tests ------------------------------------------------------------------------------------

def test_https_round_trip_through_connect(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream,
                                          audit_path: Path) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        conn.request("POST", "/v1/echo?x=1", body=b'{"hi": 1}', headers={
            "Content-Type": "application/json", "Proxy-Authorization": "Basic c2VjcmV0"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert body == {"method": "POST", "path": "/v1/echo?x=1", "host": f"api.test:{https_upstream.port}",
                    "body": '{"hi": 1}', "hop": None}
    assert resp.getheader("X-Gvm-Decision") == "allow"
    entry = audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))
    assert entry["rule"] == "api" and entry["decision"] == "allow" and entry["status"] == 200
    assert entry["host"] == "api.test" and entry["port"] == https_upstream.port and entry["path"] == "/v1/echo?x=1"
    assert entry["bytes_out"] == 9 and entry["flagged"] is False


def test_plain_http_absolute_form(proxy: Proxy, http_upstream: Upstream) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        resp, raw = get(conn, f"http://plain.test:{http_upstream.port}/hello?q=2", Host="evil.test")
    finally:
        conn.close()
    assert resp.status == 200
    body = json.loads(raw)
    # The URL decides where the request goes; the Host header is rewritten from it.
    assert body["path"] == "/hello?q=2" and body["host"] == f"plain.test:{http_upstream.port}"


def test_chunked_response_is_relayed(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        resp, body = get(conn, "/chunked")
    finally:
        conn.close()
    assert resp.status == 200 and body == b"hello streamed world"


def test_deny_is_403_json_with_rule(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream,
                                    audit_path: Path) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        resp, raw = get(conn, "/admin")
        body = json.loads(raw)
        assert resp.status == 403
        assert body["decision"] == "deny" and body["rule"] == "deny-admin"
        assert "admin endpoints are off limits" in body["reason"]
        assert resp.getheader("X-Gvm-Decision") == "deny"
        assert resp.getheader("X-Gvm-Request-Id") == body["request_id"]
        # The connection stays usable after a deny.
        resp2, _ = get(conn, "/ok")
        assert resp2.status == 200
    finally:
        conn.close()
    entry = audit_line(audit_path, body["request_id"])
    assert entry["decision"] == "deny" and entry["status"] == 403 and entry["rule"] == "deny-admin"


@pytest.mark.parametrize("path", ["/a/%2e%2e/admin", "/a/%252e%252e/admin", "//admin", "/foo/../admin"])
def test_encoded_path_evasion_is_denied(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream,
                                        path: str) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        resp, raw = get(conn, path)
    finally:
        conn.close()
    assert resp.status == 403, raw
    assert json.loads(raw)["decision"] == "deny"


def test_delay_is_applied(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream, audit_path: Path) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        get(conn, "/warm")                     # handshake and pooled upstream out of the timing
        start = time.monotonic()
        resp, _ = get(conn, "/slow")
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    assert resp.status == 200 and elapsed >= 0.2
    entry = audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))
    assert entry["decision"] == "delay" and entry["rule"] == "slow"


def test_default_is_caution_and_flagged(proxy: Proxy, http_upstream: Upstream, audit_path: Path) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        start = time.monotonic()
        resp, _ = get(conn, f"http://other.test:{http_upstream.port}/anything")
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    assert resp.status == 200 and elapsed >= 0.3
    entry = audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))
    assert entry["rule"] is None and entry["decision"] == "delay" and entry["flagged"] is True


@pytest.mark.parametrize("host", ["evil.test", "169.254.169.254", "[::ffff:127.0.0.1]"])
def test_ssrf_guard(proxy: Proxy, http_upstream: Upstream, host: str, audit_path: Path) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        resp, raw = get(conn, f"http://{host}:{http_upstream.port}/latest/meta-data/")
    finally:
        conn.close()
    assert resp.status == 403, raw
    reason = json.loads(raw)["reason"]
    assert "refused" in reason and ("loopback" in reason or "link-local" in reason)
    entry = audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))
    assert entry["status"] == 403 and entry["flagged"] is True


def test_ssrf_guard_through_connect(proxy: Proxy, client_ctx: ssl.SSLContext, http_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "evil.test", 443)
    try:
        resp, raw = get(conn, "/")
    finally:
        conn.close()
    assert resp.status == 403 and "loopback" in json.loads(raw)["reason"]


@pytest.mark.parametrize("address,bad", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.1", True), ("100.64.0.1", True),
    ("169.254.169.254", True), ("0.0.0.0", True), ("224.0.0.1", True), ("::1", True), ("fe80::1%eth0", True),
    ("fd00:ec2::254", True), ("::ffff:127.0.0.1", True), ("::ffff:169.254.169.254", True),
    ("64:ff9b::7f00:1", True), ("ff0e::1", True), ("8.8.8.8", False), ("2606:4700::1111", False),
])
def test_address_guard(address: str, bad: bool) -> None:
    assert (address_problem(address) is not None) is bad


def test_keep_alive_reuses_both_sides(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        get(conn, "/first")
        sock = conn.sock
        before = https_upstream.connections
        r1, _ = get(conn, "/second")
        r2, _ = get(conn, "/third")
        assert conn.sock is sock                       # one client connection throughout
    finally:
        conn.close()
    assert r1.status == r2.status == 200
    assert https_upstream.connections == before        # served on the pooled upstream connection


class FlakyUpstream:
    """Answers the first request of each connection with keep-alive, then drops the connection on
    the next request without answering: what a pooled connection looks like when the server's
    keep-alive timer fired while the request was in flight."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received: list[bytes] = []        # what each connection's first request brought
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_head(conn: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(4096)
            if not more:
                return None
            data += more
        return data

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            first = self._read_head(conn)
            if first is not None:
                head, _, body = first.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                while m and len(body) < int(m[1]):
                    more = conn.recv(4096)
                    if not more:
                        break
                    body += more
                self.received.append(head + b"\r\n\r\n" + body)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self._read_head(conn)          # the second request: dropped unanswered

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(TIMEOUT)


def test_stale_pooled_connection_is_retried_once(proxy: Proxy) -> None:
    flaky = FlakyUpstream()
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        r1, b1 = get(conn, f"http://flaky.test:{flaky.port}/one")
        r2, b2 = get(conn, f"http://flaky.test:{flaky.port}/two")
    finally:
        conn.close()
        flaky.close()
    assert (r1.status, b1, r2.status, b2) == (200, b"ok", 200, b"ok")
    assert flaky.connections == 2                  # the pooled one, then one retry on a fresh one


def test_a_retried_request_carries_its_body_once(proxy: Proxy) -> None:
    flaky = FlakyUpstream()
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        r1, _ = get(conn, f"http://flaky.test:{flaky.port}/one")
        conn.request("POST", f"http://flaky.test:{flaky.port}/two", body=b"hello")
        r2 = conn.getresponse()
        r2.read()
    finally:
        conn.close()
        flaky.close()
    assert (r1.status, r2.status, flaky.connections) == (200, 200, 2)
    retried = flaky.received[1]
    assert retried.startswith(b"POST /two HTTP/1.1\r\n")
    assert retried.endswith(b"\r\n\r\nhello") and retried.count(b"hello") == 1


def test_5mb_download_intact(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        conn.request("GET", "/big")
        resp = conn.getresponse()
        digest = hashlib.sha256()
        total = 0
        while block := resp.read(256 * 1024):
            digest.update(block)
            total += len(block)
    finally:
        conn.close()
    expected = hashlib.sha256(BIG_BLOCK * (BIG // len(BIG_BLOCK))).hexdigest()
    assert resp.status == 200 and total == BIG and digest.hexdigest() == expected


def test_host_header_disagreeing_with_connect_is_denied(proxy: Proxy, client_ctx: ssl.SSLContext,
                                                        https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        resp, raw = get(conn, "/", Host="other.test")
    finally:
        conn.close()
    assert resp.status == 403
    body = json.loads(raw)
    assert body["decision"] == "deny" and "CONNECT target" in body["reason"]


def test_smuggling_shape_is_refused(proxy: Proxy, http_upstream: Upstream) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST http://plain.test:%d/ HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % http_upstream.port)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of its own, so a test can fill it (a full disk, for real)."""
    import os
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN in the initial user namespace)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(directory: Path) -> Path:
    import os
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_audit_unwritable_fails_closed(gvm_ca: CertificateAuthority, upstream_ca: tuple[CertificateAuthority, str],
                                       http_upstream: Upstream, small_fs: Path) -> None:
    # A full disk (ENOSPC on write): nothing is forwarded or answered; once there is room again the
    # log goes on, first recording how many requests it refused, and still verifies.
    log_path = small_fs / "audit.jsonl"
    writer = AuditLog(log_path, container="test")
    filler = _fill(small_fs)
    # The log's last page may still have room: fill it with records until the disk says no (that
    # failed append is the first refusal the outage record counts).
    from gvmrt.audit.writer import AuditError
    with pytest.raises(AuditError, match="short write|No space left"):
        for _ in range(1000):
            writer.append({"record": "lifecycle", "event": "padding"})
    p = Proxy(CompiledPolicy.compile(parse_egress(EGRESS)), gvm_ca, writer, upstream_ca[1])
    try:
        before = http_upstream.connections
        conn = http.client.HTTPConnection(p.host, p.port, timeout=TIMEOUT)
        try:
            resp, raw = get(conn, f"http://plain.test:{http_upstream.port}/x")
            assert resp.status == 503 and "cannot record" in json.loads(raw)["reason"]
        finally:
            conn.close()
        # Not forwarded, not even dialled: an allowed request that cannot be recorded goes nowhere.
        assert http_upstream.connections == before
        conn = http.client.HTTPConnection(p.host, p.port, timeout=TIMEOUT)
        try:
            resp, raw = get(conn, f"http://plain.test:{http_upstream.port}/admin")
            assert resp.status == 503               # a deny that cannot be recorded is not answered 403 either
        finally:
            conn.close()
        filler.unlink()
        conn = http.client.HTTPConnection(p.host, p.port, timeout=TIMEOUT)
        try:
            resp, raw = get(conn, f"http://plain.test:{http_upstream.port}/x")
            assert resp.status == 200
        finally:
            conn.close()
    finally:
        p.close()
        writer.close()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    outage = [r for r in records if r.get("event") == "audit_recovered"]
    assert len(outage) == 1 and outage[0]["refused"] == 3
    assert "short write" in outage[0]["reason"] or "No space left" in outage[0]["reason"]
    report = verify_log([str(log_path)])
    assert report.ok and report.closed, report.problems


def test_audit_only_is_forwarded_and_flagged(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream,
                                             audit_path: Path) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        resp, _ = get(conn, "/review")
    finally:
        conn.close()
    assert resp.status == 200
    entry = audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))
    assert entry["decision"] == "audit_only" and entry["rule"] == "review" and entry["flagged"] is True


def test_require_approval_is_denied_at_timeout(proxy: Proxy, client_ctx: ssl.SSLContext,
                                               https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        start = time.monotonic()
        resp, raw = get(conn, "/ask")
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    body = json.loads(raw)
    assert resp.status == 403 and elapsed >= 1.0
    assert body["rule"] == "ask" and "approval not given" in body["reason"]


def test_client_without_sni_gets_the_connect_host(proxy: Proxy, gvm_ca: CertificateAuthority,
                                                  https_upstream: Upstream) -> None:
    ctx = ssl.create_default_context(cadata=gvm_ca.cert_pem.decode())
    ctx.check_hostname = False                      # so that no SNI is sent; the chain is still verified
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"CONNECT api.test:%d HTTP/1.1\r\nHost: api.test:%d\r\n\r\n" % ((https_upstream.port,) * 2))
        assert raw.recv(4096).startswith(b"HTTP/1.1 200 ")
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            cert = tls.getpeercert()
            names = [v for k, v in cert["subjectAltName"] if k == "DNS"]
            assert names == ["api.test"]
            tls.sendall(b"GET /nosni HTTP/1.1\r\nHost: api.test:%d\r\nConnection: close\r\n\r\n" % https_upstream.port)
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"path": "/nosni"' in reply


def test_streamed_request_body_is_forwarded(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream,
                                            audit_path: Path) -> None:
    payload = b"x" * (200 * 1024)                   # above the inspection limit: streamed, not buffered
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        conn.request("POST", "/upload", body=payload, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and len(body["body"]) == len(payload)
    assert audit_line(audit_path, resp.getheader("X-Gvm-Request-Id"))["bytes_out"] == len(payload)


def test_chunked_request_body_is_reframed(proxy: Proxy, client_ctx: ssl.SSLContext, https_upstream: Upstream) -> None:
    conn = tunnel(proxy, client_ctx, "api.test", https_upstream.port)
    try:
        conn.request("POST", "/chunks", body=iter([b"alpha ", b"beta ", b"gamma"]),
                     headers={"Content-Type": "text/plain"}, encode_chunked=True)
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200 and body["body"] == "alpha beta gamma"


# --- timeouts on every read (issue 3) ------------------------------------------------------------

SHORT = 0.5


@pytest.fixture(scope="module")
def short_proxy(gvm_ca: CertificateAuthority, upstream_ca: tuple[CertificateAuthority, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    writer = AuditLog(tmp_path_factory.mktemp("short") / "audit.jsonl", container="test")
    p = Proxy(CompiledPolicy.compile(parse_egress(EGRESS)), gvm_ca, writer, upstream_ca[1],
              timeouts=Timeouts(client_idle=SHORT, read=SHORT, write=SHORT, tls_handshake=SHORT))
    yield p
    p.close()
    writer.close()


def _closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the proxy closes `sock` (reading whatever it answers first)."""
    start = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(4096):
        pass
    return time.monotonic() - start


def test_an_idle_client_is_closed_after_client_idle(short_proxy: Proxy) -> None:
    with socket.create_connection((short_proxy.host, short_proxy.port)) as sock:
        took = _closed_within(sock, 5)
    assert SHORT <= took < SHORT + 1.5


def test_a_head_that_never_ends_is_cut(short_proxy: Proxy) -> None:
    with socket.create_connection((short_proxy.host, short_proxy.port)) as sock:
        sock.sendall(b"GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\nX-Slow: ")
        took = _closed_within(sock, 5)
    assert took < SHORT + 1.5


def test_a_body_that_stalls_is_cut(short_proxy: Proxy, http_upstream: Upstream) -> None:
    with socket.create_connection((short_proxy.host, short_proxy.port)) as sock:
        sock.sendall(b"POST http://plain.test:%d/x HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 10\r\n\r\nabc"
                     % http_upstream.port)
        took = _closed_within(sock, 5)
    assert took < SHORT + 1.5


def test_an_upstream_that_never_answers_gets_504(short_proxy: Proxy) -> None:
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    t = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
    t.start()
    try:
        conn = http.client.HTTPConnection(short_proxy.host, short_proxy.port, timeout=5)
        start = time.monotonic()
        resp, body = get(conn, f"http://plain.test:{silent.getsockname()[1]}/never")
        took = time.monotonic() - start
        conn.close()
    finally:
        t.join(5)
        for c in accepted:
            c.close()
        silent.close()
    assert resp.status == 504 and took < SHORT + 1.5
    assert json.loads(body)["decision"] == "allow" and "TimeoutError" in json.loads(body)["reason"]


def test_an_upstream_cannot_speak_for_the_sidecar(proxy: Proxy, http_upstream: Upstream) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=TIMEOUT)
    try:
        resp, body = get(conn, f"http://plain.test:{http_upstream.port}/spoof")
    finally:
        conn.close()
    assert body == b"spoof"
    assert resp.headers.get_all("X-Gvm-Decision") == ["allow"]
    ids = resp.headers.get_all("X-Gvm-Request-Id")
    assert len(ids) == 1 and ids[0] != "0000000000000000"


def test_an_upload_the_client_abandons_is_on_record(proxy: Proxy, http_upstream: Upstream, audit_path: Path) -> None:
    # Bigger than what is buffered for JSON rules, so it is streamed: the decision was written
    # before the first byte went upstream, and the outcome says the client went away.
    with socket.create_connection((proxy.host, proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST http://plain.test:%d/abandoned-upload HTTP/1.1\r\nHost: plain.test\r\n"
                     b"Content-Length: 200000\r\n\r\n" % http_upstream.port + b"x" * 100_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in audit_path.read_text().splitlines()]
        mine = [r for r in records if r.get("path") == "/abandoned-upload" or
                (r.get("record") == "outcome" and any(d.get("path") == "/abandoned-upload" and d["request_id"] == r["request_id"]
                                                      for d in records))]
        if len(mine) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(mine) == 2, mine
    decision, outcome = mine
    assert decision["record"] == "decision" and decision["decision"] == "allow" and decision["status"] is None
    assert outcome["record"] == "outcome" and outcome["status"] == 0 and "went away" in outcome["reason"]
    assert outcome["flagged"] and outcome["bytes_out"] > 0
