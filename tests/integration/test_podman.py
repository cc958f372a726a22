"""podman drives gvmrt as its OCI runtime (--runtime), as root and rootless: the runc-compatible surface
(create --bundle --pid-file [--console-socket], start, state, kill, delete, global --root/--log/
--log-format/--systemd-cgroup) exercised by a real caller, with conmon as the subreaper."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import GVMRT, Gvmrt

IMAGE = "localhost/gvmrt-busybox:test"
# This host's hard limits are below podman's defaults (1048576), and nobody here holds
# CAP_SYS_RESOURCE to raise them (gvmrt refuses such a config with the reason, so would runc's init).
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]


@pytest.fixture(scope="module")
def image_tar(rootfs_cache: dict[str, Path], workdir: Path) -> Path:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run scripts/setup --test")
    tar = workdir / "busybox.tar"
    with tarfile.open(tar, "w") as t:
        t.add(str(rootfs_cache["root"]), arcname=".")
    tar.chmod(0o644)
    return tar


def podman_root(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "--runtime", GVMRT, "--cgroup-manager=cgroupfs", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_podman_as_root_runs_gvmrt(image_tar: Path) -> None:
    assert podman_root("import", "-q", str(image_tar), IMAGE).returncode == 0
    res = podman_root("run", "--rm", "--network", "none", *LIMITS, IMAGE, "sh", "-c",
                      "echo hello; grep NSpid /proc/self/status")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["hello", "NSpid:", "1"]
    assert podman_root("run", "--rm", "--network", "none", *LIMITS, IMAGE, "sh", "-c", "exit 3").returncode == 3
    # -t: podman's conmon passes --console-socket
    res = podman_root("run", "--rm", "-t", "--network", "none", *LIMITS, IMAGE, "tty")
    assert res.returncode == 0 and res.stdout.strip().startswith("/dev/pts/"), res
    # detached, then stop (sleep as pid 1 ignores TERM: podman falls back to KILL, 137 as with runc)
    assert podman_root("run", "-d", "--name", "gvmrt-pd", "--network", "none", *LIMITS, IMAGE,
                       "sleep", "100").returncode == 0
    try:
        assert "Up" in podman_root("ps", "--format", "{{.Names}} {{.Status}}").stdout
        podman_root("stop", "-t", "1", "gvmrt-pd")
        assert "Exited (137)" in podman_root("ps", "-a", "--format", "{{.Names}} {{.Status}}").stdout
    finally:
        podman_root("rm", "-f", "gvmrt-pd")
        podman_root("rmi", "-f", IMAGE)


def test_rootless_podman_runs_gvmrt(rootless: tuple[Gvmrt, object], image_tar: Path) -> None:
    gv, _ = rootless
    runtime_dir = Path(f"/run/user/{gv.uid}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    os.chown(runtime_dir, gv.uid, gv.uid)
    runtime_dir.chmod(0o700)
    env = {**gv.env, "XDG_RUNTIME_DIR": str(runtime_dir)}
    env.pop("XDG_DATA_HOME")  # podman keeps its storage there; gvmrt's data lands beside it

    def podman(*args: str) -> dict:
        return gv.caller.request(argv=["podman", "--runtime", GVMRT, "--cgroup-manager=cgroupfs", *args],
                                 env=env, cwd=env["HOME"], timeout=120)

    assert podman("import", "-q", str(image_tar), IMAGE)["rc"] == 0
    try:
        r = podman("run", "--rm", "--network", "none", "--ulimit", "host", IMAGE, "sh", "-c",
                   "id -u; grep NSpid /proc/self/status")
        assert r["rc"] == 0, r
        assert r["stdout"].split() == ["0", "NSpid:", "1"]
    finally:
        podman("rmi", "-f", IMAGE)
        # rootless podman leaves a pause process (catatonit) holding its user namespace
        gv.caller.request(argv=["podman", "system", "migrate"], env=env, cwd=env["HOME"], timeout=60)
        subprocess.run(["pkill", "-u", str(gv.uid), "-x", "catatonit"], check=False)
