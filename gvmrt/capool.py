"""A small pool of ready sidecar CAs, so a governed `create` does not wait for one to be made.

Making a CA needs the cryptography package, whose import (~45 ms here) was the longest step of a
governed `create`: the container init waits for the CA before it mounts the overlay. A monitor that
has started serving tops the pool up (two entries, before it drops privileges); the next `create`
claims one by renaming it into its container's data dir (atomic: two creates never get the same)
and hands its certificate to the init at once.

Each CA is still the container's own: made for one container, never reused, valid 12 hours from
its making; an entry older than MAX_AGE is thrown away instead of claimed. Keys at rest are 0600
in a 0700 directory of the data root, like the container's own CA key.
"""

from __future__ import annotations

import os
import stat
import time

from gvmrt.statedir import data_root

POOL = "ca-pool"
WANT = 2
MAX_AGE = 3600.0   # seconds a pooled CA may wait (of its 12 h)


def pool_dir() -> str:
    return os.path.join(data_root(), POOL)


def _private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def claim(dest: str) -> str | None:
    """Move a pooled CA to `dest` (which must not exist) and return its certificate PEM, or None."""
    pool = pool_dir()
    if not _private(pool):
        return None
    now = time.time()
    for name in sorted(os.listdir(pool)):
        entry = os.path.join(pool, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            continue
        if name.startswith("."):
            if now - st.st_mtime > 60:
                _discard(entry)           # a refill that was killed half-way
            continue                      # being written
        if not _private(entry) or now - st.st_mtime > MAX_AGE:
            _discard(entry)
            continue
        try:
            os.rename(entry, dest)
        except OSError:
            continue                      # another create took it
        try:
            fd = os.open(os.path.join(dest, "ca.pem"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                pem = os.read(fd, 65536)
            finally:
                os.close(fd)
            return pem.decode("ascii")
        except (OSError, UnicodeDecodeError):
            _discard(dest)
            os.mkdir(dest, 0o700)
            return None
    return None


def refill(want: int = WANT) -> None:
    """Top the pool up to `want` entries (the monitor, once it serves, before dropping privileges)."""
    import secrets

    from gvmrt.proxy.certs import CertificateAuthority
    pool = pool_dir()
    os.makedirs(pool, mode=0o700, exist_ok=True)
    if not _private(pool):
        return
    have = sum(1 for n in os.listdir(pool) if not n.startswith("."))
    for _ in range(max(0, want - have)):
        tmp = os.path.join(pool, f".new-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o700)
        try:
            CertificateAuthority.create("gvmrt sidecar").save(tmp)
            os.rename(tmp, os.path.join(pool, secrets.token_hex(8)))
        except BaseException:
            _discard(tmp)
            raise


def _discard(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
