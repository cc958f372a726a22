"""Bundles travel between gvmrt, runc and crun: the same config.json runs under each, rootless."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import GVMRT, Bundles, Gvmrt

SCRIPT = ["sh", "-c", "echo pid=$$ host=$(hostname) uid=$(id -u); ls /sys/class/net"]


def as_user(gv: Gvmrt, argv: list[str], cwd: Path) -> tuple[int, str, str]:
    r = gv.caller.request(argv=argv, env={**gv.env, "XDG_RUNTIME_DIR": str(gv.state_root.parent)}, cwd=str(cwd))
    return r["rc"], r["stdout"], r["stderr"]


def crun_as_user(gv: Gvmrt, args: list[str], cwd: Path) -> tuple[int, str, str]:
    """crun 1.8 refuses this v1/v2 hybrid host unless cgroup.controllers of the unified hierarchy
    looks empty: hide it in a private mount namespace, then drop to the test user."""
    empty = cwd.parent / "empty-controllers"
    empty.write_text("")
    script = ('mount --bind "$0" /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null; '
              f'cd {cwd} && exec setpriv --reuid={gv.uid} --regid={gv.uid} --init-groups "$@"')
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(empty), "crun",
                          *args], capture_output=True, text=True, timeout=60,
                         env={**gv.env, "XDG_RUNTIME_DIR": str(gv.state_root.parent)})
    return res.returncode, res.stdout, res.stderr


@pytest.fixture
def tools() -> None:
    for tool in ("runc", "crun"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup --test")


def test_runc_spec_rootless_bundle_runs_under_gvmrt(rootless: tuple[Gvmrt, Bundles], tools: None) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    (b / "config.json").unlink()
    rc, _, err = as_user(gv, ["runc", "spec", "--rootless"], b)
    assert rc == 0, err
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = SCRIPT
    (b / "config.json").write_text(json.dumps(cfg))
    os.chown(b / "config.json", gv.uid, gv.uid)
    res = gv("run", "--bundle", str(b), "from-runc")
    assert res.rc == 0, res.err
    assert res.out.split()[:3] == ["pid=1", "host=runc", "uid=0"]
    # runc's rootless spec grants ambient caps it does not make inheritable: gvmrt says it skips them.
    assert "ambient" in res.err and "not raised" in res.err


def test_gvmrt_spec_bundle_runs_unchanged_under_runc_and_crun(rootless: tuple[Gvmrt, Bundles], tools: None) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    rc, out, err = as_user(gv, [GVMRT, "spec", "--with-mappings", "--", *SCRIPT], b)
    assert rc == 0, err
    (b / "config.json").write_text(out)
    os.chown(b / "config.json", gv.uid, gv.uid)
    before = (b / "config.json").read_bytes()

    res = gv("run", "--bundle", str(b), "same")
    assert res.rc == 0, res.err
    rc, runc_out, err = as_user(gv, ["runc", "--root", str(gv.state_root.parent / "runc"), "run", "same"], b)
    assert rc == 0, err
    rc, crun_out, err = crun_as_user(gv, ["--root", str(gv.state_root.parent / "crun"), "run", "same"], b)
    assert rc == 0, err
    assert res.out == runc_out == crun_out == "pid=1 host=agent uid=0\nlo\n"
    assert (b / "config.json").read_bytes() == before


def test_portable_gvmrt_spec_bundle_runs_under_crun(rootless: tuple[Gvmrt, Bundles], tools: None) -> None:
    """Without mappings (the git-friendly default) crun maps the invoking user, as gvmrt does."""
    gv, bundles = rootless
    b = bundles.make(SCRIPT)
    res = gv("run", "--bundle", str(b), "portable")
    rc, crun_out, err = crun_as_user(gv, ["--root", str(gv.state_root.parent / "crun"), "run", "portable"], b)
    assert res.rc == 0 and rc == 0, (res.err, err)
    assert res.out == crun_out
