"""Nothing is left behind: mounts, processes, state dirs, overlay dirs; also after crashes."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import Bundles, Gvmrt, default_config, mountinfo, user_processes


def others(gv: Gvmrt) -> list[str]:
    gv.reap()
    return [p for p in user_processes(gv.uid) if int(p.split()[0]) != gv.caller.proc.pid]


def nothing_left(gv: Gvmrt, mounts_before: list[str], data_parent_empty: bool = True) -> None:
    deadline = time.monotonic() + 5
    while others(gv) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert others(gv) == []
    assert mountinfo() == mounts_before
    assert not gv.state_root.exists() or os.listdir(gv.state_root) == []
    containers = gv.data_root / "containers"
    if data_parent_empty and containers.exists():
        for key in os.listdir(containers):
            assert os.listdir(containers / key) == [], key


def test_200_cycles_leave_nothing_behind(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    gv.ok("run", "--bundle", str(b), "warm")  # plan cache filled
    before = mountinfo()
    assert others(gv) == []
    for i in range(200):
        cid = f"cyc{i}"
        gv.ok("create", "--bundle", str(b), cid)
        gv.ok("start", cid)
        gv.ok("delete", "--force", cid)
    nothing_left(gv, before)


def test_delete_force_after_kill_9_of_the_container(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["sh", "-c", "sleep 100 & sleep 100"])
    before = mountinfo()
    gv.ok("run", "--detach", "--bundle", str(b), "k9")
    pid = gv.ok("state", "k9").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while gv.ok("state", "k9").json()["status"] != "stopped" and time.monotonic() < deadline:
        gv.reap()
        time.sleep(0.02)
    assert gv.ok("state", "k9").json()["status"] == "stopped"
    gv.ok("delete", "--force", "k9")
    if gv.mode == "rootless":
        nothing_left(gv, before)
    assert not gv.container_dir("k9").exists() and not (gv.state_root / "k9").exists()


@pytest.mark.parametrize("governed", [False, True], ids=["plain", "governed"])
def test_delete_force_after_create_was_killed_half_way(rootless: tuple[Gvmrt, Bundles], governed: bool) -> None:
    """SIGKILL `gvmrt create` at many points of its life; delete --force must always clean up, and no
    half-built container may survive (the init sees EOF on its sync socket and exits; a governed
    container's monitor sees EOF before it serves, or the init's exit after)."""
    gv, bundles = rootless
    gv.ok("run", "--bundle", str(bundles.make(["true"])), "warm")
    b = bundles.make(config=default_config(["sleep", "100"], governed=governed))
    gv.ok("create", "--bundle", str(b), "warm2")  # plan cache filled
    gv.ok("delete", "warm2")
    before = mountinfo()
    outcomes = set()
    delays = [0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.3]
    if governed:
        delays += [0.06, 0.08, 0.09, 0.12, 0.2]   # the monitor's startup is the longer part
    for i, delay in enumerate(delays):
        cid = f"half{i}"
        pid = gv.spawn("create", "--bundle", str(b), cid)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        res = gv.wait(pid)
        outcomes.add("finished" if res.rc == 0 else "killed")
        if (gv.state_root / cid).exists():
            st = gv("state", cid)
            assert st.rc == 0, st
            # Killed before it wrote state: reported as stopped (or creating while it lived).
            gv.ok("delete", "--force", cid)
        nothing_left(gv, before)
    assert "killed" in outcomes
