"""`gvmrt diff` and `gvmrt commit`: what the agent wrote in its workspaces, reviewed and applied
(issue 7; spec/filesystem.md). The work is gvmrt.review's and gvmrt.workspace's."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer

from gvmrt.cli.common import check_format, root
from gvmrt.errors import GvmrtError, UsageError



def _load(cid: str) -> tuple[str, dict[str, Any], Any]:
    """(state dir, full state, workspaces) of a container that has workspaces."""
    from gvmrt.review import workspaces
    from gvmrt.runtime import Runtime, resolve_target
    from gvmrt.statedir import read_state
    rt = Runtime(root())
    cid, _ = resolve_target(cid)
    sdir = rt.root.dir(cid)
    rt.root.check(sdir) if os.path.isdir(sdir) else None
    st = read_state(sdir, cid)
    wss = workspaces(st, rt.root.data_dir(cid))
    if not wss:
        raise UsageError(f"container {cid!r} has no workspaces (gvm.filesystem.workspaces in its config.json)")
    return sdir, st, wss


_MARK = {"added": "A", "modified": "M", "deleted": "D"}


def diff(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    path: Optional[str] = typer.Argument(None, metavar="[PATH]", help="one path (as the container sees it): a "
                                                                        "unified diff of it"),
    fmt: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """The agent's changes to its workspaces: added, modified, deleted, with the action its policy gives each."""
    check_format(fmt)
    from gvmrt.review import locate
    from gvmrt.workspace import unified_diff
    from gvmrt.cli.operator import _printable
    _sdir, st, wss = _load(cid)
    if path is not None:
        ws, rel = locate(wss, path)
        text = unified_diff(ws.source, ws.upper, rel, ws.destination.strip("/"))
        if fmt == "json":
            print(json.dumps({"workspace": ws.destination, "path": rel, "diff": text}))
        else:
            sys.stdout.write(text)
        return
    out = [ws.to_json() for ws in wss]
    if fmt == "json":
        print(json.dumps(out, indent=2))
        return
    for w in out:
        print(f"workspace {w['workspace']} (host {w['source']}): {len(w['changes'])} change(s)")
        for c in w["changes"]:
            what = f"{c['type']}" + (f", {c['size']} bytes" if c["type"] == "file" and c["change"] != "deleted" else "")
            detail = f" ({c['detail']})" if c.get("detail") and c["detail"] != "content" else ""
            rule = f" by {c['rule']}" if c.get("rule") else ""
            # Names are the agent's: escaped, so none can move the cursor or fake a line.
            print(f"  {_MARK[c['change']]} {_printable(c['path'])}{'/' if c['type'] == 'dir' else ''}  "
                  f"[{what}{detail}]  {c['action']}{_printable(rule)}")


def commit(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    paths: Optional[list[str]] = typer.Argument(None, metavar="[PATH...]", help="paths as the container sees them "
                                                                                 "(a directory: all below it)"),
    all_: bool = typer.Option(False, "--all", help="every change not in a discard class"),
    delete: bool = typer.Option(False, "--delete", help="apply deletions too (never without it)"),
    fmt: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Apply the agent's changes to the host workspace: atomically per file, never through a symlink,
    refusing a file the host changed since the container started (the conflict is named)."""
    check_format(fmt)
    if not paths and not all_:
        raise UsageError("commit: name the PATHs to apply, or --all")
    from gvmrt.review import apply, select
    from gvmrt.statedir import Lock
    sdir, st, wss = _load(cid)
    chosen = select(wss, paths or [], all_)
    if not chosen:
        raise UsageError(f"commit: no change matches {' '.join(paths or []) or '--all'} (see `gvmrt diff {cid}`)")
    with Lock(sdir, st["id"]):
        res = apply(sdir, st, chosen, delete, os.getuid(), "gvmrt commit")
    from gvmrt.cli.operator import _printable
    if fmt == "json":
        print(json.dumps(res, indent=2))
    else:
        for c in res["committed"]:
            print(f"committed {_MARK[c['change']]} {c['workspace']}/{_printable(c['path'])}"
                  + (f"  sha256 {c['sha256'][:16]}" if c.get("sha256") else ""))
        for p in res["deletions_skipped"]:
            print(f"skipped   D {_printable(p)}  (a deletion: pass --delete)")
        for p in res["conflicts"]:
            print(f"REFUSED   {_printable(p)}")
        if any(c["path"].startswith(".git/") or c["path"] == ".git" for c in res["committed"]):
            print("note: files under .git/ were committed (hooks and config run code at your next git command)")
    if res["conflicts"]:
        raise GvmrtError(f"{len(res['conflicts'])} change(s) not committed; the others were")
