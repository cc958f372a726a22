"""gvmrt.workspace on hand-made upper dirs: overlayfs's whiteouts and opaque directories read as
deletions and replacements; classification by gvm.filesystem rules; commit never follows links."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gvmrt.workspace import CommitError, Conflict, baseline, changes, classify, commit


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("a whiteout is a 0/0 character device: mknod needs CAP_MKNOD")
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "x").write_text("x")
    (lower / "d" / "sub").mkdir()
    (lower / "d" / "sub" / "deep").write_text("deep")
    (lower / "f").write_text("f")
    (lower / "same").write_text("same")
    upper.mkdir()
    os.mknod(upper / "f", stat.S_IFCHR | 0o000, os.makedev(0, 0))      # whiteout: f deleted
    (upper / "d").mkdir()
    os.setxattr(upper / "d", "user.overlay.opaque", b"y")                # d replaced
    (upper / "d" / "x").write_text("x")                                  # same as before: no change
    (upper / "d" / "y").write_text("y")
    (upper / "same").write_text("same")                                  # a copy-up that changed nothing
    return lower, upper


def test_whiteouts_and_opaque_directories(layers: tuple[Path, Path]) -> None:
    lower, upper = layers
    got = {(c.kind, c.path) for c in changes(str(lower), str(upper))}
    assert got == {("deleted", "f"), ("deleted", "d/sub"), ("added", "d/y")}


def test_classify_takes_the_first_matching_rule() -> None:
    rules = [{"paths": ["docs/**"], "action": "commit"}, {"paths": ["**/*.log"], "action": "discard"}]
    assert classify("docs/a/b.md", rules) == ("commit", "docs/**")
    assert classify("x/y.log", rules) == ("discard", "**/*.log")
    assert classify("y.log", rules) == ("discard", "**/*.log")
    assert classify("src/a.py", rules) == ("review", None)


def test_commit_refuses_links_out_and_host_changes(tmp_path: Path) -> None:
    host, upper = tmp_path / "host", tmp_path / "upper"
    host.mkdir()
    upper.mkdir()
    (host / "a").write_text("1")
    base = baseline(str(host))
    (upper / "a").write_text("2")
    (upper / "link").symlink_to("/etc")
    ch = {c.path: c for c in changes(str(host), str(upper))}
    with pytest.raises(CommitError, match="outside the workspace"):
        commit(str(host), str(upper), ch["link"], base, False)
    (host / "a").write_text("3")
    with pytest.raises(Conflict, match="changed on the host"):
        commit(str(host), str(upper), ch["a"], base, False)
    assert (host / "a").read_text() == "3" and not os.path.lexists(host / "link")


@pytest.fixture
def deep_dirs() -> Any:
    """Trees deeper than Python's recursion limit, removed bottom-up afterwards (pytest's own
    tmp_path cleanup recurses, and would fail on them in a later run)."""
    made: list[Path] = []
    yield made
    for top in made:
        cur = top
        while True:
            subs = [p for p in cur.iterdir() if p.is_dir()] if cur.exists() else []
            if not subs:
                break
            cur = subs[0]
        while cur != top.parent:
            for f in cur.iterdir():
                f.unlink()
            cur.rmdir()
            cur = cur.parent


def test_what_the_agent_can_plant_is_never_followed_opened_or_kept_setuid(tmp_path: Path, deep_dirs: Any) -> None:
    host, upper = tmp_path / "host", tmp_path / "upper"
    host.mkdir()
    upper.mkdir()
    (host / "empty.py").write_text("")
    (host / "d").mkdir()
    (host / "d" / "kept").write_text("k")
    base = baseline(str(host))
    os.mkfifo(upper / "empty.py")                     # over an empty file: must not block diff
    os.mkfifo(upper / "pipe")
    (upper / "tool").write_text("x")
    (upper / "tool").chmod(0o4777)
    (upper / "up").symlink_to("d/../..")              # climbs: refused even if it lands inside
    deep = upper / "deep"                             # deeper than Python's recursion limit
    deep.mkdir()
    deep_dirs.append(deep)
    cur = deep
    for _ in range(1100):
        cur = cur / "d"
        os.mkdir(cur)
    got = {c.path: c for c in changes(str(host), str(upper))}
    assert got["pipe"].type == "special" and got["empty.py"].kind in ("added", "deleted")
    with pytest.raises(CommitError, match="fifo"):
        commit(str(host), str(upper), got["pipe"], base, False)
    commit(str(host), str(upper), got["tool"], base, False)
    assert oct((host / "tool").stat().st_mode & 0o7777) == oct(0o777 & ~_umask())
    with pytest.raises(CommitError, match="outside the workspace"):
        commit(str(host), str(upper), got["up"], base, False)
    # A directory deletion is refused when the host added something under it meanwhile.
    if os.geteuid() == 0:                             # a whiteout needs CAP_MKNOD
        os.mknod(upper / "d", stat.S_IFCHR | 0o000, os.makedev(0, 0))
        dchange = next(c for c in changes(str(host), str(upper)) if c.path == "d")
        (host / "d" / "new-by-a-human").write_text("mine")
        with pytest.raises(Conflict, match="new-by-a-human was created on the host"):
            commit(str(host), str(upper), dchange, base, True)
        assert (host / "d" / "new-by-a-human").exists()


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um
