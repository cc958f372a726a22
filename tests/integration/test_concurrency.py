"""Concurrent commands on one container are serialised: exactly one wins, the others say why."""
from __future__ import annotations

from tests.conftest import Bundles, Gvmrt


def test_concurrent_creates_of_one_id(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sleep", "30"])
    pids = [gv.spawn("create", "--bundle", str(b), "same") for _ in range(6)]
    results = [gv.wait(p) for p in pids]
    assert sorted(r.rc for r in results) == [0, 1, 1, 1, 1, 1], results
    for r in results:
        if r.rc:
            assert r.err.strip() == "gvmrt: container 'same' already exists; choose another id or " \
                                    "`gvmrt delete same` first"
    assert gv.ok("state", "same").json()["status"] == "created"
    gv.ok("delete", "same")


def test_concurrent_deletes_and_starts(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sleep", "30"])
    for round_ in range(5):
        cid = f"race{round_}"
        gv.ok("create", "--bundle", str(b), cid)
        pids = [gv.spawn("delete", "--force", cid) for _ in range(3)] + [gv.spawn("start", cid)]
        results = [gv.wait(p) for p in pids]
        deletes, start = results[:3], results[3]
        assert sum(r.rc == 0 for r in deletes) >= 1, deletes
        for r in results:
            assert "Traceback" not in r.err and "internal error" not in r.err, r
            if r.rc:
                assert len(r.err.strip().splitlines()) == 1, r
        assert start.rc in (0, 1)
        assert gv.ok("list", "--quiet").out == ""
        assert not gv.container_dir(cid).exists()
