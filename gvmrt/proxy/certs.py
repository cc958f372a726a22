"""The sidecar's TLS identities: a per-container CA and the leaf certificates it mints per SNI.

Issue 3 (MITM) and DESIGN.md §6: every jail gets its own ephemeral CA (ECDSA P-256, hours of
validity, key only in the monitor's memory and a 0600 file in the container's data dir, never in
the jail). The sidecar terminates the agent's TLS with a leaf certificate for the name in the
ClientHello's SNI, minted on first use and cached. Modelled on mitmproxy's ``mitmproxy/certs.py``
(``create_ca``, ``dummy_cert``, ``CertStore``), with these differences, each measured or argued:

- ECDSA P-256 everywhere, not RSA: a P-256 key takes ~12 µs to generate and a leaf ~75 µs to
  build and sign (scripts/bench-certs), against tens of milliseconds for an RSA-2048 key.
- Hours, not years, of validity: the CA dies with the container, so there is nothing to revoke
  and no CRL endpoint (mitmproxy serves one because its CA lives for ten years).
- One leaf key per `LeafCache`, separate from the CA key. mitmproxy reuses the *CA's* key as
  every leaf's key; we keep the certificate-signing key out of handshakes (a TLS 1.2 server signs
  bytes the client partly chooses; keep one key per purpose) but still share one leaf key across
  hosts. The trade-off: whoever holds that key can impersonate every host the cache has served,
  but it sits in the same process memory as the CA key, which can impersonate every host anyway,
  so sharing costs no security. Per-leaf keys would cost only ~18 µs (keygen + PKCS#8 PEM) of a
  ~0.9 ms mint, so the saving is small too; the shared key is kept for parity with mitmproxy and
  one fewer secret per host in memory. Reuse also means that a client comparing leaf keys
  across hosts can tell it is being intercepted; it can tell that from the issuer anyway.
- No Name Constraints on the CA (RFC 5280 §4.2.1.10). A permitted subtree would have to be known
  when the CA is made, but the CA must be able to speak for any host the agent addresses (the
  policy, not the CA, decides what is allowed, and a Deny still needs a TLS session to carry the
  403 that says why); policies change on hot reload while the CA in the jail's trust store cannot.
  An excluded subtree would be cosmetic: the key never enters the jail, and the CA is trusted only
  inside that one jail for a few hours. ``path_length=0`` does the one job constraints could do
  here: the CA cannot mint intermediates.

Loading a key into an `ssl.SSLContext` needs a *path* (``load_cert_chain``). We hand OpenSSL a
memfd through ``/proc/self/fd/N`` (never on a filesystem, gone when closed; measured 0.72 ms per
context against 0.78 ms for a 0600 file in a private 0700 directory, which is the fallback when
memfds or /proc are missing). A pipe does not work: OpenSSL seeks back to read the key after the
certificate (ESPIPE). Of those 0.72 ms, ~0.1 ms is creating the SSLContext and ~0.6 ms is
inside OpenSSL's ``load_cert_chain``, none of it ours to shave; hence one context per host, cached, and an SNI callback that swaps
it in (``make_server_context``).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import re
import shutil
import ssl
import stat
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gvmrt.errors import GvmrtError

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
ALPN = ["http/1.1"]
BACKDATE = datetime.timedelta(minutes=5)   # tolerate a client clock a little behind ours
MAX_CN = 64                                # ub-common-name (RFC 5280 appendix A)

_CURVE = ec.SECP256R1()
_HASH = hashes.SHA256()                    # RFC 5758 §3.2: ecdsa-with-SHA256 for P-256


class CertError(GvmrtError):
    """The CA files cannot be written or read safely; the message names the file."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# --- the CA ----------------------------------------------------------------------------------

class CertificateAuthority:
    """A CA key and its self-signed certificate. Make one with `create` or `load`."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        """For the jail's trust bundle (and SSL_CERT_FILE & co)."""
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @property
    def not_before(self) -> datetime.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    @classmethod
    def create(cls, common_name: str, valid_hours: int = 12) -> CertificateAuthority:
        if valid_hours <= 0:
            raise ValueError(f"valid_hours must be positive, not {valid_hours}")
        key = ec.generate_private_key(_CURVE)
        name = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:MAX_CN]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gvmrt sidecar"),
        ])
        now = _now().replace(microsecond=0)
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(hours=valid_hours))
            # RFC 5280 §4.2.1.9: critical, CA; path_length=0 so it cannot mint intermediates.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            # §4.2.1.3: a CA signs certificates (and CRLs; we never issue one, but cRLSign is
            # what browsers' CA profiles expect next to keyCertSign).
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            # §4.2.1.2: MUST appear in CA certificates; leaves point at it with an AKI.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, _HASH)
        )
        return cls(key, cert)

    # -- files --

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ca.pem (0644) and ca.key (PKCS#8 PEM, 0600) into an existing private directory.

        Both are created with O_CREAT|O_EXCL|O_NOFOLLOW relative to a directory fd, so an existing
        file or a planted symlink is refused rather than followed or overwritten, and the key is
        0600 from its first byte (never chmod'ed after the fact, which would leave a window).
        """
        dfd = _open_private_dir(directory)
        try:
            key_pem = self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            _write_new(dfd, directory, CA_KEY_FILE, key_pem, 0o600)
            try:
                _write_new(dfd, directory, CA_CERT_FILE, self.cert_pem, 0o644)
            except BaseException:
                os.unlink(CA_KEY_FILE, dir_fd=dfd)
                raise
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Read back what `save` wrote, refusing a key that others could have read or swapped."""
        dfd = _open_private_dir(directory)
        try:
            key_pem = _read_file(dfd, directory, CA_KEY_FILE, private=True)
            cert_pem = _read_file(dfd, directory, CA_CERT_FILE, private=False)
        finally:
            os.close(dfd)
        where = os.path.join(os.fspath(directory), CA_KEY_FILE)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CertError(f"{where}: not a PEM CA key and certificate: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _CURVE.name:
            raise CertError(f"{where}: not an ECDSA P-256 key")
        if key.public_key() != cert.public_key():
            raise CertError(f"{where}: key does not match {CA_CERT_FILE}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CertError(f"{os.path.join(os.fspath(directory), CA_CERT_FILE)}: not a CA certificate")
        if cert.not_valid_after_utc <= _now():
            raise CertError(f"{os.path.join(os.fspath(directory), CA_CERT_FILE)}: the CA expired at "
                            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; create a new one")
        return cls(key, cert)

    # -- issuing --

    def issue(self, host: str, public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        """A serverAuth leaf for one normalised host name or IP literal (see `normalise_sni`)."""
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        # RFC 5280 §4.2.1.6: with an empty subject the SAN must be critical. Clients match on
        # the SAN only (RFC 6125 §6.4.4); the CN is there for people reading the certificate.
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= MAX_CN else []
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Within the CA's validity: a leaf can never outlive the CA that vouches for it.
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # No SubjectKeyIdentifier on leaves (optional, RFC 5280 §4.2.1.2); SChannel breaks when
            # leaf and CA share one (mitmproxy#6494), which cannot happen here but costs nothing.
            .add_extension(self._aki, critical=False)
            .sign(self._key, _HASH)
        )


def _open_private_dir(directory: str | os.PathLike[str]) -> int:
    """An fd on `directory`, refused if it is a symlink, not ours, or writable by group/others."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CertError(f"{os.fspath(directory)}: cannot open the CA directory: {exc.strerror}") from exc
    st = os.fstat(dfd)
    why = None
    if st.st_uid != os.geteuid():
        why = f"owned by uid {st.st_uid}, not {os.geteuid()}"
    elif st.st_mode & 0o022:
        why = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        os.close(dfd)
        raise CertError(f"{os.fspath(directory)}: refusing a CA directory {why}; use a private directory")
    return dfd


def _write_new(dfd: int, directory: str | os.PathLike[str], name: str, data: bytes, mode: int) -> None:
    path = os.path.join(os.fspath(directory), name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, mode, dir_fd=dfd)
    except FileExistsError as exc:
        raise CertError(f"{path}: already exists; refusing to overwrite a CA file") from exc
    except OSError as exc:
        raise CertError(f"{path}: cannot create: {exc.strerror}") from exc
    try:
        # The umask may have cleared bits of `mode` but never adds any: the key is <= 0600.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(name, dir_fd=dfd)
        raise CertError(f"{path}: cannot write: {exc.strerror}") from exc
    os.close(fd)


def _read_file(dfd: int, directory: str | os.PathLike[str], name: str, *, private: bool) -> bytes:
    path = os.path.join(os.fspath(directory), name)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CertError(f"{path}: is a symlink; refusing it") from exc
        raise CertError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CertError(f"{path}: not a regular file")
        if private and st.st_uid != os.geteuid():
            raise CertError(f"{path}: owned by uid {st.st_uid}, not {os.geteuid()}; refusing the key")
        if private and st.st_mode & 0o077:
            raise CertError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                            "read the CA key; refusing it (it must be 0600)")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- SNI -------------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def normalise_sni(name: str) -> str:
    """Lowercase, one trailing dot removed; ValueError for anything that is not a host name or IP.

    Underscores are accepted (real hosts use them and TLS clients send them); U-labels are not
    (CPython hands the SNI over as the ASCII A-label, RFC 5890 §2.3.2.1), nor wildcards.
    The leaf's SAN carries the name without the trailing dot: a client that verifies "host." as
    given (CPython's ssl does; curl strips the dot first) fails verification, as it would against
    the real server's certificate.
    """
    if not isinstance(name, str):
        raise ValueError(f"server name must be a str, not {type(name).__name__}")
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise ValueError("empty server name")
    try:
        # RFC 6066 §3 forbids IP literals in SNI, but the sidecar also mints for the original
        # destination of a captured connection and for CONNECT 192.0.2.1:443.
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    if len(host) > 253 or not host.isascii() or not all(_LABEL.match(label) for label in host.split(".")):
        raise ValueError(f"invalid server name {name!r}")
    return host


# --- leaves ----------------------------------------------------------------------------------

@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class LeafCache:
    """Server-side SSLContexts per host, minted on first use, at most `max_entries` (LRU).

    Thread-safe (one lock; minting holds it, ~0.8 ms, so two threads asking for the same new host
    mint once). Contexts live as long as the CA: leaves carry the CA's validity.
    """

    def __init__(self, ca: CertificateAuthority, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.ca = ca
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._key = ec.generate_private_key(_CURVE)
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._contexts)

    def __contains__(self, name: str) -> bool:
        return normalise_sni(name) in self._contexts

    def _hit(self, key: str) -> ssl.SSLContext | None:
        """The cached context for an already-normalised name (caller holds the lock)."""
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            self.stats.hits += 1
        return ctx

    def context_for(self, sni: str) -> ssl.SSLContext:
        with self._lock:
            # Fast path: keys are only ever normalised names, so an exact hit is already valid and
            # normal (skips normalise_sni, whose ip_address() probe raises for every host name).
            ctx = self._hit(sni)
        if ctx is not None:
            return ctx
        host = normalise_sni(sni)
        with self._lock:
            ctx = self._hit(host)
            if ctx is not None:
                return ctx
            self.stats.misses += 1
            ctx = self._mint(host)
            self._contexts[host] = ctx
            if len(self._contexts) > self.max_entries:
                self._contexts.popitem(last=False)
                self.stats.evictions += 1
            return ctx

    def leaf_certificate(self, sni: str) -> x509.Certificate:
        """The leaf a handshake for `sni` presents (mints it if needed); for tests and tooling."""
        ctx = self.context_for(sni)
        return x509.load_pem_x509_certificate(_leaf_pem(ctx))

    def _mint(self, host: str) -> ssl.SSLContext:
        cert = self.ca.issue(host, self._key.public_key())
        pem = cert.public_bytes(serialization.Encoding.PEM)
        ctx = _base_context()
        # Leaf only: the CA is the client's trust anchor and need not travel (RFC 8446 §4.4.2).
        _load_chain(ctx, pem + self._key_pem)
        ctx.gvmrt_leaf_pem = pem  # type: ignore[attr-defined]
        return ctx


def _leaf_pem(ctx: ssl.SSLContext) -> bytes:
    return ctx.gvmrt_leaf_pem  # type: ignore[attr-defined,no-any-return]


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _load_chain_memfd(ctx: ssl.SSLContext, pem: bytes) -> None:
    fd = os.memfd_create("gvmrt-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)   # one write: a memfd takes it whole
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class _TmpDirLoader:
    """Fallback: a 0700 directory of our own (mkdtemp), one 0600 file per load, unlinked at once."""

    def __init__(self) -> None:
        self.dir: str | None = None
        self.lock = threading.Lock()
        self.n = 0

    def __call__(self, ctx: ssl.SSLContext, pem: bytes) -> None:
        with self.lock:
            if self.dir is None:
                self.dir = tempfile.mkdtemp(prefix="gvmrt-leaf-")
            self.n += 1
            path = os.path.join(self.dir, f"{self.n}.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _pick_loader() -> Callable[[ssl.SSLContext, bytes], None]:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ca = CertificateAuthority.create("gvmrt probe", valid_hours=1)
        key = ec.generate_private_key(_CURVE)
        pem = ca.issue("probe.invalid", key.public_key()).public_bytes(serialization.Encoding.PEM)
        pem += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        _load_chain_memfd(probe, pem)
        return _load_chain_memfd
    except (AttributeError, OSError):   # no memfd_create, or no /proc in this mount namespace
        return _TmpDirLoader()


_loader: Callable[[ssl.SSLContext, bytes], None] | None = None


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    global _loader
    if _loader is None:
        _loader = _pick_loader()
    _loader(ctx, pem)


# --- the listening context -------------------------------------------------------------------

RefusedHook = Callable[[Any, str, "str | None"], None]
"""on_refused(ssl_object, reason, server_name): reason is "no-sni" or "invalid-sni"."""


def make_server_context(cache: LeafCache, on_refused: RefusedHook | None = None) -> ssl.SSLContext:
    """The context to accept with: its SNI callback swaps in ``cache.context_for(server_name)``.

    A ClientHello without SNI is refused with an unrecognized_name alert (RFC 6066 §3) and
    reported to `on_refused` so the sidecar can record it (issue 3: "A TLS client without SNI ...
    is closed and recorded"); so is a name `normalise_sni` rejects. Clients do not send SNI for an
    IP literal (RFC 6066 §3), so ``https://192.0.2.1/`` lands here as "no-sni": a sidecar that
    wants to serve such a connection must pick the context itself, e.g.
    ``cache.context_for(original_destination_ip)``, instead of using this one.

    The context itself holds no certificate: OpenSSL runs the servername callback before it picks
    the certificate, so every handshake either switches context or fails.
    """
    ctx = _base_context()

    def refuse(ssl_obj: Any, reason: str, name: str | None) -> int:
        if on_refused is not None:
            on_refused(ssl_obj, reason, name)
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    def sni_callback(ssl_obj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if server_name is None:
            return refuse(ssl_obj, "no-sni", None)
        try:
            ssl_obj.context = cache.context_for(server_name)
        except ValueError:
            return refuse(ssl_obj, "invalid-sni", server_name)
        return None

    ctx.sni_callback = sni_callback
    return ctx
