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


def _same_content(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _gone_parents(p: str, rel: str, ups: set[str], lower: str) -> list[str]:
    """The directories between `rel` and `p` that the upper lacks: a deletion below one of them is
    reported as the deletion of the directory alone."""
    parts = p.split("/")
    base = rel.count("/") + 1
    return ["/".join(parts[:i]) for i in range(base + 1, len(parts)) if "/".join(parts[:i]) not in ups]


def _kind(st: os.stat_result) -> str:
    return "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"


def _all_below(root: str, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under root/rel (rel itself excluded), as (relative path, lstat)."""
    base = os.path.join(root, rel)
    for d, dirs, files in os.walk(base):
        for name in sorted(dirs + files):
            full = os.path.join(d, name)
            st = os.lstat(full)
            yield os.path.relpath(full, root), st
        dirs.sort()


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

    def opaque_dir(rel: str) -> None:
        ups = {p for p, _st in _all_below(upper, rel)}
        for p, st in _all_below(lower, rel):
            if p not in ups and not any(p.startswith(q + "/") for q in _gone_parents(p, rel, ups, lower)):
                out.append(Change(p, "deleted", _kind(st), st.st_size if stat.S_ISREG(st.st_mode) else 0))
        # What the new directory holds, compared with the lower's like any other upper content;
        # an opaque directory has no whiteouts of its own, so its listing is complete.
        visit(rel)

    def visit(rel: str) -> None:
        try:
            names = sorted(os.listdir(os.path.join(upper, rel)))
        except OSError:
            return
        for name in names:
            p = f"{rel}/{name}" if rel else name
            u = os.path.join(upper, p)
            ust = os.lstat(u)
            lst = _lstat(os.path.join(lower, p))
            if _is_whiteout(ust):
                if lst is not None:
                    out.append(Change(p, "deleted", _kind(lst), lst.st_size if stat.S_ISREG(lst.st_mode) else 0))
                    if stat.S_ISDIR(lst.st_mode):
                        deleted_tree(p)
                continue
            umode = stat.S_IMODE(ust.st_mode)
            if stat.S_ISDIR(ust.st_mode):
                if lst is not None and stat.S_ISDIR(lst.st_mode):
                    if stat.S_IMODE(lst.st_mode) != umode:
                        out.append(Change(p, "modified", "dir", 0, umode, "mode"))
                    if _opaque(u):
                        # The agent removed the directory and made it again: what the lower has
                        # and the new one lacks is deleted; the rest compares as usual.
                        opaque_dir(p)
                    else:
                        visit(p)
                    continue
                if lst is not None:
                    # A directory where the lower has a file or a symlink.
                    out.append(Change(p, "deleted", _kind(lst), lst.st_size if stat.S_ISREG(lst.st_mode) else 0,
                                      detail="replaced"))
                out.append(Change(p, "added", "dir", 0, umode))
                added_tree(p)
                continue
            utype = _kind(ust)
            size = ust.st_size if utype == "file" else 0
            if lst is None:
                out.append(Change(p, "added", utype, size, umode if utype == "file" else None))
                continue
            if _kind(lst) != utype:
                out.append(Change(p, "deleted", _kind(lst), detail="replaced"))
                if stat.S_ISDIR(lst.st_mode):
                    deleted_tree(p)
                out.append(Change(p, "added", utype, size, umode if utype == "file" else None))
                continue
            if utype == "symlink":
                if os.readlink(u) != os.readlink(os.path.join(lower, p)):
                    out.append(Change(p, "modified", "symlink", 0, None, "target"))
                continue
            content = ust.st_size != lst.st_size or not _same_content(u, os.path.join(lower, p), ust.st_size)
            if content:
                out.append(Change(p, "modified", "file", size, umode, "content"))
            elif umode != stat.S_IMODE(lst.st_mode):
                out.append(Change(p, "modified", "file", size, umode, "mode"))

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

    def lines(path: str, st: os.stat_result | None) -> list[str] | None:
        if st is None:
            return []
        if not stat.S_ISREG(st.st_mode):
            return None
        with open(path, "rb") as f:
            data = f.read(16 << 20)
        if b"\0" in data[:8192]:
            return None
        return data.decode("utf-8", "replace").splitlines(keepends=True)
    la, lb = lines(a, ast), lines(b, bst)
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
    if target.startswith("/"):
        return True
    norm = os.path.normpath(os.path.join(os.path.dirname(rel), target))
    return norm == ".." or norm.startswith("../")


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
    if why is not None:
        raise Conflict(f"conflict: {why}; leave it, or take the host's version and discard the agent's")
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
        src = os.path.join(upper, rel)
        if change.type == "dir":
            try:
                os.mkdir(name, change.mode or 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            os.chmod(name, change.mode or 0o755, dir_fd=parent, follow_symlinks=False)
            return None
        if change.type == "symlink":
            target = os.readlink(src)
            if _link_escapes(rel, target):
                raise CommitError(f"{rel}: a symlink to {target!r}, outside the workspace: not committed")
            os.symlink(target, tmp, dir_fd=parent)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            return None
        if change.detail == "mode" and change.kind == "modified":
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            try:
                os.fchmod(fd, change.mode or 0o644)
            finally:
                os.close(fd)
            return None
        h = sha256()
        sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                raise CommitError(f"{rel}: not a regular file in the upper dir any more")
            while chunk := os.read(sfd, CHUNK):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dfd, view):]
            os.fchmod(dfd, change.mode if change.mode is not None else 0o644)
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


def file_sha256(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    h = sha256()
    try:
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()
