"""`gvmrt proxy` standalone: a real process, a real upstream on loopback, the printed CA and variables."""
from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from tests.conftest import GVMRT


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_gvmrt_proxy_decides_logs_and_cleans_up(tmp_path: Path) -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    uport = upstream.server_address[1]
    bundle = tmp_path / "agent"
    bundle.mkdir()
    cfg = json.loads(subprocess.run([GVMRT, "spec"], check=True, capture_output=True, text=True).stdout)
    cfg["gvm"] = {"egress": {"rules": [
        {"id": "no-admin", "hosts": ["localhost"], "paths": ["/admin*"],
         "decision": {"action": "deny", "reason": "the agent has no business in admin"}},
        {"id": "local-api", "hosts": ["localhost"], "decision": {"action": "allow"}}]}}
    (bundle / "config.json").write_text(json.dumps(cfg))
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([GVMRT, "proxy", "--listen", "127.0.0.1:0", "--bundle", str(bundle), "--audit", str(audit),
                             "--allow-private", "localhost"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("gvmrt proxy: listening on 127.0.0.1:"), lines
        port = int(lines[0].split()[4].rsplit(":", 1)[1])
        ca_pem = lines[1].split(": ", 1)[1].strip()
        assert Path(ca_pem).read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert f"HTTPS_PROXY=http://127.0.0.1:{port}" in lines[3] and f"SSL_CERT_FILE={ca_pem}" in lines[3]
        key = Path(ca_pem).parent / "ca.key"
        assert key.stat().st_mode & 0o777 == 0o600
        # Its listener queues a burst of clients (ss shows a listener's backlog as Send-Q), not 100.
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                                   check=True).stdout.split()
        assert listening[2] == "4096", listening

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"http://localhost:{uport}/v1/items")
        ok = conn.getresponse()
        assert (ok.status, ok.read()) == (200, b"upstream saw /v1/items")
        conn.request("GET", f"http://localhost:{uport}/a/%2e%2e/admin")
        denied = conn.getresponse()
        body = json.loads(denied.read())
        assert denied.status == 403 and body["rule"] == "no-admin" and body["decision"] == "deny"
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        upstream.shutdown()
        upstream.server_close()
    assert proc.returncode == 0, err
    assert not key.exists() and not key.parent.exists(), "the run's CA key must not outlive the proxy"
    from gvmrt.audit.read import merge
    entries = [e for e in merge(json.loads(line) for line in audit.read_text().splitlines())
               if e["record"] == "decision"]
    assert [(e["rule"], e["decision"]) for e in entries] == [("local-api", "allow"), ("no-admin", "deny")]
    # The standalone proxy's log is the same chained log, closed cleanly when it stops.
    from gvmrt.audit.verify import verify_log
    report = verify_log([str(audit)], use_host_pin=False)
    assert report.ok and report.closed, report.problems


def test_gvmrt_proxy_bad_input(tmp_path: Path) -> None:
    res = subprocess.run([GVMRT, "proxy", "--listen", "nope", "--bundle", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "use HOST:PORT" in res.stderr
    res = subprocess.run([GVMRT, "proxy", "--bundle", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "config.json" in res.stderr
    assert os.listdir(tmp_path) == []


def test_gvmrt_proxy_uses_the_bundles_resolve_and_allow_private(tmp_path: Path) -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    uport = upstream.server_address[1]
    bundle = tmp_path / "agent"
    bundle.mkdir()
    cfg = json.loads(subprocess.run([GVMRT, "spec"], check=True, capture_output=True, text=True).stdout)
    cfg["gvm"] = {"egress": {"rules": [{"id": "api", "hosts": ["api.local.test"], "decision": {"action": "allow"}}],
                             "resolve": {"api.local.test": ["127.0.0.1"], "pinned.test": ["127.0.0.1"]},
                             "allow_private": ["api.local.test"]}}
    (bundle / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([GVMRT, "proxy", "--listen", "127.0.0.1:0", "--bundle", str(bundle), "--audit",
                             str(tmp_path / "a.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[4].rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", f"http://api.local.test:{uport}/v1/items")
        ok = conn.getresponse()
        assert (ok.status, ok.read()) == (200, b"upstream saw /v1/items")
        # Pinned to loopback but not named in allow_private: the guard still refuses it.
        conn.request("GET", f"http://pinned.test:{uport}/v1/items")
        refused = conn.getresponse()
        assert refused.status == 403 and "allow_private" in json.loads(refused.read())["reason"]
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        upstream.shutdown()
        upstream.server_close()
    assert proc.returncode == 0
