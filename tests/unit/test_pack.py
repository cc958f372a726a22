"""`.gvmb` files (issue 6): round trips, reproducibility, signatures, layer dedup, and a battery of
hostile archives, each refused with nothing written outside the temporary directory."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import zstandard

from gvmrt.audit.keys import generate, load_private, load_public
from gvmrt.layers import Store, tree_digest, walk
from gvmrt.pack import SIG_DOMAIN, Limits, PackError, inspect, pack, unpack

CONFIG = {"ociVersion": "1.0.2", "process": {"args": ["/bin/sh"], "cwd": "/"}, "root": {"path": "rootfs"},
          "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "user"}]}}


def make_bundle(d: Path, layers: list[str] | None = None) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    if layers:
        cfg["root"]["layers"] = layers
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    r = d / "rootfs"
    (r / "usr" / "bin").mkdir(parents=True)
    (r / "etc").mkdir()
    (r / "tmp").mkdir()
    (r / "tmp").chmod(0o1777)                         # a root filesystem's /tmp: kept exactly
    (r / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n" * 100)
    (r / "usr" / "bin" / "tool").chmod(0o755)
    (r / "etc" / "empty").write_bytes(b"")
    (r / "etc" / "ünïcode-näme.txt").write_text("ü")
    deep = r / ("long-directory-name-" * 4) / ("another-long-name-" * 4)
    deep.mkdir(parents=True)
    (deep / "file-with-a-long-name.txt").write_text("deep")
    (r / "bin").symlink_to("usr/bin")
    (r / "sh").symlink_to("/usr/bin/tool")           # absolute, inside the rootfs: fine
    (d / "agent.py").write_text("print('agent')\n")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return d


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    generate(str(tmp_path / "a.pem"))
    generate(str(tmp_path / "b.pem"))
    return {"a": str(tmp_path / "a.pem"), "a.pub": str(tmp_path / "a.pub.pem"), "b": str(tmp_path / "b.pem"),
            "b.pub": str(tmp_path / "b.pub.pem")}


def tree(root: Path) -> dict[str, Any]:
    out = {}
    for e in walk(str(root)):
        out[e.path] = (e.kind, e.mode, e.sha256, e.target)
    return out


def test_round_trip_keeps_every_path_mode_and_byte_but_not_git(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    (b / "rootfs" / "etc" / "suid").write_text("x")
    (b / "rootfs" / "etc" / "suid").chmod(0o4755)
    res = pack(str(b), str(tmp_path / "b.gvmb"), store=Store(str(tmp_path / "store")))
    assert any("setuid" in n for n in res["notes"])
    out = unpack(str(tmp_path / "b.gvmb"), str(tmp_path / "out"), store=Store(str(tmp_path / "store")))
    assert out["signature"] == "unsigned"
    want = tree(b)
    del want[".git"], want[".git/HEAD"]
    k, m, h, t = want["rootfs/etc/suid"]
    want["rootfs/etc/suid"] = (k, 0o755, h, t)         # the bit is dropped, and said
    assert tree(tmp_path / "out") == want
    assert os.readlink(tmp_path / "out" / "rootfs" / "sh") == "/usr/bin/tool"


def test_packing_twice_gives_the_same_bytes_also_after_touch(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    store = Store(str(tmp_path / "store"))
    pack(str(b), str(tmp_path / "1.gvmb"), store=store)
    for d, dirs, files in os.walk(b):
        for n in dirs + files:
            os.utime(os.path.join(d, n), (1e9, 1.5e9), follow_symlinks=False)
    pack(str(b), str(tmp_path / "2.gvmb"), store=store)
    assert (tmp_path / "1.gvmb").read_bytes() == (tmp_path / "2.gvmb").read_bytes()
    # GNU tar can read it: a plain zstd-compressed tar.
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO((tmp_path / "1.gvmb").read_bytes()),
                                                     read_across_frames=True).read()
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    assert names[:2] == [".gvmb/manifest.json", "bundle/agent.py"] and "bundle/.git" not in names


def test_signed_bundle_verifies_and_any_flipped_byte_is_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    b = make_bundle(tmp_path / "b")
    store = Store(str(tmp_path / "store"))
    pack(str(b), str(tmp_path / "s.gvmb"), sign=load_private(keys["a"]), store=store)
    info = inspect(str(tmp_path / "s.gvmb"), load_public(keys["a.pub"]))
    assert info["signed_by"] == load_private(keys["a"]).key and info["bundle"]["args"] == ["/bin/sh"]
    out = unpack(str(tmp_path / "s.gvmb"), str(tmp_path / "ok"), load_public(keys["a.pub"]), store=store)
    assert out["signature"].startswith("signed by key")
    data = (tmp_path / "s.gvmb").read_bytes()
    for pos in range(len(data)):       # every byte: the signature covers all of them
        bad = bytearray(data)
        bad[pos] ^= 0x40
        (tmp_path / "bad.gvmb").write_bytes(bytes(bad))
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(PackError):
            unpack(str(tmp_path / "bad.gvmb"), str(tmp_path / "bad"), load_public(keys["a.pub"]), store=store)
        assert sorted(os.listdir(tmp_path)) == before, f"byte {pos}: something was left behind"
    with pytest.raises(PackError, match="not by the --pubkey key"):
        unpack(str(tmp_path / "s.gvmb"), str(tmp_path / "x"), load_public(keys["b.pub"]), store=store)
    pack(str(b), str(tmp_path / "u.gvmb"), store=store)
    with pytest.raises(PackError, match="unsigned"):
        unpack(str(tmp_path / "u.gvmb"), str(tmp_path / "x"), load_public(keys["a.pub"]), store=store)
    assert not (tmp_path / "x").exists()


def test_layers_are_carried_and_not_unpacked_twice(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    base = make_bundle(tmp_path / "base") / "rootfs"
    digest, added, _ = store.add_dir(str(base))
    assert added and store.has(digest) and digest == tree_digest(e.value() for e in walk(str(base)))
    assert store.add_dir(str(base))[1] is False          # content-addressed: stored once
    b = tmp_path / "layered"
    b.mkdir()
    (b / "rootfs" / "agent").mkdir(parents=True)
    (b / "rootfs" / "agent" / "main.py").write_text("print(1)\n")
    cfg = json.loads(json.dumps(CONFIG))
    cfg["root"]["layers"] = [digest]
    (b / "config.json").write_text(json.dumps(cfg))
    res = pack(str(b), str(tmp_path / "l.gvmb"), store=store)
    assert res["layers"] == [digest]
    other = Store(str(tmp_path / "teammate"))
    first = unpack(str(tmp_path / "l.gvmb"), str(tmp_path / "u1"), store=other)
    assert first["layers_added"] == [digest] and tree(Path(other.path(digest))) == tree(base)
    # What unpack stored is named by its content, modes included (1777 /tmp under any umask).
    assert tree_digest(e.value() for e in walk(other.path(digest))) == digest
    second = unpack(str(tmp_path / "l.gvmb"), str(tmp_path / "u2"), store=other)
    assert second["layers_added"] == [] and second["layers_present"] == [digest]
    # Only the bundle's own small layer was written the second time.
    assert second["bytes"] == len("print(1)\n") + len((b / "config.json").read_bytes())


# --- hostile archives ------------------------------------------------------------------------------

def _ti(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, mode: int = 0o644, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.linkname = kind, size, mode, link
    return ti


def hostile(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], manifest_entries: list[dict[str, Any]] | None = None,
            sign: Any = None, config_sha: str | None = None) -> Path:
    """A .gvmb with exactly these members and a manifest consistent with them (as an attacker
    would make it), unless `manifest_entries` is given."""
    if manifest_entries is None:
        manifest_entries = []
        for ti, data in members:
            kind = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.REGTYPE: "file"}.get(ti.type, "other")
            e: dict[str, Any] = {"path": ti.name, "type": kind, "mode": ti.mode}
            if kind == "file":
                e.update(size=len(data), sha256=sha256(data).hexdigest())
            if kind == "symlink":
                e["target"] = ti.linkname
            manifest_entries.append(e)
    config = next((data for ti, data in members if ti.name == "bundle/config.json"), b"")
    manifest = {"format": "gvmb-1", "bundle": {"root": "rootfs", "layers": [],
                                               "config_sha256": config_sha or sha256(config).hexdigest()},
                "entries": manifest_entries, "totals": {}}
    mbytes = json.dumps(manifest, sort_keys=True).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_ti(".gvmb/manifest.json", size=len(mbytes)), io.BytesIO(mbytes))
        if sign is not None:
            sig = json.dumps({"key": sign.key, "pubkey": base64.b64encode(sign.public_raw).decode(),
                              "sig": base64.b64encode(sign.sign(SIG_DOMAIN + mbytes)).decode()}).encode()
            tf.addfile(_ti(".gvmb/signature.json", size=len(sig)), io.BytesIO(sig))
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


D = tarfile.DIRTYPE
BASE = [(_ti("bundle/rootfs", D, mode=0o755), b""), (_ti("bundle/config.json", size=2), b"{}")]


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    return _ti(name, size=len(data), mode=mode), data


HOSTILE: dict[str, tuple[list[Any], str]] = {
    "absolute path": ([_file("/tmp/gvmrt-evil", b"x")], "absolute"),
    "dot-dot": ([_file("bundle/../gvmrt-evil", b"x")], r"'\.\.'"),
    "outside bundle/": ([_file("elsewhere/x", b"x")], "outside bundle/"),
    "relative symlink out": ([(_ti("bundle/rootfs/up", tarfile.SYMTYPE, mode=0o777, link="../../../../etc"), b"")],
                             "leads out"),
    "absolute symlink outside a rootfs": ([(_ti("bundle/pw", tarfile.SYMTYPE, mode=0o777, link="/etc/passwd"), b"")],
                                          "absolute path"),
    "write through a symlink": ([(_ti("bundle/rootfs/lib", tarfile.SYMTYPE, mode=0o777, link="/tmp"), b""),
                                 _file("bundle/rootfs/lib/gvmrt-evil", b"x")], "a symlink"),
    "hard link": ([(_ti("bundle/rootfs/h", tarfile.LNKTYPE, link="bundle/config.json"), b"")], "type"),
    "device node": ([(_ti("bundle/rootfs/null", tarfile.CHRTYPE), b"")], "type"),
    "fifo": ([(_ti("bundle/rootfs/p", tarfile.FIFOTYPE), b"")], "type"),
    "setuid": ([_file("bundle/rootfs/su", b"x", 0o4755)], "setuid"),
    "setgid": ([_file("bundle/rootfs/sg", b"x", 0o2755)], "setuid/setgid"),
    "duplicate": ([_file("bundle/rootfs/a", b"1"), _file("bundle/rootfs/a", b"2")], "twice"),
    "parent missing": ([_file("bundle/nodir/x", b"1")], "not an earlier member"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_with_nothing_written(tmp_path: Path, case: str) -> None:
    members, reason = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = hostile(tmp_path / "h.gvmb", BASE + members)
    before = sorted(os.listdir(work))
    with pytest.raises(PackError, match=reason):
        unpack(str(archive), str(work / "out"), store=Store(str(tmp_path / "store")))
    assert sorted(os.listdir(work)) == before
    assert not os.path.lexists("/tmp/gvmrt-evil") and not (tmp_path / "gvmrt-evil").exists()
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store" / "sha256")


def test_members_that_contradict_their_manifest_are_refused(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    good = [*BASE, _file("bundle/rootfs/a", b"hello")]

    def entries(**change: Any) -> list[dict[str, Any]]:
        es = [{"path": "bundle/rootfs", "type": "dir", "mode": 0o755},
              {"path": "bundle/config.json", "type": "file", "mode": 0o644, "size": 2,
               "sha256": sha256(b"{}").hexdigest()},
              {"path": "bundle/rootfs/a", "type": "file", "mode": 0o644, "size": 5,
               "sha256": sha256(b"hello").hexdigest()}]
        es[-1].update(change)
        return es
    cases = {
        "does not match the manifest's sha256": hostile(tmp_path / "1.gvmb", good, entries(sha256="0" * 64)),
        "bytes where the manifest has": hostile(tmp_path / "2.gvmb", good, entries(size=3)),
        "is not in the manifest": hostile(tmp_path / "3.gvmb", good + [_file("bundle/rootfs/b", b"x")], entries()),
        "missing": hostile(tmp_path / "4.gvmb", BASE, entries()),
        "where the manifest has a file": hostile(
            tmp_path / "5.gvmb", [*BASE, (_ti("bundle/rootfs/a", tarfile.FIFOTYPE), b"")], entries()),
        "mode 600 where": hostile(tmp_path / "6.gvmb", [*BASE, _file("bundle/rootfs/a", b"hello", 0o600)], entries()),
    }
    for reason, archive in cases.items():
        with pytest.raises(PackError, match=reason):
            unpack(str(archive), str(tmp_path / "out"), store=store)
        assert not (tmp_path / "out").exists()
        assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []


def test_decompression_bombs_are_refused_by_the_manifest_and_by_the_stream(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    big = [*BASE, _file("bundle/rootfs/zeros", b"\0" * 200_000)]
    archive = hostile(tmp_path / "bomb.gvmb", big)
    assert archive.stat().st_size < 1000            # 200 kB of zeros compress to nothing
    with pytest.raises(PackError, match="decompression bomb"):
        unpack(str(archive), str(tmp_path / "out"), store=store, limits=Limits(max_bytes=100_000))
    many = [*BASE] + [_file(f"bundle/rootfs/f{i}", b"") for i in range(50)]
    with pytest.raises(PackError, match="more than the limit"):
        unpack(str(hostile(tmp_path / "many.gvmb", many)), str(tmp_path / "out"), store=store,
               limits=Limits(max_entries=20))
    # A manifest that understates a member's size is caught as the member is read.
    lying = [{"path": "bundle/rootfs", "type": "dir", "mode": 0o755},
             {"path": "bundle/config.json", "type": "file", "mode": 0o644, "size": 2, "sha256": sha256(b"{}").hexdigest()},
             {"path": "bundle/rootfs/zeros", "type": "file", "mode": 0o644, "size": 10, "sha256": "0" * 64}]
    with pytest.raises(PackError, match="200000 bytes where the manifest has 10"):
        unpack(str(hostile(tmp_path / "lie.gvmb", big, lying)), str(tmp_path / "out"), store=store)
    assert not (tmp_path / "out").exists()


def test_a_signed_hostile_archive_is_still_refused(tmp_path: Path, keys: dict[str, str]) -> None:
    # A signature says who made it, not that it is safe.
    signer = load_private(keys["a"])
    archive = hostile(tmp_path / "s.gvmb", BASE + HOSTILE["relative symlink out"][0], sign=signer)
    with pytest.raises(PackError, match="leads out"):
        unpack(str(archive), str(tmp_path / "out"), load_public(keys["a.pub"]), store=Store(str(tmp_path / "st")))


def test_not_a_gvmb_file(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not zstd at all")
    with pytest.raises(PackError, match="not a gvmrt bundle file"):
        inspect(str(tmp_path / "junk"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(_ti("bundle/config.json", size=2), io.BytesIO(b"{}"))
    (tmp_path / "plain.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(PackError, match="first member is not"):
        inspect(str(tmp_path / "plain.tar.zst"))


# --- layer add from a tar ----------------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], zstd: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if zstd else raw)
    return path


def test_a_tar_layer_is_the_same_layer_as_its_directory(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b")
    store = Store(str(tmp_path / "store"))
    digest, added, _ = store.add_dir(str(b / "rootfs"))
    import subprocess
    subprocess.run(["tar", "-C", str(b / "rootfs"), "-cf", str(tmp_path / "r.tar"), "."], check=True)
    assert store.add_tar(str(tmp_path / "r.tar"))[:2] == (digest, False)
    # A hard link becomes a copy; a device node is skipped, and said.
    members = [(_ti("./etc", D, mode=0o755), b""), _file("./etc/a", b"data"),
               (_ti("./etc/b", tarfile.LNKTYPE, link="./etc/a"), b""), (_ti("./dev/null", tarfile.CHRTYPE), b"")]
    d2, added2, notes = store.add_tar(str(_tar(tmp_path / "x.tar.zst", members, zstd=True)))
    assert added2 and any("device node" in n for n in notes)
    assert (Path(store.path(d2)) / "etc" / "b").read_bytes() == b"data"


@pytest.mark.parametrize("members,reason", [
    ([_file("/etc/evil", b"x")], "absolute"),
    ([_file("a/../../evil", b"x")], r"'\.\.'"),
    ([(_ti("lib", tarfile.SYMTYPE, link="/tmp"), b""), _file("lib/evil", b"x")], "not a directory"),
    ([(_ti("h", tarfile.LNKTYPE, link="/etc/passwd"), b"")], "not an earlier file"),
])
def test_hostile_tar_layers_are_refused(tmp_path: Path, members: list[Any], reason: str) -> None:
    from gvmrt.layers import LayerError
    store = Store(str(tmp_path / "store"))
    with pytest.raises(LayerError, match=reason):
        store.add_tar(str(_tar(tmp_path / "h.tar", members)))
    assert os.listdir(store.dir) == [] and not os.path.exists("/tmp/evil")


def test_chained_symlinks_that_climb_out_are_refused(tmp_path: Path) -> None:
    links = [(_ti("bundle/rootfs/d", D, mode=0o755), b""),
             (_ti("bundle/rootfs/d/up", tarfile.SYMTYPE, mode=0o777, link="../.."), b""),
             (_ti("bundle/rootfs/host", tarfile.SYMTYPE, mode=0o777, link="d/up/.."), b"")]
    with pytest.raises(PackError, match="leads out"):
        unpack(str(hostile(tmp_path / "c.gvmb", BASE + links)), str(tmp_path / "out"), store=Store(str(tmp_path / "s")))
    # The root filesystem must be a directory, not a link to one.
    rootlink = [(_ti("bundle/rootfs", tarfile.SYMTYPE, mode=0o777, link="x"), b""),
                (_ti("bundle/config.json", size=2), b"{}")]
    with pytest.raises(PackError, match="not a directory member"):
        unpack(str(hostile(tmp_path / "r.gvmb", rootlink)), str(tmp_path / "out"), store=Store(str(tmp_path / "s")))


def test_a_huge_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    import resource
    ti = _ti("bundle/x", size=1)
    ti.pax_headers = {"comment": "A" * (8 << 20)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b"x"))
    (tmp_path / "p.gvmb").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PackError):
        inspect(str(tmp_path / "p.gvmb"))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 4 << 10   # KiB: under 4 MiB more


def test_a_summary_that_is_not_of_the_config_is_refused(tmp_path: Path) -> None:
    # inspect shows the summary; it must be of the config.json the archive carries.
    archive = hostile(tmp_path / "s.gvmb", BASE + [_file("bundle/rootfs/a", b"1")], config_sha="0" * 64)
    with pytest.raises(PackError, match="config summary"):
        unpack(str(archive), str(tmp_path / "o"), store=Store(str(tmp_path / "st")))
