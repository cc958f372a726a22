"""A governed jail end to end: the agent's only way out is its sidecar (issue 3).

Real parts only: a jail made by gvmrt (as root and as the unprivileged test user), Debian's Python
in it (scripts/build-python-rootfs), the sidecar in the monitor process beside it, and an HTTPS and
an HTTP upstream in this process on the host's loopback, with a certificate from a CA the bundle
names in gvm.egress.upstream_ca. The jail reaches "api.test" because the policy pins it to
127.0.0.1 (gvm.egress.resolve) and allows that private address by name (allow_private).

The agent code runs with `python3 -c`; it reads a helper module and writes its results as JSON
into /t, a directory of this test bind-mounted into the jail.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Bundles, Gvmrt, default_config, user_processes

BIG = 50 * 1024 * 1024

# The agent's side: imported in the jail from /t/agentlib.py.
AGENTLIB = r'''
import http.client, json, os, socket, ssl, sys, time

def emit(**kw):
    print(json.dumps(kw), flush=True)

def _answer(resp, started):
    body = resp.read()
    return {"status": resp.status, "decision": resp.getheader("X-Gvm-Decision"),
            "request_id": resp.getheader("X-Gvm-Request-Id"), "body": body.decode("latin-1"),
            "len": len(body), "secs": time.monotonic() - started}

def proxied(method, url, body=None, headers=None, timeout=30):
    """Through the proxy the environment names (HTTPS_PROXY), as a proxy-aware client does."""
    from urllib.parse import urlsplit
    u = urlsplit(url)
    proxy = urlsplit(os.environ["HTTPS_PROXY"])
    started = time.monotonic()
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, timeout=timeout,
                                           context=ssl.create_default_context())
        conn.set_tunnel(u.hostname, u.port or 443)
        target = u.path + ("?" + u.query if u.query else "")
    else:
        conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=timeout)
        target = url
    try:
        conn.request(method, target, body=body, headers=headers or {})
        return _answer(conn.getresponse(), started)
    except OSError as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}", "secs": time.monotonic() - started}
    finally:
        conn.close()

def direct(address, port, path="/echo", host=None, sni=None, tls=True, cafile=None, timeout=15):
    """Ignoring every proxy variable: a connection to an address, as a proxy-unaware client makes."""
    started = time.monotonic()
    try:
        if tls:
            ctx = ssl.create_default_context(cafile=cafile)
            if sni is None:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(address, port, timeout=timeout, context=ctx)
            if sni is not None:
                # http.client sends SNI = the host it connects to; connect by address, present the name.
                raw = socket.create_connection((address, port), timeout=timeout)
                conn.sock = ctx.wrap_socket(raw, server_hostname=sni)
        else:
            conn = http.client.HTTPConnection(address, port, timeout=timeout)
        conn.request("GET", path, headers={"Host": host or f"{address}:{port}"})
        return _answer(conn.getresponse(), started)
    except (OSError, ssl.SSLError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}", "secs": time.monotonic() - started}
'''


# --- the upstream on the host's loopback -----------------------------------------------------

def _certs(tmp: Path) -> tuple[Path, Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gvmrt test upstream CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.test")]))
            .issuer_name(name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.test"), x509.DNSName("*.api.test"),
                                                        x509.DNSName("loop.test")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = tmp / "upstream-ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp / "leaf.pem"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_pem, chain


class Upstream:
    """HTTPS and HTTP on 127.0.0.1 (ephemeral ports); records every request it sees."""

    def __init__(self, tmp: Path) -> None:
        self.ca, chain = _certs(tmp)
        self.seen: list[tuple[str, str, str]] = []   # (method, path, host)
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _note(self) -> None:
                upstream.seen.append((self.command, self.path, self.headers.get("Host", "")))

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._note()
                if self.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(BIG))
                    self.end_headers()
                    block = bytes(range(256)) * 256
                    for _ in range(BIG // len(block)):
                        self.wfile.write(block)
                elif self.path == "/sse":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(5):
                        data = f"data: event {i}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        time.sleep(0.3)
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self._send(200, json.dumps({"method": "GET", "path": self.path,
                                                "headers": dict(self.headers)}).encode())

            def do_POST(self) -> None:
                self._note()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(200, json.dumps({"method": "POST", "path": self.path, "len": len(body)}).encode())

        self.https = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain)
        self.https.socket = ctx.wrap_socket(self.https.socket, server_side=True)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.https_port = self.https.server_address[1]
        self.http_port = self.http.server_address[1]
        for srv in (self.https, self.http):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        for srv in (self.https, self.http):
            srv.shutdown()
            srv.server_close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with tempfile.TemporaryDirectory() as tmp:
        up = Upstream(Path(tmp))
        up.ca_pem = up.ca.read_bytes()  # type: ignore[attr-defined]
        yield up
        up.close()


# --- governed bundles ----------------------------------------------------------------------

class Agent:
    """A governed bundle running Python, with /t shared with this test."""

    def __init__(self, gv: Gvmrt, bundles: Bundles, rootfs: Path, upstream: Upstream,
                 rules: list[dict[str, Any]], **egress: Any) -> None:
        self.gv = gv
        self.shared = Path(tempfile.mkdtemp(prefix="agent-", dir=bundles.base.parent))
        (self.shared / "agentlib.py").write_text(AGENTLIB)
        if gv.uid:
            os.chown(self.shared, gv.uid, gv.uid)
        self.shared.chmod(0o755)
        self.upstream = upstream
        policy = {"rules": rules, "resolve": {"api.test": ["127.0.0.1"], "loop.test": ["127.0.0.1"]},
                  "allow_private": ["api.test"], "upstream_ca": "upstream-ca.pem"}
        policy.update(egress)

        def edit(cfg: dict[str, Any]) -> None:
            cfg["gvm"] = {"egress": policy}
            cfg["mounts"].append({"destination": "/t", "type": "bind", "source": str(self.shared),
                                  "options": ["rbind", "rw"]})
            cfg["process"]["env"].append("PYTHONPATH=/t")
            cfg["process"]["env"].append("PYTHONDONTWRITEBYTECODE=1")

        self.bundle = bundles.make(["true"], edit=edit, shared_rootfs=rootfs)
        (self.bundle / "upstream-ca.pem").write_bytes(upstream.ca.read_bytes())
        self.n = 0

    def config(self) -> dict[str, Any]:
        return json.loads((self.bundle / "config.json").read_text())

    def _with_args(self, args: list[str]) -> None:
        cfg = self.config()
        cfg["process"]["args"] = args
        (self.bundle / "config.json").write_text(json.dumps(cfg))

    def run(self, code: str, *, cid: str | None = None, watch: bool = False, timeout: float = 90) -> list[dict[str, Any]]:
        """Run `code` (after `from agentlib import *`) in the jail; its emit() lines, parsed."""
        self.n += 1
        self._with_args(["python3", "-c", "from agentlib import *\n" + code])
        res = self.gv("run", *(["--watch"] if watch else []), "--bundle", str(self.bundle), cid or f"a{self.n}",
                      timeout=timeout)
        assert res.rc == 0, f"agent failed ({res.rc}): {res.err}\n{res.out}"
        return [json.loads(line) for line in res.out.splitlines() if line.startswith("{")]

    def records(self, cid: str) -> list[dict[str, Any]]:
        """Every record of the container's log (all segments), decision and outcome merged."""
        from gvmrt.audit.read import merge, records, segments
        return merge(records(segments(str(self.records_path(cid)))))

    def audit(self, cid: str) -> list[dict[str, Any]]:
        """The container's requests, one record each (decision + outcome: gvmrt.audit.read.merge)."""
        return [r for r in self.records(cid) if r.get("record") == "decision"]

    def lifecycle(self, cid: str) -> list[dict[str, Any]]:
        return [r for r in self.records(cid) if r.get("record") == "lifecycle"]

    def records_path(self, cid: str) -> Path:
        return self.gv.audit_log(cid)


@pytest.fixture
def agent_env(env: tuple[Gvmrt, Bundles], python_rootfs: dict[str, Path], upstream: Upstream) -> Any:
    gv, bundles = env

    def make(rules: list[dict[str, Any]], **egress: Any) -> Agent:
        return Agent(gv, bundles, python_rootfs[gv.mode], upstream, rules, **egress)
    return make


@pytest.fixture
def rootless_agent(rootless: tuple[Gvmrt, Bundles], python_rootfs: dict[str, Path], upstream: Upstream) -> Any:
    gv, bundles = rootless

    def make(rules: list[dict[str, Any]], **egress: Any) -> Agent:
        return Agent(gv, bundles, python_rootfs["rootless"], upstream, rules, **egress)
    return make


ALLOW_API = {"id": "api", "hosts": ["api.test"], "decision": {"action": "allow"}}


# --- round trips ---------------------------------------------------------------------------

def test_explicit_proxy_https_and_http_round_trip(agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    out = agent.run(f"""
emit(**proxied("GET", "https://api.test:{upstream.https_port}/echo?x=1"))
emit(**proxied("POST", "http://api.test:{upstream.http_port}/submit", body=b"x" * 1000,
               headers={{"Content-Type": "text/plain"}}))
""", cid="rt")
    assert [o["status"] for o in out] == [200, 200], out
    assert [o["decision"] for o in out] == ["allow", "allow"]
    echoed = json.loads(out[0]["body"])
    assert echoed["path"] == "/echo?x=1" and echoed["headers"]["Host"] == f"api.test:{upstream.https_port}"
    assert json.loads(out[1]["body"]) == {"method": "POST", "path": "/submit", "len": 1000}
    lines = agent.audit("rt")
    assert [(e["method"], e["host"], e["port"], e["path"], e["rule"], e["decision"], e["status"], e["mode"])
            for e in lines] == [
        ("GET", "api.test", upstream.https_port, "/echo?x=1", "api", "allow", 200, "proxy"),
        ("POST", "api.test", upstream.http_port, "/submit", "api", "allow", 200, "proxy")]
    assert all(e["container"] == "rt" for e in lines)
    assert lines[0]["request_id"] == out[0]["request_id"]
    assert lines[1]["bytes_out"] == 1000
    for e in lines:
        assert {"time", "duration_ms", "bytes_in", "reason"} <= set(e)


def test_transparent_capture_of_a_client_that_ignores_proxy_variables(agent_env: Any, upstream: Upstream) -> None:
    # Any address: the jail's local routes deliver it to the sidecar, which dials the *name*.
    agent = agent_env([{**ALLOW_API, "ports": [upstream.https_port, upstream.http_port]}])
    out = agent.run(f"""
emit(**direct("203.0.113.5", {upstream.https_port}, sni="api.test", host="api.test:{upstream.https_port}"))
emit(**direct("2001:db8::7", {upstream.https_port}, sni="api.test", host="api.test:{upstream.https_port}"))
emit(**direct("198.51.100.1", {upstream.http_port}, tls=False, host="api.test:{upstream.http_port}"))
""", cid="tp")
    assert [(o["status"], o["decision"]) for o in out] == [(200, "allow")] * 3, out
    lines = agent.audit("tp")
    assert [(e["mode"], e["host"], e["port"]) for e in lines] == [
        ("transparent", "api.test", upstream.https_port), ("transparent", "api.test", upstream.https_port),
        ("transparent", "api.test", upstream.http_port)]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_sidecar_serves_on_either_event_loop(agent_env: Any, upstream: Upstream, loop: str) -> None:
    """uvloop by default; GVMRT_EVENT_LOOP=asyncio (as on a host without uvloop) gives asyncio's own
    loop: the same explicit-proxy and transparent round trips work on it."""
    agent = agent_env([{**ALLOW_API, "ports": [upstream.https_port, upstream.http_port]}])
    cid = f"loop-{loop}"
    agent._with_args(["python3", "-c", f"""from agentlib import *
out = [proxied("GET", "https://api.test:{upstream.https_port}/echo"),
       proxied("GET", "http://api.test:{upstream.http_port}/echo"),
       direct("203.0.113.5", {upstream.https_port}, sni="api.test", host="api.test:{upstream.https_port}")]
open("/t/{cid}.json", "w").write(json.dumps([(o["status"], o["decision"]) for o in out]))
time.sleep(30)
"""])
    gv = agent.gv
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), cid,
          env={} if loop == "uvloop" else {"GVMRT_EVENT_LOOP": "asyncio"})
    try:
        monitor = gv.ok("state", cid).json()["sidecar"]["pid"]
        _wait_file(agent.shared / f"{cid}.json", timeout=60)    # served: its loop has long been running
        maps = Path(f"/proc/{monitor}/maps").read_text()
    finally:
        gv.ok("delete", "--force", cid)
    assert ("uvloop" in maps) == (loop == "uvloop")
    assert json.loads((agent.shared / f"{cid}.json").read_text()) == [[200, "allow"]] * 3
    assert [e["mode"] for e in agent.audit(cid)] == ["proxy", "proxy", "transparent"]


def test_ports_the_policy_does_not_list_are_refused_by_the_kernel(agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])   # no ports listed: only 80 and 443 (and the proxy) are captured
    out = agent.run(f"""
emit(**direct("203.0.113.5", {upstream.https_port}, sni="api.test"))
emit(**direct("203.0.113.5", 22, tls=False))
emit(**direct("127.0.0.1", {upstream.http_port}, tls=False))
""")
    for o in out:
        assert o["status"] is None and "ConnectionRefusedError" in o["error"], o


# --- decisions -----------------------------------------------------------------------------

def test_each_decision_in_the_jail(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([
        {"id": "no-admin", "hosts": ["api.test"], "paths": ["/admin*", "/admin*/**"],
         "decision": {"action": "deny", "reason": "admin is off limits"}},
        {"id": "slow", "hosts": ["api.test"], "paths": ["/slow"], "decision": {"action": "delay", "ms": 700}},
        {"id": "watched", "hosts": ["api.test"], "paths": ["/watched"], "decision": {"action": "audit_only"}},
        {"id": "held", "hosts": ["api.test"], "paths": ["/held"],
         "decision": {"action": "require_approval", "timeout_s": 1}},
        {"id": "rest", "hosts": ["api.test"], "paths": ["/ok"], "decision": {"action": "allow"}},
    ])
    base = f"https://api.test:{upstream.https_port}"
    before = len(upstream.seen)
    out = agent.run("\n".join(f'emit(**proxied("GET", "{base}{p}"))'
                              for p in ("/admin/users", "/slow", "/watched", "/held", "/unknown", "/ok")), cid="dec")
    deny, slow, watched, held, unknown, ok = out
    assert (deny["status"], deny["decision"]) == (403, "deny")
    body = json.loads(deny["body"])
    assert body == {"decision": "deny", "rule": "no-admin", "reason": body["reason"], "request_id": deny["request_id"]}
    assert "admin is off limits" in body["reason"]
    assert (slow["status"], slow["decision"]) == (200, "delay") and slow["secs"] >= 0.7
    assert (watched["status"], watched["decision"]) == (200, "audit_only")
    assert (held["status"], held["decision"]) == (403, "deny") and held["secs"] >= 1.0
    assert "approval not given" in json.loads(held["body"])["reason"]
    # Unmatched: the default, caution (a 300 ms delay, flagged).
    assert (unknown["status"], unknown["decision"]) == (200, "delay") and unknown["secs"] >= 0.3
    assert (ok["status"], ok["decision"]) == (200, "allow") and ok["secs"] < 0.3
    reached = [path for _, path, _ in upstream.seen[before:]]
    assert "/admin/users" not in reached and "/held" not in reached
    lines = {e["path"]: e for e in agent.audit("dec")}
    assert lines["/unknown"]["flagged"] and lines["/unknown"]["rule"] is None
    assert lines["/watched"]["flagged"] and not lines["/ok"]["flagged"]
    assert lines["/held"]["decision"] == "deny" and lines["/held"]["rule"] == "held"


def test_watch_mode_lets_everything_through_and_records_what_enforce_would_do(rootless_agent: Any,
                                                                             upstream: Upstream) -> None:
    agent = rootless_agent([{"id": "no", "hosts": ["api.test"], "decision": {"action": "deny", "reason": "no"}}])
    out = agent.run(f'emit(**proxied("GET", "https://api.test:{upstream.https_port}/watched-path"))',
                    cid="w", watch=True)
    assert out[0]["status"] == 200
    [line] = agent.audit("w")
    assert line["rule"] == "no" and "would be deny" in line["reason"]


ADMIN_DENY = {"id": "admin", "hosts": ["api.test"], "paths": ["/admin*", "/admin*/**"],
              "decision": {"action": "deny", "reason": "no admin"}}
EVASIONS = ["/a/%2e%2e/admin", "/a/%252e%252e/admin", "//admin", "/admin%00.txt", "/foo/../admin", "/ADMIN/../admin",
            "/%61dmin", "/./admin/x"]


def test_encoded_path_evasions_are_denied(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ADMIN_DENY, ALLOW_API])
    before = len(upstream.seen)
    out = agent.run("\n".join(f'emit(path={p!r}, **proxied("GET", "https://api.test:{upstream.https_port}{p}"))'
                              for p in EVASIONS))
    for o in out:
        assert (o["status"], o["decision"]) in ((403, "deny"), (400, None)), o
    assert not any("admin" in path.lower() for _, path, _ in upstream.seen[before:])


def test_ssrf_guard_from_the_jail(rootless_agent: Any, upstream: Upstream) -> None:
    # Everything allowed by policy; the guard still refuses what resolves to non-public addresses.
    agent = rootless_agent([{"id": "all", "hosts": ["*"], "decision": {"action": "allow"}}])
    targets = [f"http://127.0.0.1:{upstream.http_port}/", "http://169.254.169.254/latest/meta-data/",
               f"http://[::ffff:127.0.0.1]:{upstream.http_port}/", f"https://loop.test:{upstream.https_port}/"]
    before = len(upstream.seen)
    out = agent.run("\n".join(f'emit(**proxied("GET", "{t}"))' for t in targets))
    for o, t in zip(out, targets):
        assert o["status"] == 403, (t, o)
        assert "address" in json.loads(o["body"])["reason"], o
    assert upstream.seen[before:] == []


def test_smuggling_shapes_are_refused_in_the_jail(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW_API])
    before = len(upstream.seen)
    out = agent.run(f"""
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"POST http://api.test:{upstream.http_port}/x HTTP/1.1\\r\\nHost: api.test\\r\\nContent-Length: 4\\r\\n"
          b"Transfer-Encoding: chunked\\r\\n\\r\\n0\\r\\n\\r\\n")
emit(line=s.recv(100).split(b"\\r\\n")[0].decode())
""")
    assert out[0]["line"].startswith("HTTP/1.1 400"), out
    assert upstream.seen[before:] == []


# --- streaming -----------------------------------------------------------------------------

def test_50mb_download_and_sse_stream_with_flat_sidecar_memory(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW_API])
    code = f"""
import hashlib
conn = http.client.HTTPSConnection("127.0.0.1", 3128, context=ssl.create_default_context(), timeout=60)
conn.set_tunnel("api.test", {upstream.https_port})
conn.request("GET", "/big")
resp = conn.getresponse()
h, n = hashlib.sha256(), 0
while chunk := resp.read(1 << 20):
    h.update(chunk); n += len(chunk)
open("/t/big.json", "w").write(json.dumps({{"n": n, "sha": h.hexdigest()}}))
conn.request("GET", "/sse")
resp = conn.getresponse()
start, times = time.monotonic(), []
while line := resp.readline():
    if line.startswith(b"data:"):
        times.append(time.monotonic() - start)
open("/t/sse.json", "w").write(json.dumps(times))
open("/t/done", "w").close()
time.sleep(30)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    gv = agent.gv
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "big")
    state = gv.ok("state", "big").json()
    pid = state["sidecar"]["pid"]
    rss_start = _status_kb(pid, "VmRSS")
    _wait_file(agent.shared / "done", timeout=120)
    peak = _status_kb(pid, "VmHWM")
    gv.ok("delete", "--force", "big")
    import hashlib
    block = bytes(range(256)) * 256
    expect = hashlib.sha256(block * (BIG // len(block))).hexdigest()
    assert json.loads((agent.shared / "big.json").read_text()) == {"n": BIG, "sha": expect}
    lines = agent.audit("big")
    assert [(e["path"], e["status"]) for e in lines] == [("/big", 200), ("/sse", 200)]
    assert lines[0]["bytes_in"] == BIG
    # Bounded buffering: 50 MB went through; the sidecar's peak grew by a few reads, not the body.
    assert peak - rss_start < 16 * 1024, f"sidecar RSS {rss_start} kB at start, peak {peak} kB"
    # Events arrive as the upstream sends them (0.3 s apart), not all at the end.
    times = json.loads((agent.shared / "sse.json").read_text())
    assert len(times) == 5 and times[0] < 0.25 and times[-1] - times[0] > 1.0, times


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# --- what the agent may try ------------------------------------------------------------------

def test_agent_replacing_trust_or_proxy_variables_gains_nothing(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ADMIN_DENY, {**ALLOW_API, "ports": [upstream.https_port]}])
    (agent.shared / "real-ca.pem").write_bytes(upstream.ca.read_bytes())
    before = len(upstream.seen)
    out = agent.run(f"""
# 1. its own proxy variables: a proxy that does not exist in the jail
os.environ["HTTPS_PROXY"] = "http://10.9.9.9:8080"
emit(what="own proxy", **proxied("GET", "https://api.test:{upstream.https_port}/admin/x"))
# 2. trusting the upstream's real CA instead of the sidecar's: TLS fails, nothing is sent
emit(what="real CA", **direct("203.0.113.9", {upstream.https_port}, sni="api.test", path="/admin/x",
                             cafile="/t/real-ca.pem"))
# 3. replacing the trust store with the sidecar's CA plus the real one changes nothing either
open("/etc/ssl/certs/ca-certificates.crt", "w").write(open("/t/real-ca.pem").read())
emit(what="store", **direct("203.0.113.9", {upstream.https_port}, sni="api.test", path="/admin/x",
                           cafile="/etc/ssl/certs/ca-certificates.crt"))
# 4. the host's loopback address is the jail's own loopback
emit(what="loopback", **direct("127.0.0.1", {upstream.http_port}, tls=False, path="/admin/x"))
""")
    for o in out:
        assert o["status"] is None, o   # every attempt failed outright
    assert not any("admin" in path for _, path, _ in upstream.seen[before:])
    # The attempts to get around the MITM are on record.
    failed = [e for e in agent.audit(f"a{agent.n}") if "TLS handshake" in e["reason"]]
    assert len(failed) == 2 and all(e["host"] == "203.0.113.9" and e["flagged"] for e in failed), failed


# --- fail closed -----------------------------------------------------------------------------

def test_killing_the_monitor_leaves_the_jail_without_network(agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    code = f"""
import socket
def probe():
    out = {{}}
    for name, addr in (("proxy", ("127.0.0.1", 3128)), ("https", ("203.0.113.5", 443)), ("http", ("10.1.1.1", 80))):
        try:
            socket.create_connection(addr, timeout=2).close()
            out[name] = "connected"
        except OSError as exc:
            out[name] = type(exc).__name__
    return out
def put(name, obj):
    open(f"/t/{{name}}.tmp", "w").write(json.dumps(obj)); os.rename(f"/t/{{name}}.tmp", f"/t/{{name}}")
put("before", probe())
while not os.path.exists("/t/killed"):
    time.sleep(0.05)
# The kernel may finish closing a dead process's sockets a jiffy or two after it is a zombie
# (the last fput of an exiting task is deferred to a workqueue): allow it half a second.
start = time.monotonic()
while (after := probe()) != dict.fromkeys(("proxy", "https", "http"), "ConnectionRefusedError") \
        and time.monotonic() - start < 0.5:
    time.sleep(0.01)
put("after", after)
r = proxied("GET", "https://api.test:{upstream.https_port}/echo")
put("request", r)
time.sleep(30)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    gv = agent.gv
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "fc")
    state = gv.ok("state", "fc").json()
    assert state["sidecar"]["status"] == "running"
    mon = state["sidecar"]["pid"]
    _wait_file(agent.shared / "before")
    assert json.loads((agent.shared / "before").read_text()) == {"proxy": "connected", "https": "connected",
                                                                 "http": "connected"}
    os.kill(mon, signal.SIGKILL)
    _wait_gone(mon)
    (agent.shared / "killed").write_text("")
    _wait_file(agent.shared / "request")
    import subprocess as _sp
    after = json.loads((agent.shared / "after").read_text())
    if after.get("proxy") == "connected":
        # If the listeners outlive the monitor by more than the grace above, say who holds them.
        init = gv.ok("state", "fc").json()["pid"]
        diag = _sp.run(["nsenter", "-t", str(init), "-n", "ss", "-ltnpe"], capture_output=True, text=True).stdout
        ps = _sp.run(["ps", "-eo", "pid,ppid,uid,stat,comm,args"], capture_output=True, text=True).stdout
        raise AssertionError(f"mon={mon}\n{diag}\n{ps[-3000:]}")
    assert json.loads((agent.shared / "after").read_text()) == {
        "proxy": "ConnectionRefusedError", "https": "ConnectionRefusedError", "http": "ConnectionRefusedError"}
    assert json.loads((agent.shared / "request").read_text())["status"] is None
    state = gv.ok("state", "fc").json()
    assert state["status"] == "running" and state["sidecar"]["status"] == "stopped"
    gv.ok("delete", "--force", "fc")


def _wait_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until every thread of `pid` has exited. The leader shows Z as soon as it has, while the
    others (the monitor's worker threads, one perhaps in fsync) may still hold the process's file
    table, listening sockets included, for a moment: the leader's state alone is not enough."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = []
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return
        if all(st in ("Z", "X") for st in states):
            return
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.02)


# --- the CA, the state, cleanup ----------------------------------------------------------------

def _listen_backlogs(init: int) -> dict[str, int]:
    """Local address -> backlog (ss shows a listener's backlog as its Send-Q) in `init`'s netns."""
    import subprocess as _sp
    out = _sp.run(["nsenter", "-t", str(init), "-n", "ss", "-Hltn"], capture_output=True, text=True,
                  check=True).stdout
    return {row.split()[3]: int(row.split()[2]) for row in out.splitlines() if row.strip()}


def test_the_sidecar_keeps_the_backlog_of_the_jails_listeners(agent_env: Any, upstream: Upstream) -> None:
    """A server made on a passed socket listens on it again, by default with 100: a burst of 64
    clients then overflowed the explicit proxy's queue. Every listener keeps the init's 4096."""
    agent = agent_env([ALLOW_API])
    gv = agent.gv
    code = f"""
r = proxied("GET", "https://api.test:{upstream.https_port}/echo")
open("/t/served.tmp", "w").write(json.dumps(r)); os.rename("/t/served.tmp", "/t/served")
time.sleep(30)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\nimport json, os, time\n" + code])
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "bl")
    try:
        _wait_file(agent.shared / "served")       # the monitor serves the listeners by now
        assert json.loads((agent.shared / "served").read_text())["status"] == 200
        backlogs = _listen_backlogs(gv.ok("state", "bl").json()["pid"])
        assert backlogs.get("127.0.0.1:3128") == 4096, backlogs
        assert backlogs and set(backlogs.values()) == {4096}, backlogs
    finally:
        gv.ok("delete", "--force", "bl")


def test_ca_is_trusted_in_the_jail_and_its_key_stays_outside(agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    gv = agent.gv
    agent._with_args(["sh", "-c", "cat /etc/gvmrt/ca.pem; echo ====; tail -c 2000 /etc/ssl/certs/ca-certificates.crt;"
                      " echo ====; grep -rl 'PRIVATE KEY' /etc /root /tmp /var /home /t /usr/lib/ssl 2>/dev/null; echo ====; env"])
    res = gv.ok("run", "--keep", "--bundle", str(agent.bundle), "ca")
    ca_in_jail, bundle_tail, keys, env = res.out.split("====\n")
    data = gv.container_dir("ca")
    key = data / "ca" / "ca.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == gv.uid
    ca_pem = (data / "ca" / "ca.pem").read_text()
    assert ca_in_jail.strip() == ca_pem.strip()
    assert bundle_tail.strip().endswith(ca_pem.strip()), "appended to the distribution's trust bundle"
    assert keys.strip() == "", f"private keys visible in the jail: {keys}"
    assert "SSL_CERT_FILE=/etc/gvmrt/ca.pem" in env and "HTTPS_PROXY=http://127.0.0.1:3128" in env
    # The bundle's own rootfs is untouched: the CA went to the overlay's upper dir.
    lower = Path(agent.config()["root"]["path"])
    assert not (lower / "etc" / "gvmrt").exists()
    assert (lower / "etc/ssl/certs/ca-certificates.crt").read_text().count("BEGIN CERTIFICATE") == 0
    gv.ok("delete", "ca")
    assert not data.exists(), "delete removes the CA with the data dir"


def test_state_cleanup_and_processes_of_a_governed_container(agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    gv = agent.gv
    agent._with_args(["sleep", "60"])
    res = gv.ok("create", "--bundle", str(agent.bundle), "st")
    assert "not governed" not in res.err
    state = gv.ok("state", "st").json()
    side = state["sidecar"]
    assert side["status"] == "running" and side["pid"] > 0
    assert side["audit"] == str(agent.gv.audit_log("st"))
    # As the user who ran gvmrt; root's monitor drops to nobody once its files are open, which
    # is after it has answered create (but before its event loop accepts a connection).
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{side['pid']}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        uid, nnp = int(status["Uid"].split()[0]), status["NoNewPrivs"].strip()
        if (uid, nnp) == (gv.uid or 65534, "1") or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert (uid, nnp) == (gv.uid or 65534, "1")
    # Beside the container, not above it: the init's parent is not the monitor.
    with open(f"/proc/{state['pid']}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid != side["pid"]
    # The monitor holds none of the caller's stdio (a `$(gvmrt create)` would hang on it).
    fd1 = os.readlink(f"/proc/{side['pid']}/fd/1")
    assert fd1 == "/dev/null"
    gv.ok("start", "st")
    gv.ok("delete", "--force", "st")
    _wait_gone(side["pid"])
    assert Path(side["audit"]).exists(), "the audit log outlives the container"


def test_governed_create_cycles_leave_nothing_behind(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW_API])
    gv = agent.gv
    agent._with_args(["true"])
    monitors = []
    for i in range(15):
        gv.ok("create", "--bundle", str(agent.bundle), f"cy{i}")
        monitors.append(gv.ok("state", f"cy{i}").json()["sidecar"]["pid"])
        if i % 2:
            gv.ok("start", f"cy{i}")
        gv.ok("delete", "--force", f"cy{i}")
    gv.reap()
    for pid in monitors:
        _wait_gone(pid)
    procs = [p for p in user_processes(gv.uid) if int(p.split()[0]) != gv.caller.proc.pid]
    assert procs == []
    assert gv.ok("list", "--quiet").out == ""


def test_governed_bundle_refuses_the_host_network(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env

    def edit(cfg: dict[str, Any]) -> None:
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    b = bundles.make(config=default_config(["true"], governed=True), edit=edit)
    res = gv("create", "--bundle", str(b), "hostnet")
    assert res.rc == 2 and res.err.count("\n") == 1
    assert "/linux/namespaces" in res.err and "own network namespace" in res.err
    assert gv.ok("list", "--quiet").out == ""


def test_a_new_container_of_the_same_id_starts_a_new_log_and_keeps_the_old(rootless_agent: Any,
                                                                          upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW_API])
    code = f'emit(**proxied("GET", "https://api.test:{upstream.https_port}/n"))'
    agent.run(code, cid="again")
    agent.run(code, cid="again")
    assert len(agent.audit("again")) == 1
    logs = sorted(p.name for p in agent.gv.audit_log("again").parent.iterdir())
    assert len(logs) == 2 and logs[-1] == "again.jsonl" and logs[0].startswith("again.2"), logs


def test_a_governed_create_takes_a_ready_ca_from_the_pool(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW_API])
    gv = agent.gv
    pool = gv.data_root / "ca-pool"
    agent._with_args(["sleep", "30"])
    gv.ok("create", "--bundle", str(agent.bundle), "p1")     # its monitor fills the pool once it serves
    deadline = time.monotonic() + 10
    while not (pool.exists() and len([n for n in os.listdir(pool) if not n.startswith(".")]) >= 2):
        assert time.monotonic() < deadline, "the pool was not filled"
        time.sleep(0.05)
    pooled = {(pool / n / "ca.pem").read_text() for n in os.listdir(pool) if not n.startswith(".")}
    gv.ok("create", "--bundle", str(agent.bundle), "p2")
    mine = (gv.container_dir("p2") / "ca" / "ca.pem").read_text()
    assert mine in pooled, "p2's CA came from the pool"
    assert mine != (gv.container_dir("p1") / "ca" / "ca.pem").read_text()
    for cid in ("p1", "p2"):
        gv.ok("delete", "--force", cid)
    # And it is the CA the jail trusts: a request through p3 (also pooled) verifies.
    out = agent.run(f'emit(**proxied("GET", "https://api.test:{upstream.https_port}/echo"))', cid="p3")
    assert out[0]["status"] == 200
