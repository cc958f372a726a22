"""The demo's upstream: a small HTTPS API on loopback, standing in for the internet (no network here).

Serves api.demo.test and *.demo.test on 127.0.0.1:PORT with a certificate from a throwaway CA,
and writes that CA to the bundle (upstream-ca.pem, named by gvm.egress.upstream_ca) so the
sidecar verifies the upstream as it would verify a public one.

    upstream.py BUNDLE_DIR PORT     (runs until killed; prints "ready" once listening)

The API key it expects is $DEMO_API_KEY: the demo gives it to gvmrt (GVMRT_SECRET_DEMO_API), never
to the agent, which holds a placeholder and still gets through.
"""

import datetime
import json
import os
import ssl
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_certs(names: list[str]) -> tuple[bytes, bytes, bytes]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gvmrt demo upstream CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem(ca), pem(leaf), key_pem


API_KEY = os.environ.get("DEMO_API_KEY", "")


class API(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _key(self) -> str:
        got = self.headers.get("Authorization", "")
        return "the real API key" if got == f"Bearer {API_KEY}" else f"no valid key ({got[:30] or 'none'})"

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._answer(200, {"message": f"models: small, huge; the API saw {self._key()}"})
        else:
            self._answer(200, {"message": f"hello from {self.headers.get('Host')}{self.path}"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/v1/deploy":
            self._answer(200, {"message": f"deployed {body.get('service')}"})
            return
        self._answer(200, {"message": f"chat answered by model {body.get('model')}"})

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    bundle, port = Path(sys.argv[1]), int(sys.argv[2])
    ca, leaf, key = make_certs(["api.demo.test", "*.demo.test"])
    (bundle / "upstream-ca.pem").write_bytes(ca)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.NamedTemporaryFile() as f:
        f.write(leaf + key)
        f.flush()
        ctx.load_cert_chain(f.name)
    server = ThreadingHTTPServer(("127.0.0.1", port), API)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
