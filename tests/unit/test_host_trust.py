"""The sidecar's upstream trust store (gvmrt.proxy.upstream.host_trust_context): the host's CAs,
read from the hashed directory when that trusts exactly what OpenSSL's defaults trust, else the
defaults. Real TLS handshakes over memory BIOs against leaves of CAs put into a hashed directory
made here."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from gvmrt.proxy.certs import CertificateAuthority, LeafCache
from gvmrt.proxy.upstream import host_trust_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (c_rehash names)")


def _store(tmp: Path, ca: CertificateAuthority, bundle_inside: bool = True) -> tuple[Path, Path]:
    """A hashed directory holding `ca` (named as c_rehash names it), and a bundle with it."""
    certs = tmp / "certs"
    certs.mkdir()
    (tmp / "ca").mkdir(mode=0o700)
    ca.save(tmp / "ca")
    pem = (tmp / "ca" / "ca.pem").read_bytes()
    name = subprocess.run(["openssl", "x509", "-hash", "-noout"], input=pem, capture_output=True,
                          check=True).stdout.decode().strip()
    (certs / f"{name}.0").write_bytes(pem)
    bundle = (certs if bundle_inside else tmp) / "ca-certificates.crt"
    bundle.write_bytes(pem)
    return certs, bundle


def _context(monkeypatch: pytest.MonkeyPatch, certs: Path, bundle: Path) -> ssl.SSLContext:
    """host_trust_context() with the store at `certs` and `bundle` (as SSL_CERT_DIR/SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_DIR", str(certs))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return host_trust_context()


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (side, out, peer_in) in enumerate(((c, c_out, s_in), (s, s_out, c_in))):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            return
    raise AssertionError("handshake did not finish")


def test_the_hashed_directory_verifies_its_cas_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, other = CertificateAuthority.create("trusted"), CertificateAuthority.create("stranger")
    certs, bundle = _store(tmp_path, ca)
    ctx = _context(monkeypatch, certs, bundle)
    assert ctx.cert_store_stats()["x509"] == 0            # nothing parsed up front
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    _handshake(ctx, LeafCache(ca).context_for("api.example"), "api.example")
    assert ctx.cert_store_stats()["x509_ca"] == 1          # read when the chain needed it
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ctx, LeafCache(other).context_for("api.example"), "api.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ctx, LeafCache(ca).context_for("api.example"), "other.example")


def test_a_bundle_elsewhere_with_the_same_cas_is_not_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the bundle lives does not matter, what it holds does: nothing the directory lacks.
    ca = CertificateAuthority.create("trusted")
    certs, bundle = _store(tmp_path, ca, bundle_inside=False)
    ctx = _context(monkeypatch, certs, bundle)
    assert ctx.cert_store_stats()["x509"] == 0
    _handshake(ctx, LeafCache(ca).context_for("api.example"), "api.example")


def test_a_directory_without_hash_names_is_not_taken_for_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.create("trusted")
    certs, bundle = _store(tmp_path, ca)
    for f in certs.glob("*.0"):
        f.unlink()
    ctx = _context(monkeypatch, certs, bundle)
    assert ctx.cert_store_stats()["x509_ca"] == 1          # the bundle, loaded whole
    _handshake(ctx, LeafCache(ca).context_for("api.example"), "api.example")


def test_a_ca_appended_to_the_bundle_by_hand_is_still_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `cat corp.pem >> ca-certificates.crt` without update-ca-certificates: the directory lacks it,
    # so the directory alone would trust less than OpenSSL's defaults do. The defaults it is.
    ca, corp = CertificateAuthority.create("trusted"), CertificateAuthority.create("corp")
    certs, bundle = _store(tmp_path, ca)
    (tmp_path / "corp").mkdir(mode=0o700)
    corp.save(tmp_path / "corp")
    with bundle.open("ab") as f:
        f.write((tmp_path / "corp" / "ca.pem").read_bytes())
    ctx = _context(monkeypatch, certs, bundle)
    assert ctx.cert_store_stats()["x509_ca"] == 2
    _handshake(ctx, LeafCache(corp).context_for("api.example"), "api.example")


def test_a_ca_file_it_cannot_read_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A hashed name it cannot open now (here a dangling link; for a root monitor running as
    # nobody, a CA file only root may read) would fail later, when a chain needs it.
    ca = CertificateAuthority.create("trusted")
    certs, bundle = _store(tmp_path, ca)
    (certs / "0badc0de.0").symlink_to(tmp_path / "gone.pem")
    ctx = _context(monkeypatch, certs, bundle)
    assert ctx.cert_store_stats()["x509_ca"] == 1          # the bundle, loaded whole
    _handshake(ctx, LeafCache(ca).context_for("api.example"), "api.example")
