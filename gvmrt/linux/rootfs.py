"""The jail's filesystem: OverlayFS root, config mounts, minimal /dev, masked and read-only paths.

Runs inside the container init, in its new mount namespace, before pivot_root. The plan (what to
mount, with which flags) was compiled in the parent by gvmrt.plan; this module is the boring
executor (STYLE.md habit 4: plan, then execute). Every failure names the path involved.
"""

from __future__ import annotations

import os
import stat

from gvmrt.linux import sys as lsys

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any

# statvfs f_flag bits (<sys/statvfs.h>) → mount flags. In a user namespace the kernel "locks" the
# flags a mount had when it was inherited; a bind remount must repeat them or fail with EPERM
# (mount(2), "EPERM ... locked"), which is why every remount ORs these in.
_ST_TO_MS = {1: lsys.MS_RDONLY, 2: lsys.MS_NOSUID, 4: lsys.MS_NODEV, 8: lsys.MS_NOEXEC,
             1024: lsys.MS_NOATIME, 2048: lsys.MS_NODIRATIME, 4096: lsys.MS_RELATIME}
_ATIME = lsys.MS_NOATIME | lsys.MS_NODIRATIME | lsys.MS_RELATIME | lsys.MS_STRICTATIME

DEFAULT_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_SYMLINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
                ("/proc/self/fd/2", "stderr"), ("pts/ptmx", "ptmx"))


class RootfsError(Exception):
    """A mount step failed; the message names the step and path (sent to `gvmrt create`)."""


def secure_join(root: str, unsafe: str) -> str:
    """``root``/``unsafe`` with symlinks resolved as if ``root`` were "/" (never escapes root).

    A rootfs is untrusted input: a symlink /etc -> /host/etc in it must not make a mount land on
    the host (CVE-2019-19921, runc's filepath-securejoin).
    """
    pending = [p for p in unsafe.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while pending:
        comp = pending.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, comp)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            # Nothing below a missing component exists either; keep honouring "." and "..".
            resolved.append(comp)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise RootfsError(f"too many levels of symbolic links resolving {unsafe} in the rootfs")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
        else:
            resolved.append(comp)
    return os.path.join(root, *resolved)


def _locked_flags(path: str) -> int:
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS.items() if flags & st)


def _remount(path: str, flags: int, what: str) -> None:
    """Bind-remount ``path`` with ``flags`` plus the flags the kernel has locked on it."""
    locked = _locked_flags(path)
    if flags & _ATIME:
        locked &= ~_ATIME
    try:
        lsys.mount(None, path, None, lsys.MS_REMOUNT | lsys.MS_BIND | flags | locked)
    except OSError as exc:
        raise RootfsError(f"{what}: remount {path} with {flags:#x}: {exc.strerror}") from exc


def _make_mountpoint(path: str, is_dir: bool) -> None:
    if os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def _escape_overlay(path: str) -> str:
    # overlayfs splits lowerdir on ':' and options on ','; both must be escaped with a backslash.
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def mount_overlay(lowers: list[str], upper: str, work: str, target: str, in_userns: bool) -> None:
    """The root filesystem: read-only lower layers (the bundle), writes to ``upper`` on disk."""
    opts = f"lowerdir={':'.join(_escape_overlay(p) for p in lowers)},upperdir={_escape_overlay(upper)}," \
           f"workdir={_escape_overlay(work)}"
    if in_userns:
        # Unprivileged overlay keeps whiteouts/opaque markers in user.overlay.* xattrs (Linux 5.11+,
        # Documentation/filesystems/overlayfs.rst "userxattr"); trusted.* needs host CAP_SYS_ADMIN.
        opts += ",userxattr"
    try:
        # nodev: a device node shipped in the (untrusted) rootfs must not open a host device.
        lsys.mount("overlay", target, "overlay", lsys.MS_NODEV, opts)
    except OSError as exc:
        raise RootfsError(f"mount overlay (lower {lowers[0]}, upper {upper}): {exc.strerror}") from exc


def _mount_one(rootfs: str, m: dict[str, Any], gid_mapped: Any) -> None:
    dest = secure_join(rootfs, m["dest"])
    mtype, flags, data = m["type"], m["flags"], list(m["data"])
    if mtype in ("proc", "sysfs") and dest != os.path.join(rootfs, *[p for p in m["dest"].split("/") if p]):
        # The init reads /proc after pivot_root: a rootfs symlink must not move procfs somewhere a
        # later mount can hide and replace it (runc CVE-2019-16884).
        raise RootfsError(f"mount {m['dest']}: the destination goes through a symlink in the rootfs; "
                          f"{mtype} must be mounted on a real directory")
    if mtype != "devpts":
        # No device nodes in the jail but the default ones (bind-mounted separately in setup_dev)
        # and ptys: there is no device cgroup here, and root without a user namespace may have
        # CAP_MKNOD. Documented in spec/config.md.
        flags |= lsys.MS_NODEV
    what = f"mount {m['dest']}"
    if mtype == "bind":
        src = m["source"]
        try:
            src_is_dir = os.path.isdir(src)
            os.stat(src)
        except OSError as exc:
            raise RootfsError(f"{what}: bind source {src}: {exc.strerror}") from exc
        _make_mountpoint(dest, src_is_dir)
        try:
            lsys.mount(src, dest, None, lsys.MS_BIND | (lsys.MS_REC if m["rec"] else 0))
        except OSError as exc:
            raise RootfsError(f"{what}: bind {src}: {exc.strerror}") from exc
        if flags & ~lsys.MS_REMOUNT:
            _remount(dest, flags & ~lsys.MS_REMOUNT, what)
    else:
        _make_mountpoint(dest, True)
        if mtype == "devpts":
            # gid=5 (tty) only exists inside the jail when the gid map covers it (crun drops it too).
            data = [d for d in data if not (d.startswith("gid=") and not gid_mapped(int(d[4:])))]
        try:
            lsys.mount(m["source"], dest, mtype, flags, ",".join(data) or None)
        except OSError as exc:
            if mtype in ("sysfs", "cgroup", "cgroup2", "mqueue"):
                # Without the namespace that owns it (e.g. sysfs needs a private network namespace,
                # mqueue a private IPC one), fall back to a read-only bind of the host's, as runc does.
                _fallback_bind(mtype, dest, what, exc)
            else:
                raise RootfsError(f"{what}: {mtype} ({','.join(data)}): {exc.strerror}") from exc
    if m["prop"]:
        lsys.mount(None, dest, None, m["prop"])


_FALLBACK_SOURCE = {"sysfs": "/sys", "cgroup": "/sys/fs/cgroup", "cgroup2": "/sys/fs/cgroup",
                    "mqueue": "/dev/mqueue"}


def _fallback_bind(mtype: str, dest: str, what: str, exc: OSError) -> None:
    src = _FALLBACK_SOURCE[mtype]
    try:
        lsys.mount(src, dest, None, lsys.MS_BIND | lsys.MS_REC)
    except OSError:
        raise RootfsError(f"{what}: {mtype}: {exc.strerror}") from exc
    _remount(dest, lsys.MS_RDONLY | lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC, what)


def setup_dev(rootfs: str) -> None:
    """Bind the default devices from the host (a rootless jail cannot mknod) and the usual links."""
    dev = secure_join(rootfs, "/dev")
    os.makedirs(dev, exist_ok=True)
    for name in DEFAULT_DEVICES:
        target = os.path.join(dev, name)
        if os.path.islink(target):
            os.unlink(target)
        _make_mountpoint(target, False)
        try:
            lsys.mount(f"/dev/{name}", target, None, lsys.MS_BIND)
        except OSError as exc:
            raise RootfsError(f"bind device /dev/{name}: {exc.strerror}") from exc
    for src, name in DEV_SYMLINKS:
        link = os.path.join(dev, name)
        if os.path.lexists(link):
            if name != "ptmx" or not os.path.exists(os.path.join(dev, "pts", "ptmx")):
                continue
            os.unlink(link)
        os.symlink(src, link)
    if os.path.exists("/proc/kcore") and not os.path.lexists(os.path.join(dev, "core")):
        os.symlink("/proc/kcore", os.path.join(dev, "core"))


def mask_paths(rootfs: str, masked: list[str], readonly: list[str]) -> None:
    for path in masked:
        target = secure_join(rootfs, path)
        if not os.path.exists(target):
            continue
        try:
            if os.path.isdir(target):
                lsys.mount("tmpfs", target, "tmpfs", lsys.MS_RDONLY, None)
            else:
                lsys.mount("/dev/null", target, None, lsys.MS_BIND)
        except OSError as exc:
            raise RootfsError(f"mask {path}: {exc.strerror}") from exc
    for path in readonly:
        target = secure_join(rootfs, path)
        if not os.path.exists(target):
            continue
        try:
            lsys.mount(target, target, None, lsys.MS_BIND | lsys.MS_REC)
        except OSError as exc:
            raise RootfsError(f"read-only {path}: {exc.strerror}") from exc
        _remount(target, lsys.MS_RDONLY | lsys.MS_NOSUID | lsys.MS_NODEV | lsys.MS_NOEXEC, f"read-only {path}")


def setup(plan: dict[str, Any], lowers: list[str], upper: str, work: str, merged: str,
          in_userns: bool, gid_mapped: Any, workspaces: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
    """Build the jail's root at ``merged``: everything up to (not including) pivot_root."""
    # Nothing we mount may propagate back to the host (and vice versa, unless asked).
    lsys.mount(None, "/", None, lsys.MS_REC | lsys.MS_PRIVATE)
    mount_overlay(lowers, upper, work, merged, in_userns)
    for ws in workspaces:
        # A workspace: the host directory as the lower (read-only to the jail), the container's
        # own upper dir for what the agent writes (gvmrt.workspace reads it for diff and commit).
        target = secure_join(merged, ws["destination"])
        os.makedirs(target, exist_ok=True)
        mount_overlay([ws["source"]], ws["upper"], ws["work"], target, in_userns)
    for m in plan["mounts"]:
        _mount_one(merged, m, gid_mapped)
    setup_dev(merged)
    # sysctls go in before readonlyPaths turns /proc/sys read-only (runc's order, too).
    for key, value in plan["sysctl"].items():
        try:
            with open(secure_join(merged, "/proc/sys/" + key.replace(".", "/")), "w") as f:
                f.write(value)
        except OSError as exc:
            raise RootfsError(f"linux.sysctl {key}={value}: {exc.strerror} (only sysctls of the jail's own "
                              "namespaces can be set)") from exc
    mask_paths(merged, plan["masked"], plan["readonly"])
    if plan["rootfs_propagation"] != lsys.MS_PRIVATE | lsys.MS_REC:
        lsys.mount(None, "/", None, plan["rootfs_propagation"])


def pivot(merged: str, readonly: bool) -> None:
    """pivot_root into ``merged`` and detach the old root (pivot_root(2), "pivot_root(".", ".")")."""
    os.chdir(merged)
    try:
        lsys.pivot_root(".", ".")
    except OSError as exc:
        raise RootfsError(f"pivot_root to {merged}: {exc.strerror}") from exc
    lsys.umount2(".", lsys.MNT_DETACH)
    os.chdir("/")
    if readonly:
        _remount("/", lsys.MS_RDONLY, "read-only root")



# Where distributions keep the system trust bundle; the CA is appended to each that exists.
TRUST_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem",
                 "/etc/ssl/ca-bundle.pem")
MAX_BUNDLE = 16 << 20


def install_ca(lowers: list[str], upper: str, pem: bytes, ca_path: str) -> None:
    """Put the sidecar's CA into the jail's trust, by writing the overlay's upper dir before it is
    mounted: ``ca_path`` (what SSL_CERT_FILE and friends name) and, for each distribution trust
    bundle the rootfs has, a copy with the CA appended (a copy-up done by hand).

    Done from the upper side because the jail's root may not be allowed to write the rootfs's
    /etc (a bundle unpacked by another user shows as nobody's in the jail); the upper dir is the
    jail root's own and, at create, empty. Paths are resolved inside the lower rootfs, so its
    symlinks cannot aim a write outside the upper dir; the bundle's rootfs is never written.
    """
    top = lowers[0]
    _write_upper(top, upper, secure_join(top, ca_path), pem)
    for bundle in TRUST_BUNDLES:
        # With base layers, the bundle comes from the topmost lower that has it (the union's view;
        # a symlink in one layer to a file in another is not followed across layers).
        for lower in lowers:
            path = secure_join(lower, bundle)
            data = _read_in_root(lower, path)
            if data is not None:
                _write_upper(lower, upper, path, data + (b"" if data.endswith(b"\n") or not data else b"\n") + pem)
                break


def _read_in_root(root: str, resolved: str) -> bytes | None:
    """A regular file's bytes at `resolved` (from secure_join), opened component by component with
    O_NOFOLLOW from `root`: a rootfs that is swapped under us (a symlink put in place between the
    check and the open) fails the open instead of leading it to a host file. None if not there."""
    parts = [p for p in os.path.relpath(resolved, root).split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    try:
        dfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BUNDLE:
            return None
        chunks, left = [], MAX_BUNDLE
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_upper(lower: str, upper: str, resolved: str, data: bytes) -> None:
    rel = os.path.relpath(resolved, lower).split("/")
    cur_l, cur_u = lower, upper
    for comp in rel[:-1]:
        cur_l, cur_u = os.path.join(cur_l, comp), os.path.join(cur_u, comp)
        try:
            mode = os.stat(cur_l).st_mode & 0o7777 if os.path.isdir(cur_l) else 0o755
        except OSError:
            mode = 0o755
        try:
            os.mkdir(cur_u, mode)
            os.chmod(cur_u, mode)  # not the umask's
        except FileExistsError:
            pass
    target = os.path.join(cur_u, rel[-1])
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
