"""A small agent that calls an API the way agents do, with nothing but the standard library.

It does not know it is governed: it uses the proxy and trust variables it finds in its
environment, like any well-behaved client, and then misbehaves a little (a direct connection
that ignores the proxy, a metadata endpoint, a port the policy does not list). Each line it
prints is what it saw; `gvmrt` recorded the sidecar's side in the audit log.

    agent.py BASE_URL      e.g. https://api.demo.test:8443
"""

import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit


def call(what: str, url: str, body: dict | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, decision, text = resp.status, resp.headers.get("X-Gvm-Decision"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, decision, text = exc.code, exc.headers.get("X-Gvm-Decision"), exc.read().decode()
    except OSError as exc:
        status, decision, text = None, None, f"{type(exc).__name__}: {exc}"
    ms = (time.monotonic() - start) * 1000
    try:
        detail = json.loads(text)
        text = detail.get("reason") or detail.get("message") or text
    except ValueError:
        pass
    print(f"  {what:<44} {str(status):>4}  {decision or '-':<10} {ms:6.0f} ms  {text[:80]}", flush=True)


def direct(what: str, address: str, port: int, sni: str | None) -> None:
    """Ignore the proxy variables: connect straight to an address, as a hostile client would."""
    start = time.monotonic()
    try:
        with socket.create_connection((address, port), timeout=10) as raw:
            if sni is None:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                out = raw.recv(200).split(b"\r\n", 1)[0].decode()
            else:
                ctx = ssl.create_default_context()  # trusts SSL_CERT_FILE: the sidecar's CA
                if not sni:
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                with ctx.wrap_socket(raw, server_hostname=sni or None) as tls:
                    tls.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {sni}:{port}\r\nConnection: close\r\n\r\n".encode())
                    head = tls.recv(4096).decode(errors="replace")
                    decision = [h for h in head.split("\r\n") if h.lower().startswith("x-gvm-decision")]
                    out = head.split("\r\n", 1)[0] + ("  " + decision[0] if decision else "")
    except OSError as exc:
        out = f"{type(exc).__name__}: {exc}"
    print(f"  {what:<44} {out[:90]}  ({(time.monotonic() - start) * 1000:.0f} ms)", flush=True)


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "https://api.demo.test:8443"
    host = urlsplit(base).hostname
    port = urlsplit(base).port or 443
    print(f"agent: proxy {os.environ.get('HTTPS_PROXY')}, trusting {os.environ.get('SSL_CERT_FILE')}")
    print("  through the proxy variables (urllib):          status decision     time  answer")
    print(f"agent: my API key is {os.environ.get('DEMO_API_KEY')!r}")
    call("GET  /v1/models             (allowed)", f"{base}/v1/models")
    call("POST /v1/chat model=small   (allowed)", f"{base}/v1/chat", {"model": "small", "messages": []})
    call("POST /v1/chat model=huge    (denied)", f"{base}/v1/chat", {"model": "huge", "messages": []})
    call("GET  /admin/users           (denied)", f"{base}/admin/users")
    call("GET  /a/%2e%2e/admin/users  (encoded)", f"{base}/a/%2e%2e/admin/users")
    call("POST /v1/deploy             (approval)", f"{base}/v1/deploy", {"service": "web"})
    call("GET  unknown host           (caution)", f"https://unknown.demo.test:{port}/hello")
    call("GET  cloud metadata         (SSRF)", "http://169.254.169.254/latest/meta-data/")
    print("  ignoring the proxy variables:")
    direct(f"TLS to 192.0.2.1:{port}, SNI {host}", "192.0.2.1", port, host)
    direct("TLS to 192.0.2.1:443, no SNI", "192.0.2.1", 443, "")
    direct("TCP to 192.0.2.1:22 (not listed)", "192.0.2.1", 22, None)


if __name__ == "__main__":
    main()
