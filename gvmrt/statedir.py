"""Where a container's state lives, atomic writes, and the per-container lock.

Small runtime state (state.json, the exec FIFO, the lock) lives under the state root:
`--root DIR`, else `/run/gvmrt` for root, `$XDG_RUNTIME_DIR/gvmrt` for a user (DESIGN.md §3).
Bulky, lasting things (the overlay upper/work dirs) live on disk under the data root:
`/var/lib/gvmrt` for root, `$XDG_DATA_HOME/gvmrt` (default ~/.local/share/gvmrt) for a user.
Stdlib only: every lifecycle command imports this.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from gvmrt import _json
from gvmrt.errors import ContainerNotFound, HostError, StateCorrupt, UsageError

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any

_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
ID_MAX_LEN = 255  # the id names a directory: NAME_MAX


def validate_id(cid: str) -> str:
    if not cid:
        raise UsageError("container id must not be empty")
    if len(cid) > ID_MAX_LEN:
        raise UsageError(f"container id is {len(cid)} characters long; the limit is {ID_MAX_LEN}")
    bad = sorted(set(cid) - _ID_OK)
    if bad or cid in (".", ".."):
        shown = "".join(bad) or cid
        raise UsageError(f"invalid container id {cid!r}: {shown!r} not allowed; use only A-Z a-z 0-9 _ . -")
    return cid


def _owned_dir(path: str, create: bool) -> str:
    """Make sure ``path`` is a real directory owned by us and not writable by others."""
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise HostError(f"cannot create state directory {path}: {exc.strerror}") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise HostError(f"{path} must be a directory owned by uid {os.getuid()} and not writable by others; "
                        "remove it or pass --root")
    return path


_HOST_ROOT: bool | None = None


def is_host_root() -> bool:
    """uid 0 in the initial user namespace. uid 0 inside someone else's user namespace (a rootless
    container, `unshare -r`) cannot use /run or /var/lib and is treated as rootless."""
    global _HOST_ROOT
    if _HOST_ROOT is None:
        _HOST_ROOT = False
        if os.getuid() == 0:
            try:
                with open("/proc/self/uid_map") as f:
                    _HOST_ROOT = f.read().split() == ["0", "0", "4294967295"]
            except OSError:
                _HOST_ROOT = True
    return _HOST_ROOT


def default_state_root() -> str:
    uid = os.getuid()
    if is_host_root():
        return "/run/gvmrt"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "gvmrt")
    run_user = f"/run/user/{uid}"
    try:
        if os.stat(run_user).st_uid == uid:
            return os.path.join(run_user, "gvmrt")
    except OSError:
        pass
    # No session runtime dir (su, cron, CI): a private dir in /tmp, checked against squatting.
    return f"/tmp/gvmrt-{uid}"


def data_root() -> str:
    if is_host_root():
        return "/var/lib/gvmrt"
    base = os.environ.get("XDG_DATA_HOME")
    if not base:
        home = os.environ.get("HOME") or os.path.expanduser("~")
        if not home or home == "/" or not os.access(home, os.W_OK):
            raise HostError("no writable home directory for the overlay's upper dir; set XDG_DATA_HOME")
        base = os.path.join(home, ".local", "share")
    return os.path.join(base, "gvmrt")


class StateRoot:
    def __init__(self, root: str | None) -> None:
        self.custom = root is not None
        self.path = os.path.abspath(root) if root else default_state_root()

    def ensure(self) -> None:
        _owned_dir(self.path, create=True)

    def check(self, sdir: str | None = None) -> None:
        """Every command, not only create: a state root (or container dir) someone else can write
        could feed us a state.json that points delete or kill at things that are not ours."""
        _owned_dir(self.path, create=False)
        if sdir is not None:
            _owned_dir(sdir, create=False)

    def dir(self, cid: str) -> str:
        return os.path.join(self.path, cid)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.isfile(os.path.join(self.path, n, "state.json"))
                      or os.path.isdir(os.path.join(self.path, n)))

    def data_dir(self, cid: str) -> str:
        # Containers of different state roots may share an id; keep their upper dirs apart.
        if self.custom:
            from _sha256 import sha256  # hashlib would load OpenSSL (~3 ms)
            key = sha256(self.path.encode()).hexdigest()[:12]
        else:
            key = "default"
        return os.path.join(data_root(), "containers", key, cid)

    def audit_path(self, cid: str) -> str:
        """The sidecar's decision log: outside the container's data dir, so `delete` keeps it."""
        if self.custom:
            from _sha256 import sha256
            key = sha256(self.path.encode()).hexdigest()[:12]
        else:
            key = "default"
        from gvmrt.hostconf import audit_dir
        return os.path.join(audit_dir(), key, f"{cid}.jsonl")


def write_json_atomic(path: str, obj: Any) -> None:
    data = _json.dumps(obj).encode()  # before creating anything: an encoding error leaves no file
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def read_state(sdir: str, cid: str) -> dict[str, Any]:
    try:
        with open(os.path.join(sdir, "state.json"), "rb") as f:
            st = _json.loads(f.read())
    except FileNotFoundError:
        if os.path.isdir(sdir):
            # create was killed before it wrote anything: a husk that only delete --force removes.
            return {"id": cid, "status": "creating", "pid": 0, "husk": True}
        raise ContainerNotFound(cid) from None
    except ValueError as exc:
        raise StateCorrupt(cid, str(exc)) from None
    if not isinstance(st, dict) or not isinstance(st.get("id"), str):
        raise StateCorrupt(cid, "not a state object")
    return st


class Lock:
    """flock(2) on <state>/<id>/lock: serialises commands on one container.

    Only `create` makes the lock file. Everyone else opens it as it is: if the container was deleted
    before (no file) or while we waited (we hold a lock on an unlinked file), it does not exist.
    """

    def __init__(self, sdir: str, cid: str | None = None, create: bool = False) -> None:
        self.path = os.path.join(sdir, "lock")
        self.cid = cid or os.path.basename(sdir)
        self.create = create
        self.fd = -1

    def acquire(self, blocking: bool = True) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if self.create else 0), 0o600)
        except FileNotFoundError:
            raise ContainerNotFound(self.cid) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        if not self.create and os.fstat(self.fd).st_nlink == 0:
            self.release()
            raise ContainerNotFound(self.cid)
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
