"""Escape and tampering attempts found in review; each one failed before its fix."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.conftest import Bundles, Gvmrt


def no_userns(cfg: dict) -> None:
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "user"]


def test_agent_cannot_signal_the_callers_process_group(env: tuple[Gvmrt, Bundles]) -> None:
    """The init gets a session of its own (setsid): `kill -9 0` hits only the jail, and there is no
    controlling terminal of the caller to push keystrokes into (TIOCSTI)."""
    gv, bundles = env
    b = bundles.make(["sh", "-c", "cut -d' ' -f6 /proc/1/stat; cat /dev/tty 2>&1 | head -1; kill -9 0"])
    res = gv("run", "--bundle", str(b), "sess")
    # pid 1 survives its own kill -9 0 (the kernel shields a namespace's init from inside it)
    assert res.rc in (0, 137), res
    lines = res.out.splitlines()
    assert lines[0] == "1"  # session id == pid 1: a session leader
    assert "No such device or address" in lines[1]  # no controlling terminal
    assert gv.ok("list", "--quiet").out == ""  # the caller (a subreaper) survived to answer


def test_missing_capabilities_object_means_none(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "grep -E '^Cap(Eff|Bnd|Prm)' /proc/self/status"],
                     edit=lambda c: c["process"].pop("capabilities"))
    out = gv.ok("run", "--bundle", str(b), "nocaps").out
    assert [int(line.split()[1], 16) for line in out.splitlines()] == [0, 0, 0]


def test_device_node_in_rootfs_is_unusable(env: tuple[Gvmrt, Bundles]) -> None:
    """As root the jail runs without a user namespace here: the case with no other protection."""
    gv, bundles = env

    def edit(cfg: dict) -> None:
        if gv.mode == "root":
            no_userns(cfg)
        # even with CAP_MKNOD, as a config may grant it
        cfg["process"]["capabilities"] = {k: ["CAP_MKNOD"] for k in ("bounding", "effective", "permitted")}
    # refused2: either mknod itself is refused (a user namespace) or the node it made is unusable (nodev)
    b = bundles.make(["sh", "-c", "echo x > /nulldev 2>&1 || echo refused; "
                                  "if mknod /tmp/n c 1 3; then echo y > /tmp/n || echo refused2; "
                                  "else echo refused2; fi"], edit=edit)
    os.mknod(b / "rootfs" / "nulldev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    out = gv.ok("run", "--bundle", str(b), "dev").out
    assert "refused" in out and "refused2" in out, out


def test_proc_through_a_rootfs_symlink_is_refused(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["true"])
    proc = b / "rootfs" / "proc"
    proc.rmdir()
    (b / "rootfs" / "elsewhere").mkdir()
    proc.symlink_to("/elsewhere")
    os.lchown(proc, gv.uid, gv.uid)
    res = gv("create", "--bundle", str(b), "procsym")
    assert res.rc == 1 and "mount /proc: the destination goes through a symlink" in res.err
    assert gv.ok("list", "--quiet").out == ""


def test_delete_never_takes_its_rm_target_from_state_json(rootless: tuple[Gvmrt, Bundles], workdir: Path) -> None:
    gv, bundles = rootless
    victim = workdir / "precious"
    victim.mkdir()
    (victim / "file").write_text("keep me")
    os.chown(victim, gv.uid, gv.uid)
    b = bundles.make(["true"])
    gv.ok("create", "--bundle", str(b), "forged")
    state = gv.state_root / "forged" / "state.json"
    st = json.loads(state.read_text())
    st["data_dir"] = str(victim)
    state.write_text(json.dumps(st))
    gv.ok("delete", "--force", "forged")
    assert (victim / "file").read_text() == "keep me"


def test_state_root_writable_by_others_is_refused(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    gv.ok("create", "--bundle", str(b), "perm")
    os.chmod(gv.state_root / "perm", 0o777)
    for verb in ("state", "delete"):
        res = gv(verb, "perm")
        assert res.rc == 1 and "not writable by others" in res.err, (verb, res)
    os.chmod(gv.state_root / "perm", 0o700)
    gv.ok("delete", "perm")


def test_pid_file_symlink_is_replaced_not_followed(env: tuple[Gvmrt, Bundles], workdir: Path) -> None:
    gv, bundles = env
    victim = workdir / f"victim-{gv.mode}"
    victim.write_text("root's file\n")
    b = bundles.make(["true"])
    link = b / "init.pid"
    link.symlink_to(victim)
    os.lchown(link, gv.uid, gv.uid)
    gv.ok("create", "--pid-file", str(link), "--bundle", str(b), "pidf")
    assert victim.read_text() == "root's file\n"
    assert not link.is_symlink() and link.read_text().isdigit()
    gv.ok("delete", "pidf")


def test_a_plan_cache_others_can_write_is_not_trusted(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sh", "-c", "grep CapEff /proc/self/status"])
    gv.ok("run", "--bundle", str(b), "warm")  # fills the cache
    plans = list((Path(gv.env["XDG_CACHE_HOME"]) / "gvmrt" / "plans").rglob("*.json"))
    for p in plans:
        plan = json.loads(p.read_text())
        if plan["process"]["args"][:2] == ["sh", "-c"] and "CapEff" in plan["process"]["args"][2]:
            plan["process"]["caps"] = {k: (1 << 41) - 1 for k in ("bounding", "effective", "permitted",
                                                                  "inheritable", "ambient")}
            p.write_text(json.dumps(plan))
            p.chmod(0o666)  # as if someone else could have written it
    out = gv.ok("run", "--bundle", str(b), "poisoned").out
    assert int(out.split()[1], 16) == 0


def test_stale_upper_dir_of_a_vanished_container_is_not_reused(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sh", "-c", "cat /etc/planted 2>&1"])
    upper = gv.container_dir("stale") / "upper" / "etc"
    upper.mkdir(parents=True)
    (upper / "planted").write_text("from an earlier life\n")
    for p in (upper.parent.parent.parent, upper.parent.parent, upper.parent, upper, upper / "planted"):
        os.chown(p, gv.uid, gv.uid)
    res = gv("run", "--bundle", str(b), "stale")
    assert res.rc == 1 and "No such file" in res.out
    assert "removed the stale overlay upper dir" in res.err


def test_preserve_fds_that_are_not_open_is_a_usage_error(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    res = gv("create", "--preserve-fds", "3", "--bundle", str(b), "pf")
    assert res.rc == 2 and "--preserve-fds 3: fd 3 is not open" in res.err
    assert gv.ok("list", "--quiet").out == ""
