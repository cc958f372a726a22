"""One-file bundles: `gvmrt pack`, `unpack` and `inspect` (issue 6; the format is spec/pack.md).

A ``.gvmb`` file is a POSIX tar (pax) compressed with zstd. Its first member is a manifest that
lists every other member (path, type, mode, size, SHA-256), optionally followed by an Ed25519
signature over the manifest; then the members, in the manifest's order: the bundle directory as
``bundle/...`` and each base layer it names as ``layers/sha256/<hex>/...``.

Packing reads each file once: the members go through a multi-threaded zstd frame into a temporary
file while their hashes are taken; the manifest then goes into a first frame of its own, and the
payload frame is copied after it (zstd frames concatenate to one stream). Everything that could
differ between two packs of the same tree is fixed: entry order, times (0), owners (0, no names),
no extended attributes, deterministic compression (zstd's output does not depend on its number
of threads).

Unpacking checks the manifest whole (signature, every path, link target, type, mode and the
totals against limits) before writing anything, then writes into a temporary directory beside
the destination, each file hashed as it is written and compared, and renames it into place only
when every member matched. New base layers go to the layer store the same way; layers already
there are skipped.
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Callable

from gvmrt.errors import GvmrtError, UsageError
from gvmrt.layers import CHUNK, Store, remove, tree_digest, walk

__all__ = ["pack", "unpack", "inspect", "PackError", "Limits", "FORMAT"]

FORMAT = "gvmb-1"
MANIFEST = ".gvmb/manifest.json"
SIGNATURE = ".gvmb/signature.json"
SIG_DOMAIN = b"gvmrt-pack-manifest-v1\n"
# zstd level 1 by default: on the benchmark's bundle its output is still smaller than that of
# `tar --zstd` (level 3, single-threaded frames): 97 MB against 99 MB; --level 3 gives 86 MB.
LEVEL = 1
ZSTD_THREADS = -1        # one per core; the output does not depend on it
MAX_MANIFEST = 64 << 20          # ~400,000 entries; objects are counted before the JSON is parsed
_LAYER = re.compile(r"layers/sha256/([0-9a-f]{64})")
SKIP = {".git"}          # a bundle kept in git: its history is not part of it


class PackError(GvmrtError):
    """A .gvmb file that is refused: the reason names the member and the check."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 16 << 30           # expanded size of all files
    max_entries: int = 1_000_000


Progress = Callable[[int], None]


# --- pack ----------------------------------------------------------------------------------------

_TYPE = {"dir": b"5", "file": b"0", "symlink": b"2"}


def _header(name: str, kind: str, mode: int, size: int = 0, target: str = "") -> bytes:
    """The tar header of a member: plain ustar when the names fit (built here: tarfile's own
    builder costs ~30 µs a member, a tenth of packing a small file), pax otherwise."""
    fast = _ustar(name, kind, mode, size, target)
    return fast if fast is not None else _pax_header(name, kind, mode, size, target)


def _ustar(name: str, kind: str, mode: int, size: int, target: str) -> bytes | None:
    if not (name.isascii() and target.isascii()) or len(target) > 100 or size >= 8 << 30:
        return None
    nb = name.encode() + (b"/" if kind == "dir" else b"")
    prefix = b""
    if len(nb) > 100:
        cut = nb.rfind(b"/", 0, 156)
        while cut > 0 and len(nb) - cut - 1 > 100:
            cut = -1
        if cut <= 0 or len(nb) - cut - 1 > 100 or len(nb) - cut - 1 == 0:
            return None
        prefix, nb = nb[:cut], nb[cut + 1:]
    h = bytearray(512)
    h[0:len(nb)] = nb
    h[100:108] = b"%07o\0" % mode
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % (size if kind == "file" else 0)
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "
    h[156:157] = _TYPE[kind]
    t = target.encode()
    h[157:157 + len(t)] = t
    h[257:265] = b"ustar\x0000"
    h[329:337] = h[337:345] = b"0000000\0"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax_header(name: str, kind: str, mode: int, size: int = 0, target: str = "") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE}[kind]
    ti.mode, ti.size, ti.linkname = mode, size if kind == "file" else 0, target
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int) -> bytes:
    return b"\0" * (-n % tarfile.BLOCKSIZE)


def _summary(plan: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """What `inspect` shows of the config without unpacking (covered by the signature). From the
    plan (gvmrt.plan: validated, and cached, so packing a bundle again costs no validation)."""
    gvm = plan.get("gvm")
    egress = gvm.get("egress") if gvm is not None else None
    return {
        "config_sha256": sha256(raw).hexdigest(),
        "root": plan["root"],
        "args": list(plan["process"]["args"]),
        "governed": gvm is not None,
        "policy": None if egress is None else {
            "mode": egress.get("mode", "enforce"), "rules": len(egress.get("rules") or ()),
            "default": egress.get("default"),
            "decisions": sorted({r["decision"]["action"] for r in egress.get("rules") or ()})},
        "credentials": [c["name"] for c in (gvm.get("credentials") or [])] if gvm is not None else [],
        "layers": list(plan.get("root_layers") or []),
    }


def pack(bundle: str, out: str, sign: Any = None, store: Store | None = None,
         progress: Progress | None = None, notes: list[str] | None = None, level: int = LEVEL) -> dict[str, Any]:
    """Pack the bundle directory into `out`; a summary. `sign` is a gvmrt.audit.keys.Signer."""
    import zstandard

    from gvmrt.plan import load_plan
    from gvmrt.runtime import read_config
    bundle = os.path.abspath(bundle)
    raw, cfg_path = read_config(bundle)
    plan = load_plan(raw, cfg_path)
    root = os.path.normpath(os.path.join(bundle, plan["root"]))
    if not (root + "/").startswith(bundle + "/") or root == bundle:
        raise UsageError(f"{cfg_path}: /root/path: {plan['root']} is outside the bundle; a packed bundle carries "
                         "its root filesystem (or its own layer) inside its directory")
    summary = _summary(plan, raw)
    notes = [] if notes is None else notes
    entries = [e for e in walk(bundle, "bundle/", hashes=False, notes=notes)
               if e.path.split("/")[1] not in SKIP]
    store = store or Store()
    layer_roots: dict[str, str] = {}
    for i, digest in enumerate(summary["layers"]):
        if not store.has(digest):
            raise UsageError(f"{cfg_path}: /root/layers/{i}: layer {digest} is not in the local store "
                             "(`gvmrt layer add DIR`, or unpack a bundle that carries it)")
        hexd = digest[7:]
        layer_roots[hexd] = store.path(digest)
        entries += walk(store.path(digest), f"layers/sha256/{hexd}/", hashes=False, notes=notes)
    out = os.path.abspath(out)
    if (out + "/").startswith(bundle + "/"):
        raise UsageError(f"-o {out}: inside the bundle it packs; write it elsewhere")
    payload = f"{out}.payload-{os.getpid()}"
    final_tmp = f"{out}.tmp-{os.getpid()}"
    if not 1 <= level <= 19:
        raise UsageError(f"--level {level}: 1 (fast, the default) to 19 (small)")
    cctx = zstandard.ZstdCompressor(level=level, threads=ZSTD_THREADS, write_content_size=False, write_checksum=True)
    total = 0
    try:
        with open(payload, "wb") as raw_file, cctx.stream_writer(raw_out := _Hashing(raw_file), closefd=False) as zw:
            # One thread reads and hashes, in order, while zstd's own threads compress. (Reading
            # ahead in more threads was slower: the files are in the page cache, and the copies
            # and the GIL, not the opens, are the cost.)
            w = _Batched(zw)               # zstd's writer costs ~50 µs a call: feed it megabytes
            for e in entries:
                if e.kind != "file":
                    w.write(_header(e.path, e.kind, e.mode, 0, e.target or ""))
                    continue
                assert e.src is not None
                size, digest = _add_file(e, w, progress)
                e.size, e.sha256 = size, digest
                total += size
            w.write(b"\0" * (2 * tarfile.BLOCKSIZE))      # end of archive
            w.flush()
        values = [e.value() for e in entries]
        # The store's layers are named by their content: a changed one would unpack to another digest.
        for hexd in layer_roots:
            mine = _relative(values, f"layers/sha256/{hexd}/")
            got = tree_digest(mine)
            if got != f"sha256:{hexd}":
                raise PackError(f"layer sha256:{hexd} in the store no longer matches its digest ({got}: "
                                f"{store.difference(f'sha256:{hexd}', mine)}); remove it and add it again")
        # The compressed payload's own hash too: the signature then covers every byte of the file
        # (tar fields gvmrt ignores, padding, zstd frame bits), not only what unpacking uses.
        manifest = {"format": FORMAT, "bundle": summary, "entries": values,
                    "totals": {"entries": len(values), "files": sum(1 for v in values if v["type"] == "file"),
                               "bytes": total},
                    "payload": {"sha256": raw_out.hash.hexdigest(), "size": raw_out.size}}
        mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        signer = None
        sbytes = None
        if sign is not None:
            sig = {"key": sign.key, "pubkey": base64.b64encode(sign.public_raw).decode(),
                   "sig": base64.b64encode(sign.sign(SIG_DOMAIN + mbytes)).decode()}
            sbytes = json.dumps(sig, sort_keys=True, separators=(",", ":")).encode()
            signer = sign.key
        with open(final_tmp, "wb") as f:
            f.write(head_frame(mbytes, sbytes))
            with open(payload, "rb") as p:
                _copy(p, f)
        os.replace(final_tmp, out)
    except BaseException:
        for tmp in (final_tmp,):
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    finally:
        try:
            os.unlink(payload)
        except FileNotFoundError:
            pass
    return {"file": out, "size": os.path.getsize(out), "entries": len(values), "bytes": total,
            "layers": summary["layers"], "signed_by": signer, "notes": notes}


class _Hashing:
    """A file that hashes what is written to it."""

    def __init__(self, f: Any) -> None:
        self.f, self.hash, self.size = f, sha256(), 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def head_frame(mbytes: bytes, sbytes: bytes | None) -> bytes:
    """The file's first zstd frame for a manifest (and signature): a pure function of them, so an
    unpacker rebuilds it and compares, byte for byte."""
    import zstandard
    head = _header(MANIFEST, "file", 0o644, len(mbytes)) + mbytes + _pad(len(mbytes))
    if sbytes is not None:
        head += _header(SIGNATURE, "file", 0o644, len(sbytes)) + sbytes + _pad(len(sbytes))
    return zstandard.ZstdCompressor(level=3, threads=-1, write_checksum=True).compress(head)


class _Batched:
    """Collects small writes into large ones."""

    def __init__(self, out: Any, size: int = 4 << 20) -> None:
        self.out, self.size, self.buf = out, size, bytearray()

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.out.write(self.buf)
            self.buf = bytearray()


def _add_file(e: Any, w: _Batched, progress: Progress | None) -> tuple[int, str]:
    """Header, content and padding of one file into `w`; (size, sha256)."""
    h = sha256()
    fd = os.open(e.src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        w.write(_header(e.path, "file", e.mode, size))
        done = 0
        while done < size and (chunk := os.read(fd, min(CHUNK, size - done))):
            h.update(chunk)
            w.write(chunk)
            done += len(chunk)
            if progress:
                progress(len(chunk))
    finally:
        os.close(fd)
    if done != size:
        raise PackError(f"{e.src}: changed size while being packed; pack again")
    w.write(_pad(size))
    return size, h.hexdigest()


def _copy(src: Any, dst: Any) -> None:
    n = os.fstat(src.fileno()).st_size
    dst.flush()
    done = 0
    while done < n:
        sent = os.copy_file_range(src.fileno(), dst.fileno(), n - done)
        if sent == 0:
            break
        done += sent
    if done < n:
        src.seek(done)
        while chunk := src.read(CHUNK):
            dst.write(chunk)


def _relative(values: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [{**v, "path": v["path"][len(prefix):]} for v in values if v["path"].startswith(prefix)]


# --- reading -------------------------------------------------------------------------------------

MAX_EXT_HEADER = 1 << 20


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header whole into memory, whatever size it claims: a
    32 kB file could make it allocate gigabytes. gvmrt writes none over a few hundred bytes."""

    def _proc_pax(self, tarfile_: Any) -> Any:
        if self.size > MAX_EXT_HEADER:
            raise tarfile.HeaderError(f"a pax header of {self.size} bytes (at most {MAX_EXT_HEADER})")
        return super()._proc_pax(tarfile_)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile_: Any) -> Any:
        if self.size > MAX_EXT_HEADER:
            raise tarfile.HeaderError(f"a GNU long name of {self.size} bytes (at most {MAX_EXT_HEADER})")
        return super()._proc_gnulong(tarfile_)  # type: ignore[misc]

    def _proc_sparse(self, tarfile_: Any) -> Any:
        raise tarfile.HeaderError("a sparse member (gvmrt writes none)")


def _open_tar(path: str) -> tuple[Any, Any, Any]:
    import zstandard
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, read_size=1 << 20)
    try:
        # tarfile reads in small pieces; zstd's reader costs ~30 µs a call whatever the size.
        tf = tarfile.open(fileobj=io.BufferedReader(reader, 4 << 20), mode="r|", encoding="utf-8",  # type: ignore[arg-type]
                          errors="surrogateescape", tarinfo=_BoundedTarInfo)
    except (tarfile.TarError, zstandard.ZstdError, OSError) as exc:
        reader.close()
        f.close()
        raise PackError(f"{path}: not a gvmrt bundle file (.gvmb: zstd-compressed tar): {exc}") from None
    return f, reader, tf


def _member_bytes(tf: Any, ti: Any, limit: int, what: str) -> bytes:
    if not ti.isreg() or ti.size > limit:
        raise PackError(f"{what}: not a regular member of at most {limit} bytes")
    src = tf.extractfile(ti)
    data = src.read()
    if len(data) != ti.size:
        raise PackError(f"{what}: cut short")
    return data


def read_head(tf: Any, path: str, limits: Limits = Limits()) -> tuple[dict[str, Any], bytes, dict[str, Any] | None, Any]:
    """(manifest, its bytes, signature or None, the first payload member or None). The
    signature's bytes are in the returned signature under "_bytes"."""
    import zstandard
    try:
        ti = tf.next()
        if ti is None or ti.name != MANIFEST:
            raise PackError(f"{path}: the first member is not {MANIFEST}: not a gvmrt bundle file")
        mbytes = _member_bytes(tf, ti, MAX_MANIFEST, MANIFEST)
        if mbytes.count(b"{") > 2 * limits.max_entries + 16:
            raise PackError(f"{path}: the manifest has more objects than --max-entries allows ({limits.max_entries})")
        ti = tf.next()
        sig = None
        if ti is not None and ti.name == SIGNATURE:
            sbytes = _member_bytes(tf, ti, 1 << 16, SIGNATURE)
            sig = json.loads(sbytes)
            if isinstance(sig, dict):
                sig["_bytes"] = sbytes
            ti = tf.next()
    except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError) as exc:
        raise PackError(f"{path}: damaged ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise PackError(f"{path}: {SIGNATURE}: not JSON ({str(exc)[:200]})") from None
    try:
        manifest = json.loads(mbytes)
    except (ValueError, RecursionError) as exc:
        raise PackError(f"{path}: {MANIFEST}: not JSON ({str(exc)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{path}: {MANIFEST}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"this gvmrt reads {FORMAT!r}")
    if sig is not None and not isinstance(sig, dict):
        raise PackError(f"{path}: {SIGNATURE}: not an object")
    return manifest, mbytes, sig, ti


def check_signature(path: str, mbytes: bytes, sig: dict[str, Any] | None, pubkey: tuple[bytes, str] | None) -> str:
    """How the manifest is signed (a line for the user); PackError when it must be refused."""
    from gvmrt.audit.chain import key_id
    from gvmrt.audit.keys import verify_signature
    if sig is None:
        if pubkey is not None:
            raise PackError(f"{path}: unsigned, but --pubkey asks for a signature by key {pubkey[1]}")
        return "unsigned"
    try:
        pub = base64.b64decode(sig.get("pubkey") or "", validate=True)
        raw_sig = base64.b64decode(sig.get("sig") or "", validate=True)
    except ValueError:
        raise PackError(f"{path}: {SIGNATURE}: damaged (not base64)") from None
    if pubkey is not None:
        if key_id(pub) != pubkey[1] or sig.get("key") != pubkey[1]:
            raise PackError(f"{path}: signed by key {sig.get('key')}, not by the --pubkey key {pubkey[1]}")
        pub = pubkey[0]
    elif key_id(pub) != sig.get("key"):
        raise PackError(f"{path}: {SIGNATURE}: its public key is not key {sig.get('key')}")
    if not verify_signature(pub, raw_sig, SIG_DOMAIN + mbytes):
        raise PackError(f"{path}: the signature does not match the manifest (the file was altered, or signed "
                        f"by another key than {sig.get('key')})")
    return (f"signed by key {sig.get('key')}" + ("" if pubkey is not None
                                                  else " (not pinned: pass --pubkey to require that key)"))


def inspect(path: str, pubkey: tuple[bytes, str] | None = None) -> dict[str, Any]:
    """What is inside, from the manifest alone (its signature checked)."""
    f, reader, tf = _open_tar(path)
    try:
        manifest, mbytes, sig, _ = read_head(tf, path)
    finally:
        tf.close()
        reader.close()
        f.close()
    signer = check_signature(path, mbytes, sig, pubkey)
    entries = manifest.get("entries") or []
    layers: dict[str, dict[str, int]] = {}
    for e in entries:
        m = _LAYER.match(e.get("path", ""))
        if m:
            lay = layers.setdefault(f"sha256:{m.group(1)}", {"files": 0, "bytes": 0})
            if e.get("type") == "file":
                lay["files"] += 1
                lay["bytes"] += e.get("size", 0)
    return {"file": path, "size": os.path.getsize(path), "signature": signer,
            "signed_by": (sig or {}).get("key"), "bundle": manifest.get("bundle"),
            "totals": manifest.get("totals"), "layers": layers}


# --- unpack --------------------------------------------------------------------------------------

@dataclass
class _Plan:
    entries: list[dict[str, Any]]
    layers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # hex -> its entries


def _check_manifest(path: str, manifest: dict[str, Any], limits: Limits) -> _Plan:
    """Every member the manifest announces, checked before anything is written."""
    entries = manifest.get("entries")
    if not isinstance(entries, list):
        raise PackError(f"{path}: {MANIFEST}: no entry list")
    if len(entries) > limits.max_entries:
        raise PackError(f"{path}: {len(entries)} entries, more than the limit of {limits.max_entries} "
                        "(--max-entries)")
    bundle = manifest.get("bundle") or {}
    root = posixpath.normpath("bundle/" + str(bundle.get("root") if isinstance(bundle, dict) else ""))
    seen: dict[str, str] = {}
    links: dict[str, tuple[str, str]] = {}
    total = 0
    plan = _Plan(entries)
    if not isinstance(bundle, dict) or not isinstance(bundle.get("root"), str):
        raise PackError(f"{path}: {MANIFEST}: no bundle summary")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise PackError(f"{path}: {MANIFEST}: entry {i} is not an object")
        p, kind, mode = e.get("path"), e.get("type"), e.get("mode")
        where = f"{path}: member {p!r}"
        if not isinstance(p, str) or not p or p.startswith("/") or "\0" in p:
            raise PackError(f"{where}: an absolute or empty path")
        parts = p.split("/")
        if any(c in ("", ".", "..") for c in parts):
            raise PackError(f"{where}: '..', '.' or an empty component in the path")
        m = _LAYER.match(p)
        if parts[0] == "bundle" and len(parts) > 1:
            tree = "bundle"
        elif m and len(parts) > 3:
            tree = f"layers/sha256/{m.group(1)}"
            plan.layers.setdefault(m.group(1), []).append(e)
        else:
            raise PackError(f"{where}: outside bundle/ and layers/sha256/<digest>/")
        if p in seen:
            raise PackError(f"{where}: appears twice")
        parent = posixpath.dirname(p)
        if parent != tree and seen.get(parent) != "dir":
            raise PackError(f"{where}: its directory {parent!r} is " +
                            ("a symlink: a member may not be written through a link" if seen.get(parent) == "symlink"
                             else "not an earlier member"))
        if kind not in ("dir", "file", "symlink"):
            raise PackError(f"{where}: type {kind!r}: only directories, regular files and symlinks (no device "
                            "nodes, fifos or hard links)")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o7777:
            raise PackError(f"{where}: bad mode {mode!r}")
        if mode & 0o6000 and kind != "symlink":
            raise PackError(f"{where}: setuid/setgid bits (mode {mode:o}); a bundle carries none")
        if kind == "file":
            size, digest = e.get("size"), e.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise PackError(f"{where}: bad size {size!r}")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise PackError(f"{where}: bad sha256 {digest!r}")
            total += size
            if total > limits.max_bytes:
                raise PackError(f"{path}: expands to more than the limit of {limits.max_bytes} bytes (--max-bytes); "
                                "refused as a possible decompression bomb")
        elif kind == "symlink":
            target = e.get("target")
            if not isinstance(target, str) or not target or "\0" in target:
                raise PackError(f"{where}: bad symlink target {target!r}")
            links[p] = (target, tree)
        seen[p] = kind
    # Symlinks last, when all are known: a target is resolved through the archive's own links.
    for p, (target, tree) in links.items():
        _check_link(f"{path}: member {p!r}", p, target, tree, root, {q: t for q, (t, _tr) in links.items()})
    if seen.get(root) != "dir":
        raise PackError(f"{path}: the root filesystem {root!r} (bundle.root) is not a directory member")
    cfg = next((e for e in entries if e.get("path") == "bundle/config.json"), None)
    if cfg is None or cfg.get("type") != "file" or cfg.get("sha256") != bundle.get("config_sha256"):
        raise PackError(f"{path}: the manifest's config summary is not of its bundle/config.json member")
    return plan


def _check_link(where: str, p: str, target: str, tree: str, rootfs: str, links: dict[str, str]) -> None:
    """A symlink may point anywhere inside its own tree, read as the container will: in a root
    filesystem or a layer an absolute target is relative to that tree's root; elsewhere in the
    bundle an absolute target is refused. The target is resolved component by component through
    the archive's own symlinks (`a -> d/up/..` with `d/up -> ../..` climbs out). Never followed
    while unpacking either way."""
    base = rootfs if (p + "/").startswith(rootfs + "/") and tree == "bundle" else tree
    if target.startswith("/") and base == "bundle":
        raise PackError(f"{where}: symlink to the absolute path {target!r} outside a root filesystem")
    if _resolve(posixpath.dirname(p), target, base, links, 0) is None:
        raise PackError(f"{where}: symlink to {target!r} leads out of {base}/")


def _resolve(cur: str, target: str, base: str, links: dict[str, str], depth: int) -> str | None:
    """Where `target` (of a link in directory `cur`) leads inside the tree `base`; None if out."""
    if depth > 40:
        return None
    if target.startswith("/"):
        cur = base
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if cur == base or not cur.startswith(base + "/"):
                return None
            cur = posixpath.dirname(cur)
            continue
        nxt = f"{cur}/{comp}"
        if nxt in links:
            got = _resolve(cur, links[nxt], base, links, depth + 1)
            if got is None:
                return None
            cur = got
        else:
            cur = nxt
    return cur


def unpack(archive: str, dest: str, pubkey: tuple[bytes, str] | None = None, store: Store | None = None,
           limits: Limits = Limits(), progress: Progress | None = None) -> dict[str, Any]:
    """Verify and unpack `archive` into the new directory `dest`; a summary."""
    import zstandard
    dest = os.path.abspath(dest)
    if os.path.islink(dest) or (os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest))):
        raise UsageError(f"{dest} exists and is not an empty directory; unpack into a new one")
    store = store or Store()
    f, reader, tf = _open_tar(archive)
    tmp = ""                                   # made by mkdtemp below: a name nobody can plant first
    layer_tmp: dict[str, str] = {}
    written = 0
    writers: _Writers | None = None
    try:
        manifest, mbytes, sig, ti = read_head(tf, archive, limits)
        signer = check_signature(archive, mbytes, sig, pubkey)
        plan = _check_manifest(archive, manifest, limits)
        # Which layers to write: only those the store lacks (their members are read past).
        fresh = {h for h in plan.layers if not store.has(f"sha256:{h}")}
        import tempfile
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.gvmb-", dir=os.path.dirname(dest))
        os.mkdir(os.path.join(tmp, "bundle"), 0o700)
        for h in fresh:
            layer_tmp[h] = store.temp(f"sha256:{h}")
        dirs: list[tuple[str, int]] = []
        writers = _Writers()
        # Every directory first, all of one depth at a time in parallel (a mkdir is as slow as a
        # file here): the manifest is checked, so we know them all, and members only fill them.
        for batch in _dirs_by_depth(plan.entries):
            for e in batch:
                target = _target(e["path"], tmp, layer_tmp, fresh)
                if target is not None:
                    writers.submit(0, os.mkdir, target, 0o700)
                    dirs.append((target, e["mode"]))
            writers.drain()
        for i, e in enumerate(plan.entries):
            where = f"{archive}: member {e['path']!r}"
            if ti is None:
                raise PackError(f"{where}: missing (the file ends before it)")
            name = ti.name.rstrip("/")
            if name != e["path"]:
                raise PackError(f"{archive}: member {name!r} where the manifest has {e['path']!r} (entry {i})")
            kind = "dir" if ti.isdir() else "file" if ti.isreg() else "symlink" if ti.issym() else None
            if kind != e["type"]:
                raise PackError(f"{where}: a {_tar_kind(ti)} where the manifest has a {e['type']}")
            if kind != "symlink" and ti.mode != e["mode"]:
                raise PackError(f"{where}: mode {ti.mode:o} where the manifest has {e['mode']:o}")
            target = _target(e["path"], tmp, layer_tmp, fresh)
            if target is None or kind == "dir":    # a layer already in the store; a directory made
                ti = _next(tf, archive)
                continue
            if kind == "symlink":
                if ti.linkname != e["target"]:
                    raise PackError(f"{where}: links to {ti.linkname!r} where the manifest has {e['target']!r}")
                writers.submit(0, os.symlink, e["target"], target)
            else:
                if ti.size != e["size"]:
                    raise PackError(f"{where}: {ti.size} bytes where the manifest has {e['size']}")
                if ti.size <= SMALL:
                    data = tf.extractfile(ti).read()
                    writers.submit(len(data), _write_small, target, data, e, where)
                    written += len(data)
                    if progress:
                        progress(len(data))
                else:
                    written += _write_member(tf, ti, target, e, where, progress)
            ti = _next(tf, archive)
        writers.finish()
        if ti is not None:
            raise PackError(f"{archive}: member {ti.name!r} is not in the manifest")
        # Last, every byte of the file: the first frame rebuilt from the manifest, the rest hashed.
        _check_payload(archive, f, _check_head(archive, f, mbytes, sig), manifest)
        _check_config_root(archive, os.path.join(tmp, "bundle", "config.json"), manifest)
        for h, lt in layer_tmp.items():
            got = tree_digest(_relative(plan.layers[h], f"layers/sha256/{h}/"))
            if got != f"sha256:{h}":
                raise PackError(f"{archive}: layer sha256:{h}: its members make {got}, not its name")
        for d, mode in reversed(dirs):
            os.chmod(d, mode)
        added = []
        for h, lt in list(layer_tmp.items()):
            if store.commit(f"sha256:{h}", lt, _relative(plan.layers[h], f"layers/sha256/{h}/")):
                added.append(f"sha256:{h}")
            del layer_tmp[h]
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(os.path.join(tmp, "bundle"), dest)
        os.rmdir(tmp)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        raise PackError(f"{archive}: damaged ({exc})") from None
    except OSError as exc:
        if exc.filename is None and not exc.strerror:
            raise
        raise PackError(f"{archive}: cannot write {exc.filename or 'a member'}: {exc.strerror}") from None
    finally:
        if writers is not None:
            writers.abandon()
        tf.close()
        reader.close()
        f.close()
        if tmp and os.path.lexists(tmp):
            remove(tmp)
        for lt in layer_tmp.values():
            remove(lt)
    return {"dest": dest, "signature": signer, "entries": len(plan.entries), "bytes": written,
            "layers_added": added, "layers_present": sorted(f"sha256:{h}" for h in plan.layers
                                                            if f"sha256:{h}" not in added)}


def _check_config_root(archive: str, config: str, manifest: dict[str, Any]) -> None:
    """The root filesystem the manifest's checks were made for is the one config.json names."""
    try:
        with open(config, "rb") as f:
            root = json.load(f)["root"]["path"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise PackError(f"{archive}: bundle/config.json has no root.path") from None
    if not isinstance(root, str) or posixpath.normpath(root) != posixpath.normpath(manifest["bundle"]["root"]):
        raise PackError(f"{archive}: config.json's root.path {root!r} is not the manifest's {manifest['bundle']['root']!r}")


def _check_head(archive: str, f: Any, mbytes: bytes, sig: dict[str, Any] | None) -> int:
    """The first frame must be exactly the one gvmrt writes for this manifest; its length."""
    want = head_frame(mbytes, sig.get("_bytes") if sig else None)
    if os.pread(f.fileno(), len(want), 0) != want:
        raise PackError(f"{archive}: its first frame is not the one gvmrt writes for its manifest (the file "
                        "was altered there)")
    return len(want)


def _check_payload(archive: str, f: Any, head_len: int, manifest: dict[str, Any]) -> None:
    """Every byte after the first frame, against the payload hash the (signed) manifest holds."""
    want = manifest.get("payload") or {}
    h = sha256()
    size = 0
    offset = head_len
    while chunk := os.pread(f.fileno(), CHUNK * 4, offset):
        h.update(chunk)
        size += len(chunk)
        offset += len(chunk)
    if want.get("sha256") != h.hexdigest() or want.get("size") != size:
        raise PackError(f"{archive}: the compressed payload does not match the manifest's payload sha256 (the "
                        "file was altered, or cut short)")


def _next(tf: Any, archive: str) -> Any:
    try:
        return tf.next()
    except tarfile.ReadError as exc:
        raise PackError(f"{archive}: damaged after the last good member ({exc})") from None


def _tar_kind(ti: Any) -> str:
    return ("hard link" if ti.islnk() else "device node" if ti.isdev() else "fifo" if ti.isfifo()
            else "directory" if ti.isdir() else "symlink" if ti.issym() else "regular file" if ti.isreg()
            else f"member of type {ti.type!r}")


SMALL = 8 << 20


def _target(path: str, tmp: str, layer_tmp: dict[str, str], fresh: set[str]) -> str | None:
    """Where a member goes: under the temporary bundle dir, or a new layer's; None: skipped."""
    m = _LAYER.match(path)
    if m is None:
        return os.path.join(tmp, path)
    if m.group(1) not in fresh:
        return None
    return os.path.join(layer_tmp[m.group(1)], path[len(m.group(0)) + 1:])


def _dirs_by_depth(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    levels: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        if e["type"] == "dir":
            levels.setdefault(e["path"].count("/"), []).append(e)
    return [levels[k] for k in sorted(levels)]


class _Writers:
    """Files written by a few threads while the main one decompresses and checks the next
    members: creating a file costs far more than copying its bytes on a virtual disk, and those
    syscalls overlap (3x faster on this machine's, for small files). In-flight bytes are bounded;
    the first failure is raised by the next submit, or by finish()."""

    THREADS = 4
    MAX_BYTES = 64 << 20

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(self.THREADS)
        self.pending: list[tuple[Any, int]] = []
        self.bytes = 0

    def submit(self, size: int, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append((self.pool.submit(fn, *args), size))
        self.bytes += size
        while self.bytes > self.MAX_BYTES or len(self.pending) > 4096:
            fut, n = self.pending.pop(0)
            fut.result()
            self.bytes -= n

    def drain(self) -> None:
        """Wait for everything submitted so far."""
        for fut, _n in self.pending:
            fut.result()
        self.pending, self.bytes = [], 0

    def finish(self) -> None:
        for fut, _n in self.pending:
            fut.result()
        self.pending = []
        self.pool.shutdown()

    def abandon(self) -> None:
        """On failure: let what runs end (before its directory is removed), ignore results."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_small(target: str, data: bytes, e: dict[str, Any], where: str) -> None:
    if len(data) != e["size"] or sha256(data).hexdigest() != e["sha256"]:
        raise PackError(f"{where}: its content does not match the manifest's sha256 (the file was altered)")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, e["mode"])
    finally:
        os.close(fd)


def _write_member(tf: Any, ti: Any, target: str, e: dict[str, Any], where: str, progress: Progress | None) -> int:
    src = tf.extractfile(ti)
    h = sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    n = 0
    try:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            n += len(chunk)
            if progress:
                progress(len(chunk))
        os.fchmod(fd, e["mode"])
    finally:
        os.close(fd)
    if n != e["size"] or h.hexdigest() != e["sha256"]:
        raise PackError(f"{where}: its content does not match the manifest's sha256 (the file was altered)")
    return n
