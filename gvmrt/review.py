"""Reviewing what the agent wrote: the workspaces of a container, their changes classified by
gvm.filesystem, commits and discards, each recorded in the container's audit log (issue 7).

The records go through the monitor while it runs (it is the log's only writer); once it has
exited, the log is resumed here (gvmrt.audit.writer.AuditLog.resume), under the container's lock.
Stdlib only until a change has to be recorded (delete imports this).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from gvmrt.errors import GvmrtError, StateError
from gvmrt.workspace import Change, CommitError, classify, changes, commit, file_sha256, load_baseline, save_baseline

__all__ = ["Workspace", "workspaces", "select", "apply", "settle", "record"]


class Workspace:
    def __init__(self, i: int, w: dict[str, Any], data: str, policy: dict[str, Any]) -> None:
        self.index = i
        self.source, self.destination, self.upper = w["source"], w["destination"], w["upper"]
        self.baseline_path = os.path.join(data, "workspaces", str(i), "baseline.json")
        self.rules = policy.get("rules") or []
        self.default = policy.get("default") or "review"

    def changes(self) -> list[tuple[Change, str, str | None]]:
        """(change, action, the rule's glob) for each change, in path order."""
        return [(c, *classify(c.path, self.rules, self.default)) for c in changes(self.source, self.upper)]

    def to_json(self) -> dict[str, Any]:
        return {"workspace": self.destination, "source": self.source,
                "changes": [{**c.value(), "action": a, "rule": g} for c, a, g in self.changes()]}


def workspaces(st: dict[str, Any], data: str) -> list[Workspace]:
    return [Workspace(i, w, data, st.get("fs_policy") or {}) for i, w in enumerate(st.get("workspaces") or ())]


def locate(wss: list[Workspace], path: str) -> tuple[Workspace, str]:
    """A path as the jail sees it (/workspace/src/a.py) or relative to the only workspace."""
    if path.startswith("/"):
        for ws in wss:
            d = ws.destination.rstrip("/")
            if path == d or path.startswith(d + "/"):
                return ws, path[len(d) + 1:]
        raise GvmrtError(f"{path}: not in a workspace ({', '.join(w.destination for w in wss)})")
    if len(wss) != 1:
        raise GvmrtError(f"{path}: give the path as the container sees it ({', '.join(w.destination for w in wss)})")
    return wss[0], path.strip("/")


def select(wss: list[Workspace], paths: list[str], all_: bool) -> list[tuple[Workspace, Change, str]]:
    """The changes `paths` name (a directory names everything below it), or with `all_` every
    change not in a discard class; (workspace, change, action)."""
    out = []
    wanted = [locate(wss, p) for p in paths]
    for ws in wss:
        for c, action, _g in ws.changes():
            if all_:
                if action != "discard":
                    out.append((ws, c, action))
                continue
            for w, rel in wanted:
                if w is ws and (rel == "" or c.path == rel or c.path.startswith(rel + "/")):
                    out.append((ws, c, action))
                    break
    return out


def apply(sdir: str, st: dict[str, Any], chosen: list[tuple[Workspace, Change, str]], delete: bool, uid: int,
          reason: str) -> dict[str, Any]:
    """Commit the chosen changes (deletions only with `delete`); each commit recorded."""
    done, problems, skipped = [], [], []
    bases: dict[str, dict[str, list[int]]] = {}
    records = []
    for ws, c, _action in chosen:
        base = bases.setdefault(ws.baseline_path, load_baseline(ws.baseline_path))
        if c.kind == "deleted" and not delete:
            skipped.append(f"{ws.destination}/{c.path}")
            continue
        try:
            digest = commit(ws.source, ws.upper, c, base, allow_delete=delete)
        except (CommitError, OSError) as exc:
            problems.append(f"{ws.destination}/{c.path}: {exc}")
            continue
        done.append({"workspace": ws.destination, **c.value(), "sha256": digest})
        records.append(_entry("commit", ws, c, digest, uid, reason))
    for path, base in bases.items():
        save_baseline(path, base)
    if records:
        record(sdir, st, records)
    return {"committed": done, "conflicts": problems, "deletions_skipped": skipped}


def _entry(event: str, ws: Workspace, c: Change, digest: str | None, uid: int, reason: str) -> dict[str, Any]:
    return {"record": "filesystem", "event": event, "time": _now(), "workspace": ws.destination, "path": c.path,
            "change": c.kind, "type": c.type, "sha256": digest, "by_uid": uid, "reason": reason}


def _now() -> str:
    from gvmrt.audit.writer import record_time
    return record_time()


def settle(sdir: str, data: str, st: dict[str, Any], discard_all: bool, notify: Callable[[str], None]) -> None:
    """At delete: commit what the policy auto-commits, drop what it discards; refuse (StateError)
    to drop changes held for review, unless `discard_all` (delete --force / --discard-changes)."""
    wss = workspaces(st, data)
    pending = [(ws, c, a) for ws in wss for c, a, _g in ws.changes()]
    if not pending:
        return
    review = [(ws, c) for ws, c, a in pending if a == "review"]
    if review and not discard_all:
        where = ", ".join(sorted({ws.destination for ws, _c in review}))
        raise StateError(f"container {st['id']!r} has {len(review)} unreviewed change(s) in {where}: "
                         f"`gvmrt diff {st['id']}`, then `gvmrt commit {st['id']} PATH...|--all`, or delete with "
                         "--discard-changes")
    uid = os.getuid()
    auto = [(ws, c, a) for ws, c, a in pending if a == "commit"]
    if auto:
        res = apply(sdir, st, auto, delete=True, uid=uid, reason="auto-commit class (gvm.filesystem.rules)")
        if res["committed"]:
            notify(f"auto-committed {len(res['committed'])} change(s) by gvm.filesystem.rules")
        if res["conflicts"] and not discard_all:
            # Not silently lost: what an auto-commit could not apply is held like any review.
            raise StateError(f"container {st['id']!r}: {len(res['conflicts'])} change(s) of an auto-commit class "
                             f"could not be applied ({res['conflicts'][0]}); review them with `gvmrt diff "
                             f"{st['id']}`, or delete with --discard-changes")
    left = {(ws.destination, c.path) for ws in wss for c, _a, _g in ws.changes()} if auto else None
    dropped = [(ws, c, a) for ws, c, a in pending
               if (a == "discard" or (a == "review" and discard_all)
                   or (a == "commit" and discard_all and left is not None and (ws.destination, c.path) in left))]
    if dropped:
        record(sdir, st, [_entry("discard", ws, c, file_sha256(ws.upper, c.path)
                                 if c.type == "file" and c.kind != "deleted" else None, uid,
                                 "discard class (gvm.filesystem.rules)" if a == "discard" else "delete discarded it")
                          for ws, c, a in dropped])


def record(sdir: str, st: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Put filesystem records in the container's audit log: through its monitor if it runs, else
    by resuming the log. A change that cannot be recorded was still made: say so loudly."""
    side = st.get("sidecar") or {}
    if not side.get("audit"):
        return
    from gvmrt.control import Client, ControlError
    from gvmrt.runtime import monitor_alive
    try:
        with Client(sdir, timeout=10) as c:
            c.call(op="record", entries=entries)
            return
    except (ControlError, OSError) as exc:
        if monitor_alive(side):
            # Never two writers: a monitor that is there but cannot record has the last word.
            raise GvmrtError(f"the change was made but its monitor could not record it: {exc}") from None
    from gvmrt.audit.keys import load_private
    from gvmrt.audit.writer import AuditError, AuditLog
    signer = load_private(side["audit_key"]) if side.get("audit_key") else None
    try:
        log = AuditLog.resume(side["audit"], signer=signer)
    except (AuditError, OSError) as exc:
        raise GvmrtError(f"the change was made but could not be recorded in {side['audit']}: {exc}") from None
    try:
        log.append({"record": "lifecycle", "event": "reopened", "time": _now(), "by_uid": os.getuid(),
                    "reason": "filesystem review after the monitor exited"})
        for e in entries:
            log.append(e)
    finally:
        log.close("filesystem review recorded")
