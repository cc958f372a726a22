"""What the agent wrote in a workspace (issue 7), in real jails as root and as the unprivileged
user: diff of every kind of change, commit path by path, nothing on the host before commit,
symlinks never followed, host-side conflicts named, auto-commit and discard classes, review while
the container runs, and each commit and discard in the verifiable audit log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from gvmrt.audit.read import records, segments
from gvmrt.audit.verify import verify_log
from tests.conftest import Bundles, Gvmrt, default_config

AGENT = """
set -e
cd /workspace
echo 'new line' >> README.md            # modify
echo hello > added.txt                  # add
rm gone.txt                             # delete
mv old-name.txt new-name.txt            # rename
chmod 600 script.sh                     # chmod
ln -s README.md readme-link             # a symlink inside the workspace
ln added.txt hard.txt                   # a hard link
rm -rf replaced && mkdir replaced && echo fresh > replaced/new.txt   # directory replaced
ln -s /etc/passwd evil                  # a symlink out of the workspace
ln -s ../../outside sneaky
"""


def _workspace(gv: Gvmrt, bundles: Bundles, name: str = "proj") -> Path:
    ws = bundles.base.parent / name
    (ws / "replaced").mkdir(parents=True)
    (ws / "README.md").write_text("line 1\n")
    (ws / "gone.txt").write_text("bye\n")
    (ws / "old-name.txt").write_text("renamed\n")
    (ws / "script.sh").write_text("#!/bin/sh\n")
    (ws / "script.sh").chmod(0o755)
    (ws / "replaced" / "old.txt").write_text("old\n")
    (ws / "replaced" / "keep.txt").write_text("keep\n")
    if gv.uid:
        subprocess.run(["chown", "-R", f"{gv.uid}:{gv.uid}", str(ws)], check=True)
    return ws


def _bundle(gv: Gvmrt, bundles: Bundles, ws: Path, script: str, **fs: Any) -> Path:
    def edit(cfg: dict[str, Any]) -> None:
        cfg["gvm"]["filesystem"] = {"workspaces": [{"source": str(ws), "destination": "/workspace"}], **fs}
        cfg["process"]["args"] = ["/bin/sh", "-c", script]
    return bundles.make(config=default_config(["true"], governed=True), edit=edit)


def _snapshot(root: Path) -> dict[str, Any]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (oct(st.st_mode), os.readlink(p) if p.is_symlink() else
                                         p.read_bytes() if p.is_file() else None)
    return out


def test_diff_and_commit_every_kind_of_change(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    ws = _workspace(gv, bundles)
    before = _snapshot(ws)
    b = _bundle(gv, bundles, ws, AGENT)
    res = gv("run", "--bundle", str(b), "wk1")
    assert res.rc == 0 and "wait for review" in res.err, res.err
    assert _snapshot(ws) == before, "nothing reaches the host before commit"
    changes = {(c["change"], c["path"]) for w in gv.ok("diff", "wk1", "--format", "json").json() for c in w["changes"]}
    assert changes == {("modified", "README.md"), ("added", "added.txt"), ("deleted", "gone.txt"),
                       ("deleted", "old-name.txt"), ("added", "new-name.txt"), ("modified", "script.sh"),
                       ("added", "readme-link"), ("added", "hard.txt"), ("deleted", "replaced/old.txt"),
                       ("deleted", "replaced/keep.txt"), ("added", "replaced/new.txt"), ("added", "evil"),
                       ("added", "sneaky")}, changes
    text = gv.ok("diff", "wk1", "/workspace/README.md").out
    assert "+new line" in text and " line 1" in text
    # One at a time: a path, then a directory, then the rest; deletions only when asked.
    gv.ok("commit", "wk1", "/workspace/README.md")
    assert (ws / "README.md").read_text() == "line 1\nnew line\n" and (ws / "gone.txt").exists()
    out = gv.ok("commit", "wk1", "/workspace/replaced").out
    assert "pass --delete" in out and (ws / "replaced" / "new.txt").read_text() == "fresh\n"
    res = gv("commit", "wk1", "--all", "--delete")
    assert res.rc == 1 and "evil" in res.out and "sneaky" in res.out and "outside the workspace" in res.out
    assert not (ws / "gone.txt").exists() and not (ws / "old-name.txt").exists()
    assert (ws / "new-name.txt").read_text() == "renamed\n" and (ws / "hard.txt").read_text() == "hello\n"
    assert oct((ws / "script.sh").stat().st_mode & 0o777) == "0o600"
    assert os.readlink(ws / "readme-link") == "README.md"
    assert sorted(p.name for p in (ws / "replaced").iterdir()) == ["new.txt"]
    assert not (ws / "evil").exists() and not os.path.lexists(ws / "evil")
    left = [c["path"] for w in gv.ok("diff", "wk1", "--format", "json").json() for c in w["changes"]]
    assert sorted(left) == ["evil", "sneaky"]
    res = gv("delete", "wk1")
    assert res.rc != 0 and "2 unreviewed change(s)" in res.err and "--discard-changes" in res.err
    gv.ok("delete", "--discard-changes", "wk1")
    recs = [r for r in records(segments(str(gv.audit_log("wk1")))) if r.get("record") == "filesystem"]
    committed = {r["path"]: r for r in recs if r["event"] == "commit"}
    assert committed["README.md"]["sha256"] and committed["README.md"]["change"] == "modified"
    assert {r["path"] for r in recs if r["event"] == "discard"} == {"evil", "sneaky"}
    report = verify_log(segments(str(gv.audit_log("wk1"))), use_host_pin=False)
    assert report.ok and report.closed, report.problems


def test_host_side_edits_are_conflicts_and_host_symlinks_are_never_followed(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    ws = _workspace(gv, bundles)
    outside = bundles.base.parent / "outside"
    outside.mkdir()
    b = _bundle(gv, bundles, ws, "cd /workspace && echo agent >> README.md && mkdir -p sub && echo x > sub/f")
    res = gv("run", "--bundle", str(b), "wk2")
    assert res.rc == 0
    (ws / "README.md").write_text("edited by a human meanwhile\n")
    # A symlink planted on the host where the agent's directory is to go: never followed.
    (ws / "sub").symlink_to(outside)
    res = gv("commit", "wk2", "--all")
    assert res.rc == 1
    assert "README.md was changed on the host since the container started" in res.out, res.out
    assert "sub" in res.out and "REFUSED" in res.out
    assert (ws / "README.md").read_text() == "edited by a human meanwhile\n"
    assert list(outside.iterdir()) == []
    gv.ok("delete", "--force", "wk2")


def test_auto_commit_and_discard_classes(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    ws = _workspace(gv, bundles)
    rules = [{"paths": ["docs/**"], "action": "commit"}, {"paths": ["**/*.log", "tmp/**"], "action": "discard"}]
    b = _bundle(gv, bundles, ws, "cd /workspace && mkdir -p docs tmp && echo guide > docs/guide.md && "
                                 "echo noise > run.log && echo t > tmp/scratch && echo code > main.py", rules=rules)
    gv("run", "--bundle", str(b), "wk3")
    listed = {c["path"]: c["action"] for w in gv.ok("diff", "wk3", "--format", "json").json() for c in w["changes"]}
    assert listed == {"docs": "commit", "docs/guide.md": "commit", "run.log": "discard", "tmp": "discard",
                      "tmp/scratch": "discard", "main.py": "review"}, listed
    assert not (ws / "docs").exists()
    res = gv("delete", "wk3")
    assert res.rc != 0 and "1 unreviewed" in res.err
    assert not (ws / "docs").exists(), "a refused delete commits nothing"
    gv.ok("commit", "wk3", "/workspace/main.py")
    res = gv.ok("delete", "wk3")
    assert "auto-committed 2 change(s)" in res.err
    assert (ws / "docs" / "guide.md").read_text() == "guide\n" and (ws / "main.py").read_text() == "code\n"
    assert not (ws / "run.log").exists() and not (ws / "tmp").exists()
    recs = [r for r in records(segments(str(gv.audit_log("wk3")))) if r.get("record") == "filesystem"]
    assert {(r["event"], r["path"]) for r in recs} == {
        ("commit", "main.py"), ("commit", "docs"), ("commit", "docs/guide.md"), ("discard", "run.log"),
        ("discard", "tmp"), ("discard", "tmp/scratch")}
    log = next(r for r in recs if r["path"] == "run.log")
    import hashlib
    assert log["sha256"] == hashlib.sha256(b"noise\n").hexdigest() and "discard class" in log["reason"]


def test_review_while_the_container_runs(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    ws = _workspace(gv, bundles)
    b = _bundle(gv, bundles, ws, "cd /workspace && echo draft > plan.md && touch /tmp/ready && sleep 60")
    gv.ok("run", "--detach", "--bundle", str(b), "wk4")
    deadline = time.monotonic() + 20
    while True:
        listed = gv.ok("diff", "wk4", "--format", "json").json()
        if listed[0]["changes"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    gv.ok("commit", "wk4", "/workspace/plan.md")          # recorded through the running monitor
    assert (ws / "plan.md").read_text() == "draft\n"
    events = [json.loads(line) for line in gv.ok("audit", "show", "wk4", "--format", "json").out.splitlines()]
    assert any(e.get("record") == "filesystem" and e["path"] == "plan.md" for e in events)
    gv.ok("delete", "--force", "wk4")
    assert verify_log(segments(str(gv.audit_log("wk4"))), use_host_pin=False).ok


def test_a_workspace_that_is_not_a_directory_is_refused(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = _bundle(gv, bundles, bundles.base.parent / "nowhere", "true")
    res = gv("create", "--bundle", str(b), "wk5")
    assert res.rc == 2 and "/gvm/filesystem/workspaces/0/source" in res.err and "not a directory" in res.err
