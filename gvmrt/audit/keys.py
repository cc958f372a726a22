"""Ed25519 keys that sign the log's seals: `gvmrt audit keygen`, loading, and which key a log uses.

A private key is a PKCS#8 PEM file, mode 0600 and ours; its public key a SubjectPublicKeyInfo PEM
file beside it (``<name>.pub.pem``) that can be handed to an auditor. A key is named by its id:
the first 16 hex digits of SHA-256 over the 32 raw public bytes (gvmrt.audit.chain.key_id).

Which key signs a container's log (first that applies): the bundle's ``gvm.audit.key``, the host
config's ``audit.key`` (gvmrt.hostconf), the host's default key ``<config dir>/audit-key.pem`` if
`gvmrt audit keygen` made one. Otherwise the log is unsigned, and says so.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable

from gvmrt.audit.chain import key_id
from gvmrt.errors import HostError, UsageError

__all__ = ["Signer", "generate", "load_private", "load_public", "default_key_path", "public_path"]


@dataclass(frozen=True)
class Signer:
    path: str
    key: str                          # key id
    public_raw: bytes
    sign: Callable[[bytes], bytes]


def default_key_path() -> str:
    from gvmrt.hostconf import default_key_path as path
    return path()


def public_path(private: str) -> str:
    return (private[:-len(".pem")] if private.endswith(".pem") else private) + ".pub.pem"


def generate(path: str, force: bool = False) -> tuple[str, str]:
    """Write a new key pair (private 0600, created exclusively unless `force`); (key id, public path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key()
    pub_pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    pub_file = public_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    for target, data, mode in ((path, priv, 0o600), (pub_file, pub_pem, 0o644)):
        try:
            fd = os.open(target, flags, mode)
        except FileExistsError:
            raise UsageError(f"{target} exists already; pass --force to replace it (logs it signed stay "
                             "verifiable with its public key only)") from None
        except OSError as exc:
            raise HostError(f"{target}: {exc.strerror}") from None
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return key_id(raw), pub_file


def load_private(path: str) -> Signer:
    """The signer of a private key file, which must be ours and readable by nobody else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"audit signing key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise HostError(f"audit signing key {path} must be a regular file owned by uid {os.getuid()} with "
                            f"mode 0600 (it is {stat.filemode(st.st_mode)}, uid {st.st_uid}); "
                            f"chmod 600 {path}")
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise HostError(f"audit signing key {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise HostError(f"audit signing key {path}: an Ed25519 key is needed (`gvmrt audit keygen`)")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Signer(path, key_id(raw), raw, key.sign)


def load_public(path: str) -> tuple[bytes, str]:
    """(32 raw bytes, key id) of a public key file (PEM; a private key file gives its public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as exc:
        raise UsageError(f"--pubkey {path}: {exc.strerror}") from None
    key: object
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise UsageError(f"--pubkey {path}: not a PEM public key") from None
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"--pubkey {path}: not an Ed25519 key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw, key_id(raw)


def verify_signature(public_raw: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
