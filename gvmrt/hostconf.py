"""The host's own settings for gvmrt (not a bundle's): where audit logs go and which key signs them.

A JSON object in `$GVMRT_CONFIG`, else `/etc/gvmrt/config.json` for root and
`$XDG_CONFIG_HOME/gvmrt/config.json` (default ~/.config) for a user; absent means defaults. Like
the secrets file it must be ours and not writable by others: it chooses the key that signs logs.

    {"audit": {"dir": "/srv/audit", "key": "/etc/gvmrt/audit-key.pem", "max_segment_bytes": 67108864}}

Stdlib only (create imports it).
"""

from __future__ import annotations

import os
import stat

from gvmrt.errors import HostError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["config_dir", "path", "load", "audit_dir", "default_key_path", "signing_key"]

_AUDIT_KEYS = {"dir": str, "key": str, "max_segment_bytes": int}


def config_dir() -> str:
    """/etc/gvmrt for root, else $XDG_CONFIG_HOME/gvmrt (default ~/.config/gvmrt)."""
    from gvmrt.statedir import is_host_root
    if is_host_root():
        return "/etc/gvmrt"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "gvmrt")


def path() -> str:
    return os.environ.get("GVMRT_CONFIG") or os.path.join(config_dir(), "config.json")


def read_private_json(p: str, what: str, problem: Any) -> Any:
    """The JSON in file `p` (None when there is none), opened O_NOFOLLOW; `problem(stat)` names
    what is wrong with the file's owner or mode, or returns None. For the files that hold what
    gvmrt must not take from anyone else: the host config, the secrets file."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostError(f"{what} {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        why = problem(st) if stat.S_ISREG(st.st_mode) else "must be a regular file"
        if why:
            raise HostError(f"{what} {p} {why}")
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    finally:
        os.close(fd)
    from gvmrt import _json
    try:
        return _json.loads(data)
    except ValueError as exc:
        raise HostError(f"{what} {p}: not JSON ({exc})") from None


def load() -> dict[str, Any]:
    """The host config, checked; {} when there is none."""
    p = path()
    data = read_private_json(p, "host config", lambda st: (
        "must be owned by you (or root) and writable by neither group nor others: it chooses the audit "
        "log's signing key" if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022 else None))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HostError(f"host config {p}: must be a JSON object")
    unknown = sorted(set(data) - {"audit"})
    if unknown:
        raise HostError(f"host config {p}: /{unknown[0]}: unknown setting (known: audit)")
    audit = data.get("audit", {})
    if not isinstance(audit, dict):
        raise HostError(f"host config {p}: /audit: must be an object")
    for key, value in audit.items():
        want = _AUDIT_KEYS.get(key)
        if want is None:
            raise HostError(f"host config {p}: /audit/{key}: unknown setting (known: {', '.join(_AUDIT_KEYS)})")
        if not isinstance(value, want) or isinstance(value, bool):
            raise HostError(f"host config {p}: /audit/{key}: must be a {want.__name__}")
    if "max_segment_bytes" in audit and audit["max_segment_bytes"] < 4096:
        raise HostError(f"host config {p}: /audit/max_segment_bytes: at least 4096")
    return data


def audit_dir(conf: dict[str, Any] | None = None) -> str:
    """Where audit logs live: the host config's audit.dir, else /var/lib/gvmrt/audit for root and
    $XDG_STATE_HOME/gvmrt/audit (default ~/.local/state) for a user. Persistent disk, outside every
    container's data dir: `delete` never removes it."""
    conf = load() if conf is None else conf
    d = (conf.get("audit") or {}).get("dir")
    if d:
        return os.path.abspath(os.path.expanduser(d))
    from gvmrt.statedir import is_host_root
    if is_host_root():
        return "/var/lib/gvmrt/audit"
    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        home = os.environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "gvmrt", "audit")


def default_key_path() -> str:
    """The host's own signing key, made by `gvmrt audit keygen` (public key beside it, .pub.pem)."""
    return os.path.join(config_dir(), "audit-key.pem")


def signing_key(bundle_key: str | None, bundle_dir: str, conf: dict[str, Any] | None = None) -> str | None:
    """The private key file that signs a container's log, or None (unsigned): the bundle's
    gvm.audit.key (relative to the bundle directory), else the host config's audit.key, else the
    host's default key if `gvmrt audit keygen` made one (spec/audit.md, Which key signs)."""
    if bundle_key:
        return os.path.join(bundle_dir, os.path.expanduser(bundle_key))
    audit = ((load() if conf is None else conf).get("audit") or {})
    if audit.get("key"):
        return os.path.abspath(os.path.expanduser(str(audit["key"])))
    default = default_key_path()
    return default if os.path.exists(default) else None
