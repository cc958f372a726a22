"""gvmrt.proxy.certs: CA and leaf fields, CA files on disk, the leaf cache, SNI normalisation.

No sockets here (tests/integration/test_tls_mitm.py does real handshakes on loopback).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gvmrt.proxy.certs import (
    CA_CERT_FILE, CA_KEY_FILE, CertError, CertificateAuthority, LeafCache, normalise_sni,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("gvmrt test CA", valid_hours=3)


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


# --- the CA ----------------------------------------------------------------------------------

def test_ca_fields(ca: CertificateAuthority) -> None:
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gvmrt test CA"
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.NameConstraints)   # deliberately absent: see the module docstring
    cert.verify_directly_issued_by(cert)  # self-signed, and the signature checks


def test_ca_validity_window() -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    ca = CertificateAuthority.create("x", valid_hours=5)
    after = datetime.datetime.now(datetime.timezone.utc)
    five_min = datetime.timedelta(minutes=5)
    assert before - five_min - datetime.timedelta(seconds=1) <= ca.not_before <= after - five_min
    assert before + datetime.timedelta(hours=5) - datetime.timedelta(seconds=1) <= ca.not_after
    assert ca.not_after <= after + datetime.timedelta(hours=5)


def test_ca_cert_pem_is_the_certificate(ca: CertificateAuthority) -> None:
    assert ca.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert x509.load_pem_x509_certificate(ca.cert_pem) == ca.cert
    assert b"PRIVATE" not in ca.cert_pem


def test_ca_refuses_nonpositive_validity() -> None:
    with pytest.raises(ValueError):
        CertificateAuthority.create("x", valid_hours=0)


# --- CA files --------------------------------------------------------------------------------

def test_save_modes_and_round_trip(ca: CertificateAuthority, private_dir: Path) -> None:
    old = os.umask(0)   # the key must be 0600 because of how it is created, not thanks to a umask
    try:
        ca.save(private_dir)
    finally:
        os.umask(old)
    key_mode = stat.S_IMODE((private_dir / CA_KEY_FILE).stat().st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE((private_dir / CA_CERT_FILE).stat().st_mode) == 0o644
    assert (private_dir / CA_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = CertificateAuthority.load(private_dir)
    assert loaded.cert == ca.cert and loaded.cert_pem == ca.cert_pem
    # The loaded key really is the CA key: a leaf it issues verifies against the original CA cert.
    leaf = loaded.issue("a.example", ec.generate_private_key(ec.SECP256R1()).public_key())
    leaf.verify_directly_issued_by(ca.cert)


def test_save_refuses_existing_key(ca: CertificateAuthority, private_dir: Path) -> None:
    (private_dir / CA_KEY_FILE).write_bytes(b"someone else's")
    with pytest.raises(CertError, match="already exists"):
        ca.save(private_dir)
    assert (private_dir / CA_KEY_FILE).read_bytes() == b"someone else's"
    assert not (private_dir / CA_CERT_FILE).exists()


def test_save_twice_refused(ca: CertificateAuthority, private_dir: Path) -> None:
    ca.save(private_dir)
    with pytest.raises(CertError, match="already exists"):
        ca.save(private_dir)


def test_save_refuses_existing_cert_and_leaves_no_key(ca: CertificateAuthority, private_dir: Path) -> None:
    (private_dir / CA_CERT_FILE).write_bytes(b"x")
    with pytest.raises(CertError, match="already exists"):
        ca.save(private_dir)
    assert not (private_dir / CA_KEY_FILE).exists()


def test_save_does_not_follow_symlink(ca: CertificateAuthority, private_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (private_dir / CA_KEY_FILE).symlink_to(target)
    with pytest.raises(CertError):
        ca.save(private_dir)
    assert not target.exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_save_refuses_shared_dir(ca: CertificateAuthority, tmp_path: Path, mode: int) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(CertError, match="writable by group or others"):
        ca.save(d)
    assert list(d.iterdir()) == []


def test_save_refuses_symlinked_dir(ca: CertificateAuthority, private_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(private_dir)
    with pytest.raises(CertError):
        ca.save(link)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_readable_key(ca: CertificateAuthority, private_dir: Path, mode: int) -> None:
    ca.save(private_dir)
    (private_dir / CA_KEY_FILE).chmod(mode)
    with pytest.raises(CertError, match="group or others"):
        CertificateAuthority.load(private_dir)


def test_load_refuses_symlinked_key(ca: CertificateAuthority, private_dir: Path, tmp_path: Path) -> None:
    ca.save(tmp_path)  # tmp_path is 0700 and ours
    os.link(tmp_path / CA_CERT_FILE, private_dir / CA_CERT_FILE)
    (private_dir / CA_KEY_FILE).symlink_to(tmp_path / CA_KEY_FILE)
    with pytest.raises(CertError, match="symlink"):
        CertificateAuthority.load(private_dir)


def test_load_refuses_mismatched_pair(private_dir: Path, tmp_path: Path) -> None:
    a = CertificateAuthority.create("a")
    b = CertificateAuthority.create("b")
    a.save(private_dir)
    (private_dir / CA_CERT_FILE).write_bytes(b.cert_pem)
    with pytest.raises(CertError, match="does not match"):
        CertificateAuthority.load(private_dir)


def test_load_missing(private_dir: Path) -> None:
    with pytest.raises(CertError, match="cannot open"):
        CertificateAuthority.load(private_dir)


# --- leaves ----------------------------------------------------------------------------------

def test_leaf_fields(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca)
    leaf = cache.leaf_certificate("API.Example.com.")
    leaf.verify_directly_issued_by(ca.cert)
    assert ext(leaf, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["api.example.com"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api.example.com"
    eku = ext(leaf, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.cert, x509.SubjectKeyIdentifier).value.digest
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert ext(leaf, x509.KeyUsage).value.digital_signature
    assert ca.not_before <= leaf.not_valid_before_utc <= leaf.not_valid_after_utc <= ca.not_after
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert leaf.public_key() != ca.cert.public_key()   # the CA key never signs handshakes


def test_leaf_serials_random_and_key_shared(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca)
    a, b = cache.leaf_certificate("a.example"), cache.leaf_certificate("b.example")
    assert a.serial_number != b.serial_number and a.serial_number > 2**64
    assert a.public_key() == b.public_key()   # one leaf key per cache (module docstring)
    assert LeafCache(ca).leaf_certificate("a.example").public_key() != a.public_key()


@pytest.mark.parametrize("ip", ["127.0.0.1", "192.0.2.1", "::1", "2001:DB8::1"])
def test_leaf_for_ip_literal(ca: CertificateAuthority, ip: str) -> None:
    leaf = LeafCache(ca).leaf_certificate(ip)
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip)]
    assert san.get_values_for_type(x509.DNSName) == []


def test_leaf_long_name_has_critical_san_and_no_cn(ca: CertificateAuthority) -> None:
    name = ".".join(["a" * 60] * 2) + ".example"
    leaf = LeafCache(ca).leaf_certificate(name)
    assert leaf.subject == x509.Name([])
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [name]


def test_context_shape(ca: CertificateAuthority) -> None:
    ctx = LeafCache(ca).context_for("api.example.com")
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE   # a server that does not ask for client certificates


# --- the cache -------------------------------------------------------------------------------

def test_cache_hits_and_normalised_keys(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca)
    first = cache.context_for("api.example.com")
    assert cache.context_for("API.EXAMPLE.COM.") is first
    assert cache.context_for("api.example.com") is first
    assert (cache.stats.hits, cache.stats.misses, len(cache)) == (2, 1, 1)


def test_cache_lru_bound(ca: CertificateAuthority) -> None:
    cache = LeafCache(ca, max_entries=3)
    ctx_a = cache.context_for("a.example")
    cache.context_for("b.example")
    cache.context_for("c.example")
    assert cache.context_for("a.example") is ctx_a       # a is now most recently used
    cache.context_for("d.example")                        # evicts b, the least recently used
    assert len(cache) == 3
    assert "b.example" not in cache and "a.example" in cache and "c.example" in cache
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 4, 1)
    cache.context_for("b.example")                        # minted again; evicts c
    assert "c.example" not in cache
    assert (cache.stats.misses, cache.stats.evictions) == (5, 2)


def test_cache_refuses_bad_bound(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        LeafCache(ca, max_entries=0)


# --- SNI normalisation -----------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "norm"), [
    ("API.Example.COM", "api.example.com"),
    ("api.example.com.", "api.example.com"),
    ("localhost", "localhost"),
    ("_dmarc.example", "_dmarc.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a-b.c-d.example", "a-b.c-d.example"),
    ("127.0.0.1", "127.0.0.1"),
    ("2001:DB8:0:0::1", "2001:db8::1"),
])
def test_normalise_sni(raw: str, norm: str) -> None:
    assert normalise_sni(raw) == norm


@pytest.mark.parametrize("bad", [
    "", ".", "..", "a..b", ".a", "a.example..", "*.example.com", "-a.example", "a-.example",
    "a b.example", "a/b", "a:443", "bücher.example", "a\x00.example", "a" * 64 + ".example",
    ".".join(["a" * 63] * 4) + ".example", "[::1]",
])
def test_normalise_sni_refuses(bad: str, ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError):
        normalise_sni(bad)
    cache = LeafCache(ca)
    with pytest.raises(ValueError):
        cache.context_for(bad)
    assert len(cache) == 0 and cache.stats.misses == 0


@given(st.text(max_size=80))
def test_normalise_sni_total(name: str) -> None:
    """Any text either normalises to a fixed point or raises ValueError, never anything else."""
    try:
        norm = normalise_sni(name)
    except ValueError:
        return
    assert normalise_sni(norm) == norm
    assert norm == norm.lower() and norm.isascii() and not norm.endswith(".")
