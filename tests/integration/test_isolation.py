"""What the jail looks like from inside: processes, files, network, seccomp, capabilities, ids, limits."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Bundles, Gvmrt


def run_in(gv: Gvmrt, bundles: Bundles, script: str, edit: Any = None, name: str = "iso") -> str:
    b = bundles.make(["sh", "-c", script], edit=edit)
    res = gv("run", "--bundle", str(b), name)
    assert res.rc == 0, f"{res.rc}: {res.err}"
    return res.out


def test_host_processes_are_invisible(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "echo $$; ls -d /proc/[0-9]*; cat /proc/1/cmdline | tr '\\0' ' '")
    lines = out.split()
    assert lines[0] == "1"
    pids = sorted(int(p[6:]) for p in lines if p.startswith("/proc/") and p[6:].isdigit())
    # sh (1), ls, and the pipeline's processes: nothing from the host (which has hundreds).
    assert pids[0] == 1 and len(pids) <= 4
    assert "process_api" not in out and "sh -c" in out


def test_host_files_outside_mounts_are_invisible(env: tuple[Gvmrt, Bundles], workdir: Path) -> None:
    gv, bundles = env
    marker = workdir / "host-secret"
    marker.write_text("secret")
    marker.chmod(0o644)
    out = run_in(gv, bundles, f"cat {marker} 2>&1; ls /var/tmp; cat /etc/hostname; ls /root 2>&1; ls /home")
    assert "secret" not in out.splitlines() and f"{marker}': No such file" in out
    assert not [line for line in out.splitlines() if "gvmrt-tests" in line and "can't open" not in line]


def test_bind_mount_options(env: tuple[Gvmrt, Bundles], workdir: Path) -> None:
    gv, bundles = env
    share = workdir / f"share-{gv.mode}"
    share.mkdir()
    (share / "data").write_text("from host\n")
    os.chown(share, gv.uid, gv.uid)
    os.chown(share / "data", gv.uid, gv.uid)

    def edit(cfg: dict) -> None:
        cfg["mounts"].append({"destination": "/mnt/ro", "type": "bind", "source": str(share),
                              "options": ["rbind", "ro", "nosuid", "nodev"]})
        cfg["mounts"].append({"destination": "/mnt/rw", "type": "bind", "source": str(share), "options": ["bind"]})
        cfg["mounts"].append({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                              "options": ["size=1m", "noexec"]})

    out = run_in(gv, bundles, "cat /mnt/ro/data; echo x > /mnt/ro/new 2>&1 || echo ro-refused; "
                 "echo written > /mnt/rw/new && echo rw-ok; grep -E ' /(mnt/ro|scratch) ' /proc/self/mounts", edit=edit)
    assert "from host" in out and "ro-refused" in out and "rw-ok" in out
    ro_line = next(line for line in out.splitlines() if " /mnt/ro " in line)
    assert "ro," in ro_line and "nosuid" in ro_line and "nodev" in ro_line
    assert "noexec" in next(line for line in out.splitlines() if " /scratch " in line)
    assert (share / "new").read_text() == "written\n"


def test_only_loopback_network(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "ls /sys/class/net; cat /proc/net/dev | tail -n +3 | cut -d: -f1; "
                 "ip link 2>/dev/null | grep -c UP; wget -q -T 2 -O- http://1.1.1.1/ 2>&1 || echo no-route")
    assert out.split()[0] == "lo"
    assert [line.strip() for line in out.splitlines()[1:2]] == ["lo"]
    assert "no-route" in out


def test_hostname_and_uts(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "hostname", edit=lambda c: c.update(hostname="jailbird"))
    assert out.strip() == "jailbird"
    assert os.uname().nodename != "jailbird"


def test_seccomp_denied_syscall_fails_with_configured_errno(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env

    def edit(cfg: dict) -> None:
        cfg["linux"]["seccomp"]["syscalls"].append({"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO",
                                                    "errnoRet": 13})
    out = run_in(gv, bundles, "mkdir /tmp/d 2>&1; mount -t tmpfs none /mnt 2>&1; unshare -U true 2>&1; echo done",
                 edit=edit)
    assert "Permission denied" in out.splitlines()[0]  # EACCES (13), as configured, not EPERM
    # the default profile denies mount (busybox words EPERM as "permission denied (are you root?)")
    assert "permission denied (are you root?)" in out.splitlines()[1]
    assert "Operation not permitted" in out.splitlines()[2]  # and new user namespaces


def test_no_capabilities_by_default_and_configured_ones(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; grep NoNewPrivs /proc/self/status")
    caps = dict(line.split(":\t") for line in out.splitlines())
    assert all(int(caps[k], 16) == 0 for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert caps["NoNewPrivs"].strip() == "1"

    def edit(cfg: dict) -> None:
        names = ["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]
        cfg["process"]["capabilities"] = {"bounding": names, "effective": names, "permitted": names,
                                          "inheritable": names, "ambient": ["CAP_NET_BIND_SERVICE"]}
    out = run_in(gv, bundles, "grep -E '^Cap(Eff|Bnd|Amb)' /proc/self/status", edit=edit, name="iso2")
    caps = dict(line.split(":\t") for line in out.splitlines())
    want = (1 << 10) | (1 << 0)
    assert int(caps["CapBnd"], 16) == want and int(caps["CapAmb"], 16) == 1 << 10
    # sh exec'd as root keeps the permitted set; grep after exec shows what the agent has.
    assert int(caps["CapEff"], 16) == want


def test_process_user_env_cwd_umask_rlimits(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env

    def edit(cfg: dict) -> None:
        cfg["process"]["env"].append("AGENT_MODE=test")
        cfg["process"]["cwd"] = "/tmp"
        cfg["process"]["user"]["umask"] = 0o077
        cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512},
                                     {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]
    out = run_in(gv, bundles, "echo $AGENT_MODE; pwd; umask; ulimit -n; ulimit -Hn; ulimit -c", edit=edit)
    assert out.split() == ["test", "/tmp", "0077", "256", "512", "0"]


def test_process_user_with_subordinate_ids(env: tuple[Gvmrt, Bundles]) -> None:
    """A wider id map (newuidmap/newgidmap from /etc/subuid) lets the agent run as a non-root uid."""
    gv, bundles = env
    if gv.mode == "rootless":
        with open("/etc/subuid") as f:
            start = next(int(line.split(":")[1]) for line in f if line.startswith("gvmrt-test:"))
        uid_maps = [{"containerID": 0, "hostID": gv.uid, "size": 1},
                    {"containerID": 1, "hostID": start, "size": 65536}]
    else:
        uid_maps = [{"containerID": 0, "hostID": 200000, "size": 65536}]

    def edit(cfg: dict) -> None:
        cfg["linux"]["uidMappings"] = uid_maps
        cfg["linux"]["gidMappings"] = uid_maps
        cfg["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [1001, 1002]}
    b = bundles.make(["sh", "-c", "id -u; id -g; id -G; echo owned > /tmp/f; mkdir -p /home/agent; "
                                  "echo mine > /home/agent/file 2>&1 || echo home-denied"], edit=edit)
    res = gv("run", "--keep", "--bundle", str(b), "ids")
    assert res.rc == 0, res.err
    lines = res.out.split()
    assert lines[:3] == ["1000", "1000", "1000"] and set(lines[3:5]) == {"1001", "1002"}
    # Files the agent wrote as uid 1000 are owned by a subordinate id on the host; delete must
    # still remove them (it re-enters a user namespace with the same maps to do so).
    gv.ok("delete", "ids")
    assert not gv.container_dir("ids").exists()


def test_rootless_one_id_map_refuses_additional_gids(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"], edit=lambda c: c["process"]["user"].update(additionalGids=[0]))
    res = gv("create", "--bundle", str(b), "g1")
    assert res.rc == 2 and "/process/user/additionalGids: needs a gid mapping wider" in res.err
    b = bundles.make(["true"], edit=lambda c: c["process"]["user"].update(uid=1000))
    res = gv("create", "--bundle", str(b), "g2")
    assert res.rc == 2 and "/process/user/uid: uid 1000 is not mapped" in res.err
    assert gv.ok("list", "--quiet").out == ""


def test_masked_and_readonly_paths(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "cat /proc/timer_list /proc/keys 2>&1 | wc -c; ls /sys/firmware | wc -l; "
                 "echo 1 > /proc/sys/kernel/domainname 2>&1 || echo ro-sys")
    counts = out.split()
    assert counts[0] == "0" and counts[1] == "0" and "ro-sys" in out


def test_readonly_root(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "touch /etc/x 2>&1 || echo ro-root; touch /tmp/x && echo tmp-ok",
                 edit=lambda c: c["root"].update(readonly=True))
    assert "ro-root" in out and "tmp-ok" in out


def test_dev_is_minimal(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "ls /dev; head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok; "
                 "head -c 8 /dev/urandom | wc -c; ls /dev/pts")
    names = set(out.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd"} <= names
    assert "sda" not in names and "vda" not in names and "kmsg" not in names
    assert "null-ok" in out


@pytest.mark.parametrize("sysctl", [{"net.ipv4.ip_forward": "1"}])
def test_namespaced_sysctl(env: tuple[Gvmrt, Bundles], sysctl: dict[str, str]) -> None:
    gv, bundles = env
    out = run_in(gv, bundles, "cat /proc/sys/net/ipv4/ip_forward",
                 edit=lambda c: c["linux"].update(sysctl=sysctl))
    assert out.strip() == "1"
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        host = f.read().strip()
    assert json.dumps(host)  # the host's value is untouched by the jail's network namespace
