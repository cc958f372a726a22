"""Trees of files as values: walking a directory into entries, a tree's digest, and the local
content-addressed layer store (issue 6; spec/pack.md).

- An *entry* is one path of a tree: a directory, a regular file (size, SHA-256) or a symlink
  (target). Ownership and times are not part of it: a tree means the same for every teammate
  (files are owned by whoever unpacks them; the jail maps that user to its root).
- A tree's *digest* is ``sha256:`` + SHA-256 over the canonical JSON of its entries in path
  order: computed from a walk (`gvmrt layer add`) or from a pack's manifest (`gvmrt unpack`, which
  checks every file against it as it writes), so a layer is named by its content either way.
- The store keeps each layer once, read-only, under ``<data root>/layers/sha256/<hex>/`` with its
  entry list beside it (``<hex>.json``); a bundle names its base layers in ``gvm.layers``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Callable, Iterable

from gvmrt.errors import GvmrtError, UsageError

__all__ = ["Entry", "walk", "tree_digest", "Store", "DIGEST", "LayerError"]

DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
CHUNK = 1 << 20


class LayerError(GvmrtError):
    pass


@dataclass
class Entry:
    path: str                  # relative, "/"-separated, no "." or ".." components
    kind: str                  # "dir", "file", "symlink"
    mode: int                  # permission bits (0o1777 at most: no setuid/setgid)
    size: int = 0
    sha256: str | None = None  # files: hex digest of the content
    target: str | None = None  # symlinks
    src: str | None = None     # where it is on disk (not part of the value)

    def value(self) -> dict[str, Any]:
        v: dict[str, Any] = {"path": self.path, "type": self.kind, "mode": self.mode}
        if self.kind == "file":
            v["size"], v["sha256"] = self.size, self.sha256
        elif self.kind == "symlink":
            v["target"] = self.target
        return v


def hash_file(path: str, on_bytes: Callable[[int], None] | None = None) -> str:
    h = sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    finally:
        os.close(fd)
    return h.hexdigest()


def walk(root: str, prefix: str = "", *, hashes: bool = True, notes: list[str] | None = None,
         on_bytes: Callable[[int], None] | None = None) -> list[Entry]:
    """Every path under `root` (not `root` itself) as entries in byte order of their paths, each
    named `prefix` + its relative path. Device nodes, fifos and sockets are refused (a bundle has
    no use for them and an unpacker must not make them); setuid/setgid bits are dropped and said
    in `notes`; hard links become separate files."""
    out: list[Entry] = []

    def visit(directory: str, rel: str) -> None:
        try:
            names = sorted(os.listdir(directory), key=os.fsencode)
        except OSError as exc:
            raise LayerError(f"{directory}: {exc.strerror}") from None
        for name in names:
            src = os.path.join(directory, name)
            path = f"{rel}{name}"
            st = os.lstat(src)
            mode = stat.S_IMODE(st.st_mode)
            if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
                if notes is not None:
                    notes.append(f"{prefix}{path}: setuid/setgid bits dropped (a bundle carries none)")
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if stat.S_ISDIR(st.st_mode):
                out.append(Entry(prefix + path, "dir", mode, src=src))
                visit(src, path + "/")
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(prefix + path, "file", mode, st.st_size,
                                 hash_file(src, on_bytes) if hashes else None, src=src))
            elif stat.S_ISLNK(st.st_mode):
                out.append(Entry(prefix + path, "symlink", 0o777, target=os.readlink(src), src=src))
            else:
                raise LayerError(f"{src}: a {_kind(st.st_mode)} cannot be packed or stored (only directories, "
                                 "regular files and symlinks); remove it")

    visit(root, "")
    return out


def _kind(mode: int) -> str:
    return ("device node" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "fifo" if stat.S_ISFIFO(mode)
            else "socket" if stat.S_ISSOCK(mode) else "special file")


def tree_digest(entries: Iterable[dict[str, Any]]) -> str:
    """``sha256:<hex>`` of a tree: its entry values (relative paths), canonical JSON, in order."""
    text = json.dumps(list(entries), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + sha256(b"gvmrt-tree-v1\n" + text.encode()).hexdigest()


def parse_digest(text: str, where: str = "") -> str:
    """The hex of a ``sha256:<64 hex>`` digest (a bare 64-hex or a unique prefix is for the CLI)."""
    m = DIGEST.fullmatch(text)
    if not m:
        raise UsageError(f"{where}{text!r} is not a layer digest (sha256: and 64 hex digits)")
    return m.group(1)


def store_root() -> str:
    from gvmrt.statedir import data_root
    return os.path.join(data_root(), "layers")


class Store:
    """The local layer store. Layers are written once (temp dir, then rename) and never changed."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or store_root()
        self.dir = os.path.join(self.root, "sha256")

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, parse_digest(digest))

    def has(self, digest: str) -> bool:
        return os.path.isfile(os.path.join(self.dir, parse_digest(digest) + ".json"))

    def ensure(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def temp(self, digest: str) -> str:
        self.ensure()
        path = os.path.join(self.dir, f".tmp-{parse_digest(digest)[:16]}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(path, 0o700)
        return path

    def commit(self, digest: str, tmp: str, entries: list[dict[str, Any]]) -> bool:
        """Move a verified tree into place; False if the layer was there already (tmp removed)."""
        hexd = parse_digest(digest)
        final = os.path.join(self.dir, hexd)
        if os.path.lexists(final) and not self.has(digest):
            remove(final)                     # left by a commit that died before its metadata
        try:
            os.rename(tmp, final)
        except OSError:
            remove(tmp)
            if self.has(digest):
                return False
            raise
        meta = {"digest": digest, "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "size": sum(e.get("size", 0) for e in entries), "entries": entries}
        tmp_meta = final + ".json.tmp"
        with open(tmp_meta, "w") as f:
            json.dump(meta, f, sort_keys=True, separators=(",", ":"))
        os.replace(tmp_meta, final + ".json")
        return True

    def add_dir(self, src: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, bool, list[str]]:
        """Store the tree at `src`; (digest, newly added?, notes)."""
        if not os.path.isdir(src):
            raise UsageError(f"{src}: not a directory")
        notes: list[str] = []
        entries = walk(src, notes=notes, on_bytes=on_bytes)
        values = [e.value() for e in entries]
        digest = tree_digest(values)
        if self.has(digest):
            return digest, False, notes
        tmp = self.temp(digest)
        try:
            copy_tree(entries, tmp)
        except BaseException:
            remove(tmp)
            raise
        return digest, self.commit(digest, tmp, values), notes

    def add_tar(self, src: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, bool, list[str]]:
        """Store the tree of a tar archive (plain, .gz, .bz2, .xz or .zst): extracted into a
        temporary directory with the same care as `gvmrt unpack` (no absolute or '..' paths, never
        through a symlink, no device nodes or fifos: those are skipped with a note), then stored by
        the digest of what it became."""
        notes: list[str] = []
        self.ensure()
        tmp = os.path.join(self.dir, f".tmp-tar-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(tmp, 0o700)
        try:
            _extract_tar(src, tmp, notes, on_bytes)
            entries = walk(tmp, notes=notes)
            values = [e.value() for e in entries]
            digest = tree_digest(values)
            if self.has(digest):
                return digest, False, notes
            for e in reversed(entries):      # the tree as walked: modes normalised like add_dir
                if e.kind != "symlink":
                    os.chmod(os.path.join(tmp, e.path), e.mode)
            added = self.commit(digest, tmp, values)
            return digest, added, notes
        finally:
            if os.path.lexists(tmp):
                remove(tmp)

    def difference(self, digest: str, entries: list[dict[str, Any]]) -> str:
        """The first difference between a layer's recorded entries and `entries` (for a message)."""
        try:
            with open(os.path.join(self.dir, parse_digest(digest) + ".json")) as f:
                recorded = {e["path"]: e for e in json.load(f).get("entries", ())}
        except (OSError, ValueError, KeyError):
            return "its entry list cannot be read"
        now = {e["path"]: e for e in entries}
        for path in sorted(set(recorded) | set(now)):
            if recorded.get(path) != now.get(path):
                return f"{path}: recorded {recorded.get(path)}, now {now.get(path)}"
        return "same entries, different order"

    def list(self) -> list[dict[str, Any]]:
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".json") and len(name) == 69:
                try:
                    with open(os.path.join(self.dir, name)) as f:
                        meta = json.load(f)
                except (OSError, ValueError):
                    continue
                out.append({"digest": meta.get("digest"), "size": meta.get("size", 0),
                            "files": sum(1 for e in meta.get("entries", ()) if e.get("type") == "file"),
                            "added": meta.get("added")})
        return out

    def remove(self, digest: str) -> None:
        hexd = parse_digest(digest)
        if not self.has(digest):
            raise UsageError(f"layer {digest} is not in the store ({self.dir})")
        os.unlink(os.path.join(self.dir, hexd + ".json"))      # first: a half-removed layer is absent
        remove(os.path.join(self.dir, hexd))

    def resolve(self, text: str) -> str:
        """A full digest from what a user typed: sha256:<hex>, <hex>, or a unique hex prefix."""
        t = text[len("sha256:"):] if text.startswith("sha256:") else text
        if not re.fullmatch(r"[0-9a-f]{4,64}", t):
            raise UsageError(f"{text!r} is not a layer digest or a prefix of one (hex digits)")
        hits = [m["digest"] for m in self.list() if m["digest"] and m["digest"][7:].startswith(t)]
        if len(hits) != 1:
            raise UsageError(f"{text!r} matches {'no' if not hits else len(hits)} layers in the store")
        return hits[0]


def _open_tar(src: str) -> tuple[Any, Any]:
    import tarfile
    try:
        f = open(src, "rb")
    except OSError as exc:
        raise UsageError(f"{src}: {exc.strerror}") from None
    head = f.read(4)
    f.seek(0)
    if head == b"\x28\xb5\x2f\xfd":                 # zstd's magic
        import io

        import zstandard
        stream: Any = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
        mode = "r|"
    else:
        stream, mode = f, "r|*"
    try:
        return tarfile.open(fileobj=stream, mode=mode), f
    except tarfile.TarError as exc:
        f.close()
        raise UsageError(f"{src}: not a tar archive ({exc})") from None


def _extract_tar(src: str, dest: str, notes: list[str], on_bytes: Callable[[int], None] | None) -> None:
    import tarfile
    tf, raw = _open_tar(src)
    made: dict[str, str] = {"": "dir"}        # relative path -> kind, of what we created
    try:
        for ti in tf:
            name = ti.name
            while name.startswith("./"):
                name = name[2:]
            name = name.rstrip("/")
            if name in ("", "."):
                continue
            parts = name.split("/")
            if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise LayerError(f"{src}: member {ti.name!r}: an absolute path or '..' in it")
            if ti.isdev() or ti.isfifo() or not (ti.isdir() or ti.isreg() or ti.issym() or ti.islnk()):
                notes.append(f"{name}: a {'device node' if ti.isdev() else 'fifo' if ti.isfifo() else 'special member'}"
                             " not stored (the runtime makes /dev)")
                continue
            # Parents: made implicitly if the archive omits them, never through a symlink.
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                kind = made.get(parent)
                if kind is None:
                    os.mkdir(os.path.join(dest, parent), 0o755)
                    made[parent] = "dir"
                elif kind != "dir":
                    raise LayerError(f"{src}: member {ti.name!r} lies under {parent!r}, which is not a directory")
            target = os.path.join(dest, name)
            mode = ti.mode & 0o7777
            if mode & 0o6000 and not ti.issym():
                notes.append(f"{name}: setuid/setgid bits dropped (a layer carries none)")
                mode &= 0o1777
            if name in made and not (ti.isdir() and made[name] == "dir"):
                raise LayerError(f"{src}: member {ti.name!r} appears twice")
            if ti.isdir():
                if name not in made:
                    os.mkdir(target, 0o700)
                os.chmod(target, mode | 0o700)      # fillable now; walk() records the real mode
                made[name] = "dir"
            elif ti.issym():
                os.symlink(ti.linkname, target)
                made[name] = "symlink"
            elif ti.islnk():
                # A hard link becomes a copy of the earlier regular file it names.
                link = ti.linkname
                while link.startswith("./"):
                    link = link[2:]
                if made.get(link) != "file":
                    raise LayerError(f"{src}: member {ti.name!r}: hard link to {ti.linkname!r}, not an earlier file")
                shutil.copyfile(os.path.join(dest, link), target, follow_symlinks=False)
                made[name] = "file"
            else:
                data = tf.extractfile(ti)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    while chunk := data.read(CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
                        if on_bytes:
                            on_bytes(len(chunk))
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                made[name] = "file"
    except tarfile.TarError as exc:
        raise LayerError(f"{src}: damaged tar archive ({exc})") from None
    finally:
        tf.close()
        raw.close()


def copy_tree(entries: list[Entry], dest: str) -> None:
    """Recreate walked entries under `dest` (files copied, modes set, no owners or times)."""
    for e in entries:
        target = os.path.join(dest, e.path)
        if e.kind == "dir":
            os.mkdir(target, 0o700)
        elif e.kind == "file":
            assert e.src is not None
            shutil.copyfile(e.src, target, follow_symlinks=False)
        else:
            assert e.target is not None
            os.symlink(e.target, target)
    for e in reversed(entries):            # modes last: a read-only directory is filled first
        if e.kind != "symlink":
            os.chmod(os.path.join(dest, e.path), e.mode)


def remove(path: str) -> None:
    """Remove a tree we made (making read-only directories writable on the way). A symlink in
    its place is removed itself, never followed."""
    if os.path.islink(path):
        os.unlink(path)
        return
    def onerror(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    if os.path.lexists(path):
        for d, dirs, _files in os.walk(path):
            for name in dirs:
                full = os.path.join(d, name)
                if not os.path.islink(full):
                    try:
                        os.chmod(full, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, onerror=onerror)
