"""The OCI lifecycle end to end: real namespaces, real OverlayFS, as root and as an unprivileged user."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.conftest import GVMRT, Bundles, Gvmrt


def wait_status(gv: Gvmrt, cid: str, want: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        res = gv("state", cid)
        st = res.json() if res.rc == 0 else {"status": res.err}
        if st["status"] == want or time.monotonic() > deadline:
            assert st["status"] == want, st
            return st
        gv.reap()
        time.sleep(0.02)


def test_lifecycle_end_to_end(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "echo started > /tmp/x; sleep 30"])
    pid_file = b / "init.pid"
    gv.ok("create", "--bundle", str(b), "--pid-file", str(pid_file), "c1")

    st = gv.ok("state", "c1").json()
    assert st["ociVersion"].startswith("1.")
    assert st["id"] == "c1" and st["status"] == "created" and st["bundle"] == str(b)
    assert st["pid"] == int(pid_file.read_text()) > 0
    assert set(st) >= {"ociVersion", "id", "status", "pid", "bundle", "annotations"}
    # The pid file names the container init itself: pid 1 of its own pid namespace, in new namespaces.
    pid = st["pid"]
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    with open(f"/proc/{pid}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
    assert nspid[-1] == "1"
    # Its parent is the subreaper that called create (runc's process shape), not a gvmrt monitor.
    with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    assert ppid == gv.caller.proc.pid

    gv.ok("start", "c1")
    assert gv.ok("state", "c1").json()["status"] == "running"

    listing = gv.ok("list", "--format", "json").json()
    assert [(s["id"], s["status"]) for s in listing] == [("c1", "running")]
    table = gv.ok("list").out.splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"] and table[1].split()[:3] == ["c1", str(pid), "running"]

    gv.ok("kill", "c1", "KILL")
    st = wait_status(gv, "c1", "stopped")
    assert st["pid"] == 0
    gv.ok("delete", "c1")
    res = gv("state", "c1")
    assert res.rc == 1 and "does not exist" in res.err
    assert not gv.container_dir("c1").exists(), "delete must remove the overlay upper/work dirs"


def test_run_returns_exit_status_and_removes_container(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "echo out; echo err >&2; exit 7"])
    res = gv("run", "--bundle", str(b), "r1")
    # A plain OCI bundle (no gvm section) runs as runc would, and create says it is not governed.
    notice = f"gvmrt: note: egress is not governed: {b}/config.json has no gvm section"
    assert (res.rc, res.out) == (7, "out\n")
    assert res.err.startswith(notice) and res.err.endswith("\nerr\n") and res.err.count("\n") == 2, res.err
    assert gv.ok("list", "--quiet").out == ""
    assert not gv.container_dir("r1").exists()


def test_run_stdin_is_attached(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "read line; echo got:$line"])
    res = gv("run", "--bundle", str(b), "r2", stdin="hello\n")
    assert (res.rc, res.out) == (0, "got:hello\n")


def test_run_signal_exit_is_128_plus_n(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sleep", "30"])
    pid = gv.spawn("run", "--bundle", str(b), "r3")
    wait_status(gv, "r3", "running")
    gv.ok("kill", "r3", "9")
    res = gv.wait(pid)
    assert res.rc == 128 + 9, res


def test_kill_term_reaches_a_handler(env: tuple[Gvmrt, Bundles]) -> None:
    # pid 1 of a namespace only gets signals it handles (pid_namespaces(7)); the agent traps TERM.
    gv, bundles = env
    b = bundles.make(["sh", "-c", "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done"])
    pid = gv.spawn("run", "--bundle", str(b), "r4")
    wait_status(gv, "r4", "running")
    time.sleep(0.2)
    gv.ok("kill", "r4", "SIGTERM")
    assert gv.wait(pid).rc == 42


def test_run_keep_and_detach(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "exit 3"])
    assert gv("run", "--keep", "--bundle", str(b), "k1").rc == 3
    st = gv.ok("state", "k1").json()
    assert st["status"] == "stopped" and st.get("exitStatus") == 3
    gv.ok("delete", "k1")

    b2 = bundles.make(["sleep", "30"])
    gv.ok("run", "--detach", "--bundle", str(b2), "d1")
    assert gv.ok("state", "d1").json()["status"] == "running"
    gv.ok("delete", "--force", "d1")
    assert gv.ok("list", "--quiet").out == ""


def test_state_is_honest_after_exit(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["true"])
    gv.ok("create", "--bundle", str(b), "h1")
    gv.ok("start", "h1")
    st = wait_status(gv, "h1", "stopped")
    assert st["pid"] == 0
    # Even when nobody reaped it (a zombie) or the pid was recycled, stopped stays stopped.
    gv.ok("delete", "h1")


def test_short_form_bundle_path_means_id(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sleep", "30"], name="hello")
    gv.ok("create", str(b))
    assert gv.ok("state", str(b)).json()["id"] == "hello"
    gv.ok("start", str(b))
    assert gv.ok("state", "hello").json()["status"] == "running"
    gv.ok("delete", "--force", str(b))
    b2 = bundles.make(["sh", "-c", "exit 5"], name="other")
    assert gv("run", "--id", "custom", str(b2)).rc == 5
    res = gv("create", "--id", "x", "not-a-bundle")
    assert res.rc == 2 and "--id goes with a bundle directory" in res.err


def test_create_defaults_to_current_directory(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["true"])
    r = gv.caller.request(argv=[GVMRT, "--root", str(gv.state_root), "create", "cwd1"], env=gv.env, cwd=str(b))
    assert r["rc"] == 0, r
    assert gv.ok("state", "cwd1").json()["bundle"] == str(b)
    gv.ok("delete", "cwd1")


def test_kill_all_signals_every_process(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    gv.ok("run", "--detach", "--bundle", str(b), "ka")
    pid = gv.ok("state", "ka").json()["pid"]
    time.sleep(0.2)
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    members = [p for p in os.listdir("/proc") if p.isdigit() and _ns(p) == ns]
    assert len(members) >= 3
    gv.ok("kill", "--all", "ka", "KILL")
    wait_status(gv, "ka", "stopped")
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in members) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in members)
    gv.ok("delete", "ka")


def _ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_signal_spellings(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sleep", "30"])
    gv.ok("run", "--detach", "--bundle", str(b), "sig")
    for spelling in ("CONT", "SIGCONT", "cont", str(int(signal.SIGCONT))):
        gv.ok("kill", "sig", spelling)
    res = gv("kill", "sig", "NOPE")
    assert res.rc == 2 and "invalid signal 'NOPE'" in res.err
    gv.ok("delete", "--force", "sig")


def test_runc_global_options_and_version(env: tuple[Gvmrt, Bundles], tmp_path: Path) -> None:
    gv, bundles = env
    res = gv.ok("--version", root=False)
    lines = res.out.splitlines()
    assert lines[0].startswith("gvmrt version ") and lines[1].startswith("spec: 1.")
    log = gv.state_root.parent / "gvmrt.log"
    res = gv("--log", str(log), "--log-format", "json", "--debug", "--systemd-cgroup", "state", "nope", root=False)
    assert res.rc == 1
    assert "cgroup manager options ignored" in res.err
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["level"] == "error" and "does not exist" in e["msg"] for e in entries)
    res = gv("--cgroup-manager", "cgroupfs", "list")
    assert res.rc == 0 and "ignored" in res.err
    res = gv("frobnicate")
    assert res.rc == 2
    res = gv("create", "--bogus", "x")
    assert res.rc == 2 and "unknown option --bogus" in res.err
    assert "Usage: gvmrt create" in gv.ok("create", "--help").out


def test_bundle_is_never_modified(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "echo agent > /etc/new-file; rm /etc/passwd; echo x >> /etc/group; mkdir /opt2"])
    before = _tree(b / "rootfs")
    gv.ok("run", "--keep", "--bundle", str(b), "w1")
    assert _tree(b / "rootfs") == before
    upper = gv.container_dir("w1") / "upper"
    assert (upper / "etc" / "new-file").read_text() == "agent\n"
    assert (upper / "etc" / "group").read_text().endswith("x\n")
    assert (upper / "opt2").is_dir()
    gv.ok("delete", "w1")
    assert not upper.exists()


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, data)
    return out
