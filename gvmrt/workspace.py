"""What the agent wrote in a workspace, and applying it to the host (issue 7; spec/filesystem.md).

A workspace is a host directory the jail sees through OverlayFS: lowerdir = the host directory
(never written by the container), upperdir = the container's own. So the agent's changes are
exactly the upper dir, read the way overlayfs reads it:

- a regular file or symlink in the upper dir: added (not in the lower) or modified (content, link
  target or mode differs from the lower's; a copy-up that changed nothing is no change);
- a character device 0/0: a whiteout, the lower's path deleted;
- a directory with the opaque xattr (``user.overlay.opaque`` in a user namespace, else
  ``trusted.overlay.opaque``) = "y": it replaces the lower's directory: everything below it in the
  lower is deleted, its own contents are added;
- a directory where the lower has a non-directory (or nothing): added, with its contents.

Committing copies a change into the host directory: each file written to a temporary name in its
directory and renamed over the target (atomic per file), every directory component opened with
O_NOFOLLOW (a symlink in the host tree is never followed, nor one in the upper dir), a symlink
whose target leaves the workspace refused, and a host path that changed since the container
started (against the baseline recorded at create) refused as a conflict, named. Deletions apply
only when asked.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Iterator

from gvmrt.errors import GvmrtError

__all__ = ["Change", "changes", "classify", "unified_diff", "commit", "baseline", "Conflict", "CommitError"]

OPAQUE = ("user.overlay.opaque", "trusted.overlay.opaque")
CHUNK = 1 << 20


class CommitError(GvmrtError):
    pass


class Conflict(CommitError):
    pass


@dataclass
class Change:
    path: str                 # relative to the workspace root, "/"-separated
    kind: str                 # added, modified, deleted
    type: str                 # file, symlink, dir
    size: int = 0
    mode: int | None = None
    detail: str = ""          # "content", "mode", "target", "type"

    def value(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.kind, "type": self.type, "size": self.size,
                **({"mode": f"{self.mode:04o}"} if self.mode is not None else {}),
                **({"detail": self.detail} if self.detail else {})}


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    for name in OPAQUE:
        try:
            if os.getxattr(path, name, follow_symlinks=False) in (b"y", b"Y"):
                return True
        except OSError:
            continue
    return False


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def open_in(root: str, rel: str) -> int:
    """A read-only fd of the regular file root/rel, every component opened O_NOFOLLOW (an agent
    that swaps a directory of its upper dir for a symlink while we read gets an error, not a host
    file) and the last O_NONBLOCK (a fifo does not hang us); OSError if it is not a regular file."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = rel.split("/")
        for comp in parts[:-1]:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise OSError(f"{rel}: not a regular file")
    return ffd


def _read_all(fd: int) -> Iterator[bytes]:
    try:
        while chunk := os.read(fd, CHUNK):
            yield chunk
    finally:
        os.close(fd)


def _same_content(lower: str, upper: str, rel: str) -> bool:
    try:
        a, b = _read_all(open_in(lower, rel)), _read_all(open_in(upper, rel))
    except OSError:
        return False
    try:
        x = y = b""
        while True:
            if not x:
                x = next(a, b"")
            if not y:
                y = next(b, b"")
            if not x or not y:
                return not x and not y
            n = min(len(x), len(y))
            if x[:n] != y[:n]:
                return False
            x, y = x[n:], y[n:]
    finally:
        a.close()
        b.close()


def _gone_parents(p: str, rel: str, ups: set[str], lower: str) -> list[str]:
    """The directories between `rel` and `p` that the upper lacks: a deletion below one of them is
    reported as the deletion of the directory alone."""
    parts = p.split("/")
    base = rel.count("/") + 1
    return ["/".join(parts[:i]) for i in range(base + 1, len(parts)) if "/".join(parts[:i]) not in ups]


def _kind(st: os.stat_result) -> str:
    """dir, symlink, file (regular) or special (a fifo, socket or device node: never opened)."""
    return ("dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode)
            else "file" if stat.S_ISREG(st.st_mode) else "special")


def _all_below(root: str, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under root/rel (rel itself excluded), as (relative path, lstat), depth first in
    name order; iterative (an agent can nest directories deeper than Python's recursion limit)."""
    stack = [rel]
    while stack:
        d = stack.pop()
        try:
            names = sorted(os.listdir(os.path.join(root, d) if d else root), reverse=True)
        except OSError:
            continue
        below = []
        for name in names:
            p = f"{d}/{name}" if d else name
            try:
                st = os.lstat(os.path.join(root, p))
            except OSError:
                continue
            below.append((p, st))
        for p, st in reversed(below):
            yield p, st
        stack.extend(p for p, st in below if stat.S_ISDIR(st.st_mode))


def changes(lower: str, upper: str) -> list[Change]:
    """The agent's changes to `lower`, read from `upper` (a live upper dir reads as of now)."""
    out: list[Change] = []

    def added_tree(rel: str) -> None:
        for p, st in _all_below(upper, rel):
            if not _is_whiteout(st):
                out.append(Change(p, "added", _kind(st), st.st_size if stat.S_ISREG(st.st_mode) else 0,
                                  stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else None))

    def deleted_tree(rel: str) -> None:
        for p, st in _all_below(lower, rel):
            out.append(Change(p, "deleted", _kind(st), st.st_size if stat.S_ISREG(st.st_mode) else 0))

    def visit(start: str) -> None:
        todo = [start]
        while todo:
            rel = todo.pop(0)
            try:
                names = sorted(os.listdir(os.path.join(upper, rel) if rel else upper))
            except OSError:
                continue
            subdirs = []
            for name in names:
                p = f"{rel}/{name}" if rel else name
                if one(p):
                    subdirs.append(p)
            todo[0:0] = subdirs

    def one(p: str) -> bool:
        """Record the change at p; True if p is a directory to descend into as usual."""
        u = os.path.join(upper, p)
        try:
            ust = os.lstat(u)
        except OSError:
            return False
        lst = _lstat(os.path.join(lower, p))
        if _is_whiteout(ust):
            if lst is not None:
                out.append(Change(p, "deleted", _kind(lst), lst.st_size if stat.S_ISREG(lst.st_mode) else 0))
                if stat.S_ISDIR(lst.st_mode):
                    deleted_tree(p)
            return False
        umode = stat.S_IMODE(ust.st_mode)
        if stat.S_ISDIR(ust.st_mode):
            if lst is not None and stat.S_ISDIR(lst.st_mode):
                if stat.S_IMODE(lst.st_mode) != umode:
                    out.append(Change(p, "modified", "dir", 0, umode, "mode"))
                if _opaque(u):
                    # The agent removed the directory and made it again: what the lower has
                    # and the new one lacks is deleted; the rest compares as usual.
                    ups = {q for q, _st in _all_below(upper, p)}
                    for q, st in _all_below(lower, p):
                        if q not in ups and not any(q.startswith(g + "/") for g in _gone_parents(q, p, ups, lower)):
                            out.append(Change(q, "deleted", _kind(st), st.st_size if stat.S_ISREG(st.st_mode) else 0))
                return True
            if lst is not None:
                # A directory where the lower has a file or a symlink.
                out.append(Change(p, "deleted", _kind(lst), lst.st_size if stat.S_ISREG(lst.st_mode) else 0,
                                  detail="replaced"))
            out.append(Change(p, "added", "dir", 0, umode))
            added_tree(p)
            return False
        utype = _kind(ust)
        size = ust.st_size if utype == "file" else 0
        if lst is None:
            out.append(Change(p, "added", utype, size, umode if utype == "file" else None))
            return False
        if _kind(lst) != utype or utype == "special":
            out.append(Change(p, "deleted", _kind(lst), detail="replaced"))
            if stat.S_ISDIR(lst.st_mode):
                deleted_tree(p)
            out.append(Change(p, "added", utype, size, umode if utype == "file" else None))
            return False
        if utype == "symlink":
            if os.readlink(u) != os.readlink(os.path.join(lower, p)):
                out.append(Change(p, "modified", "symlink", 0, None, "target"))
            return False
        if ust.st_size != lst.st_size or not _same_content(lower, upper, p):
            out.append(Change(p, "modified", "file", size, umode, "content"))
        elif umode != stat.S_IMODE(lst.st_mode):
            out.append(Change(p, "modified", "file", size, umode, "mode"))
        return False

    visit("")
    return out


# --- filesystem policy -------------------------------------------------------------------------------

def _rx(glob: str) -> re.Pattern[str]:
    from gvmrt.policy.matcher import glob_to_regex
    return re.compile(glob_to_regex("/" + glob.lstrip("/")))


def classify(path: str, rules: list[dict[str, Any]], default: str = "review") -> tuple[str, str | None]:
    """(action, the glob that decided) for a changed path: the first rule whose glob matches."""
    for rule in rules:
        for glob in rule.get("paths") or ():
            if _rx(glob).fullmatch("/" + path):
                return rule["action"], glob
    return default, None


# --- diff ------------------------------------------------------------------------------------------------

def unified_diff(lower: str, upper: str, rel: str, label: str) -> str:
    """A unified diff of one path (a text file, or a note for binary files and other types)."""
    a, b = os.path.join(lower, rel), os.path.join(upper, rel)
    ast, bst = _lstat(a), _lstat(b)
    if bst is not None and _is_whiteout(bst):
        bst = None

    def lines(root: str, st: os.stat_result | None) -> list[str] | None:
        if st is None:
            return []
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fd = open_in(root, rel)         # never through a symlink the agent swapped in
        except OSError:
            return None
        try:
            data = os.read(fd, 16 << 20)
        finally:
            os.close(fd)
        if b"\0" in data[:8192]:
            return None
        return data.decode("utf-8", "replace").splitlines(keepends=True)
    la, lb = lines(lower, ast), lines(upper, bst)
    if la is None or lb is None:
        return f"Binary or special files {label}/{rel} differ\n"
    text = "".join(difflib.unified_diff(la, lb, f"a/{label}/{rel}" if ast else "/dev/null",
                                        f"b/{label}/{rel}" if bst else "/dev/null"))
    return text


# --- baseline and commit ------------------------------------------------------------------------------

def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode]


def baseline(root: str) -> dict[str, list[int]]:
    """The host directory's state when the container starts: path -> [size, mtime_ns, ino, mode]."""
    out: dict[str, list[int]] = {}
    for p, st in _all_below(root, ""):
        out[p] = _stamp(st)
    return out


def save_baseline(path: str, data: dict[str, list[int]]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def load_baseline(path: str) -> dict[str, list[int]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _open_dir(root_fd: int, parts: list[str], create: bool) -> int:
    """An fd of root/parts..., each component opened O_NOFOLLOW|O_DIRECTORY (created if asked)."""
    fd = os.dup(root_fd)
    try:
        for comp in parts:
            try:
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(comp, 0o755, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise CommitError(f"{'/'.join(parts)}: {comp!r} is not a directory in the workspace "
                                  f"(a symlink is never followed): {exc.strerror}") from None
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _conflict(root: str, rel: str, base: dict[str, list[int]], deleting: bool = False) -> str | None:
    st = _lstat(os.path.join(root, rel))
    was = base.get(rel)
    if deleting and st is None:
        return None                  # gone already (with its directory, or by the host's hand)
    if was is None and st is not None:
        return f"{rel} was created on the host since the container started"
    if was is not None and st is None:
        return f"{rel} was deleted on the host since the container started"
    if was is not None and st is not None and _stamp(st)[:3] != was[:3] and not stat.S_ISDIR(st.st_mode):
        return f"{rel} was changed on the host since the container started"
    return None


def _link_escapes(rel: str, target: str) -> bool:
    """A symlink is committed only if its target is relative and never climbs ('..'): judging a
    climbing target would mean resolving links the agent also made (a -> d/up/.. with d/up -> ..)."""
    return target.startswith("/") or ".." in target.split("/")


def _mask(mode: int | None, default: int) -> int:
    """The agent's mode bits, within the user's umask and never setuid, setgid or sticky."""
    um = os.umask(0)
    os.umask(um)
    return (default if mode is None else mode) & 0o777 & ~um


def _dir_unchanged(root: str, rel: str, base: dict[str, list[int]]) -> str | None:
    """For a directory deletion: a path below it the host made or changed since the baseline."""
    for p, st in _all_below(root, rel):
        was = base.get(p)
        if was is None:
            return f"{p} was created on the host since the container started"
        if not stat.S_ISDIR(st.st_mode) and _stamp(st)[:3] != was[:3]:
            return f"{p} was changed on the host since the container started"
    return None


def commit(root: str, upper: str, change: Change, base: dict[str, list[int]], allow_delete: bool) -> str | None:
    """Apply one change to the host directory `root`; the SHA-256 of what was written (None for a
    deletion, a directory or a symlink). Raises Conflict or CommitError, naming the path."""
    digest = _apply(root, upper, change, base, allow_delete)
    st = _lstat(os.path.join(root, change.path))
    if st is None:
        base.pop(change.path, None)
    else:
        base[change.path] = _stamp(st)       # what the host has now is what later checks compare to
    return digest


def _apply(root: str, upper: str, change: Change, base: dict[str, list[int]], allow_delete: bool) -> str | None:
    rel = change.path
    if change.kind == "deleted" and not allow_delete:
        raise CommitError(f"{rel}: a deletion; pass --delete to apply deletions")
    why = _conflict(root, rel, base, deleting=change.kind == "deleted")
    if why is None and change.kind == "deleted" and change.type == "dir":
        why = _dir_unchanged(root, rel, base)
    if why is not None:
        raise Conflict(f"conflict: {why}; leave it, or take the host's version and discard the agent's")
    if change.type == "special":
        raise CommitError(f"{rel}: a fifo, socket or device node: not committed")
    here = _lstat(os.path.join(root, rel))
    if change.kind == "added" and here is not None and not (change.type == "dir" and stat.S_ISDIR(here.st_mode)):
        raise CommitError(f"{rel}: the host still has a {_kind(here)} there; commit its deletion first (--delete)")
    parts = rel.split("/")
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = _open_dir(root_fd, parts[:-1], create=change.kind != "deleted")
    finally:
        os.close(root_fd)
    name = parts[-1]
    tmp = f".gvmrt-commit-{os.getpid()}-{name}"[:255]
    try:
        if change.kind == "deleted":
            if _lstat(os.path.join(root, rel)) is not None:
                _remove_at(parent, name)
            for p in [p for p in base if p.startswith(rel + "/")]:
                del base[p]
            return None
        if change.type == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            _chmod_at(parent, name, _mask(change.mode, 0o755), os.O_DIRECTORY)
            return None
        if change.type == "symlink":
            ufd = _open_dir_of(upper, rel)
            try:
                target = os.readlink(rel.split("/")[-1], dir_fd=ufd)
            finally:
                os.close(ufd)
            if _link_escapes(rel, target):
                raise CommitError(f"{rel}: a symlink to {target!r}, outside the workspace: not committed")
            os.symlink(target, tmp, dir_fd=parent)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            return None
        if change.detail == "mode" and change.kind == "modified":
            _chmod_at(parent, name, _mask(change.mode, 0o644), os.O_NONBLOCK)
            return None
        h = sha256()
        try:
            sfd = open_in(upper, rel)
        except OSError as exc:
            raise CommitError(f"{rel}: not a regular file in the upper dir any more ({exc})") from None
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            while chunk := os.read(sfd, CHUNK):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dfd, view):]
            os.fchmod(dfd, _mask(change.mode, 0o644))
            os.fsync(dfd)
        except BaseException:
            os.close(dfd)
            os.unlink(tmp, dir_fd=parent)
            raise
        finally:
            os.close(sfd)
        os.close(dfd)
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        return h.hexdigest()
    finally:
        os.close(parent)


def _chmod_at(parent: int, name: str, mode: int, flags: int) -> None:
    """chmod parent/name through an fd opened O_NOFOLLOW (a symlink there is refused, not followed)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=parent)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _open_dir_of(root: str, rel: str) -> int:
    """The fd of rel's directory under root, each component O_NOFOLLOW."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _open_dir(fd, rel.split("/")[:-1], create=False)
    finally:
        os.close(fd)


def _remove_at(parent: int, name: str) -> None:
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        for child in os.listdir(fd):
            _remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def file_sha256(root: str, rel: str) -> str | None:
    """SHA-256 of a regular file in the upper dir (never through a link, never a fifo); None otherwise."""
    try:
        fd = open_in(root, rel)
    except OSError:
        return None
    h = sha256()
    for chunk in _read_all(fd):
        h.update(chunk)
    return h.hexdigest()
