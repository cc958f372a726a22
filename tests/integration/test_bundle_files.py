"""Bundles in git and between teammates, through the real CLI as root and as the unprivileged user
(issue 6): pack -> unpack -> run on the example bundles, a bundle stacked on a stored layer,
layer dedup across unpacks, fmt --check and validate on good and bad fixtures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GVMRT, Bundles, Gvmrt

REPO = Path(__file__).resolve().parents[2]


def _shared(gv: Gvmrt, bundles: Bundles, name: str) -> Path:
    d = bundles.base.parent / name
    d.mkdir(exist_ok=True)
    if gv.uid:
        os.chown(d, gv.uid, gv.uid)
    return d


def test_pack_unpack_run_the_hello_example(env: tuple[Gvmrt, Bundles], tmp_path: Path) -> None:
    gv, bundles = env
    src = REPO / "bundles" / "hello"
    if not (src / "rootfs" / "bin" / "busybox").exists():
        pytest.skip("bundles/hello/rootfs is not built (scripts/setup builds it)")
    # The teammate who packs: root, from the checkout; the one who unpacks: gv's user.
    archive = _shared(gv, bundles, "share") / "hello.gvmb"
    res = subprocess.run([GVMRT, "pack", str(src), "-o", str(archive), "--format", "json"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    archive.chmod(0o644)
    again = archive.with_name("again.gvmb")
    subprocess.run([GVMRT, "pack", str(src), "-o", str(again)], check=True, capture_output=True)
    assert archive.read_bytes() == again.read_bytes(), "packing twice gives the same bytes"
    info = gv.ok("inspect", str(archive), "--format", "json").json()
    assert info["bundle"]["args"] == ["/hello.sh"] and info["signature"] == "unsigned"
    dest = _shared(gv, bundles, "unpacked") / "hello"
    gv.ok("unpack", str(archive), str(dest))
    out = gv.ok("run", "--bundle", str(dest), "hello1").out
    assert "hello from the jail" in out


def test_pack_unpack_run_the_python_agent_example(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    src = REPO / "bundles" / "python-agent"
    if not (src / "rootfs" / "usr" / "bin" / "python3").exists():
        pytest.skip("bundles/python-agent/rootfs is not built (scripts/setup builds it)")
    archive = _shared(gv, bundles, "share") / "pa.gvmb"
    subprocess.run([GVMRT, "pack", str(src), "-o", str(archive)], check=True, capture_output=True)
    archive.chmod(0o644)
    info = gv.ok("inspect", str(archive), "--format", "json").json()
    assert info["bundle"]["governed"] and info["bundle"]["policy"]["rules"] == 5
    assert info["bundle"]["credentials"] == ["demo-api"]
    dest = _shared(gv, bundles, "unpacked") / "pa"
    gv.ok("unpack", str(archive), str(dest))
    assert (dest / "rootfs" / "agent" / "agent.py").read_bytes() == (src / "rootfs" / "agent" / "agent.py").read_bytes()
    # The teammate's own run: no demo upstream here, so a one-liner in the unpacked rootfs.
    cfg = json.loads((dest / "config.json").read_text())
    cfg["gvm"]["egress"].pop("upstream_ca")
    cfg["gvm"].pop("credentials")
    cfg["process"]["args"] = ["python3", "-c", "import sys; print('python', sys.version.split()[0], 'in the jail')"]
    (dest / "config.json").write_text(json.dumps(cfg))
    assert "in the jail" in gv.ok("run", "--bundle", str(dest), "pa1").out


def test_a_bundle_on_a_stored_layer_runs_and_travels_without_its_layer_twice(
        env: tuple[Gvmrt, Bundles], rootfs_cache: dict[str, Path]) -> None:
    gv, bundles = env
    base = rootfs_cache[gv.mode]
    digest = gv.ok("layer", "add", str(base)).out.strip()
    assert digest.startswith("sha256:") and len(digest) == 71
    assert gv.ok("layer", "add", str(base)).err.startswith("already in")
    assert digest in gv.ok("layer", "ls").out

    def edit(cfg: dict[str, Any]) -> None:
        cfg["root"] = {"path": "rootfs", "layers": [digest]}
        cfg["process"]["args"] = ["/bin/sh", "-c", "cat /agent/own.txt; ls /bin/busybox"]
    b = bundles.make(edit=edit, shared_rootfs=None)
    shutil.rmtree(b / "rootfs")
    (b / "rootfs" / "agent").mkdir(parents=True)
    (b / "rootfs" / "agent" / "own.txt").write_text("my own small layer\n")
    if gv.uid:
        subprocess.run(["chown", "-R", f"{gv.uid}:{gv.uid}", str(b)], check=True)
    out = gv.ok("run", "--bundle", str(b), "lay1").out
    assert "my own small layer" in out and "/bin/busybox" in out
    share = _shared(gv, bundles, "share")
    gv.ok("pack", str(b), "-o", str(share / "lay.gvmb"))
    # The teammate already has the base layer: only the bundle's own files are written.
    res = gv.ok("unpack", str(share / "lay.gvmb"), str(share / "u1"), "--format", "json").json()
    assert res["layers_present"] == [digest] and res["layers_added"] == []
    assert res["bytes"] < 10_000
    # Without it, unpack brings it along; a missing layer is named by create.
    gv.ok("layer", "rm", digest[7:19])
    bad = gv("create", "--bundle", str(b), "lay2")
    assert bad.rc != 0 and "/root/layers/0" in bad.err and "not in the local layer store" in bad.err
    res = gv.ok("unpack", str(share / "lay.gvmb"), str(share / "u2"), "--format", "json").json()
    assert res["layers_added"] == [digest]
    assert "my own small layer" in gv.ok("run", "--bundle", str(share / "u2"), "lay3").out
    gc = gv.ok("layer", "gc", "--dry-run")
    assert digest in gc.out                      # no container, no --keep: it would go
    gc = gv.ok("layer", "gc", "--keep", str(b))
    assert digest not in gc.out and gv.ok("layer", "ls", "--format", "json").json()[0]["digest"] == digest


def test_fmt_check_and_validate(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(cfg, indent=4))        # valid, not canonical
    res = gv("fmt", "--check", str(b))
    assert res.rc == 1 and "would reformat" in res.out
    assert json.loads((b / "config.json").read_text()) == cfg          # --check changes nothing
    gv.ok("fmt", str(b))
    text = (b / "config.json").read_text()
    assert text.endswith("}\n") and text == json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    gv.ok("fmt", "--check", str(b))
    assert "ok:" in gv.ok("validate", str(b)).out
    # Every problem at once, each with its pointer.
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": "many", "hard": 10}]
    cfg["root"]["path"] = "nowhere"
    cfg["mounts"].append({"destination": "/data", "type": "bind", "source": "/does/not/exist", "options": ["bind"]})
    cfg["hostnme"] = "typo"
    (b / "config.json").write_text(json.dumps(cfg))
    res = gv("validate", str(b), "--format", "json")
    assert res.rc == 1
    pointers = {p["pointer"] for p in json.loads(res.out)}
    assert "/process/rlimits/0/soft" in pointers and len(pointers) >= 1
    cfg["process"]["rlimits"] = []
    (b / "config.json").write_text(json.dumps(cfg))
    res = gv("validate", str(b))
    assert res.rc == 1
    assert "/root/path" in res.out and f"/mounts/{len(cfg['mounts']) - 1}/source" in res.out, res.out
