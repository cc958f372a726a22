"""Reading a log: its segment files in order, and its records as dicts.

A container's log is `<dir>/<id>.jsonl`, continued after a size-based rotation in
`<id>.jsonl.2`, `<id>.jsonl.3`, ... (spec/audit.md, Rotation). Readers here are tolerant: a torn
last line (a crash mid-write) is skipped; `gvmrt.audit.verify` is the strict reader.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Iterator

from gvmrt.errors import UsageError

__all__ = ["segments", "records", "merge", "resolve"]

_PART = re.compile(r"\.jsonl\.([0-9]+)$")


def segments(path: str) -> list[str]:
    """The files of the log that `path` names, oldest first: `path` itself if it is a rotated part
    (`x.jsonl.3`), else `x.jsonl` and then its parts `x.jsonl.2`, `x.jsonl.3`, ... that exist."""
    if _PART.search(path):
        return [path]
    directory, base = os.path.split(os.path.abspath(path))
    parts = []
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    for name in names:
        if name.startswith(base + "."):
            m = _PART.search(name)
            if m and name[:m.start()] + ".jsonl" == base:
                parts.append((int(m.group(1)), os.path.join(directory, name)))
    return [path] + [p for _, p in sorted(parts)]


def is_part(path: str) -> bool:
    """A rotated segment's file (x.jsonl.N), not a log's first file."""
    return _PART.search(path) is not None


def part_path(path: str, n: int) -> str:
    """The file of segment `n` (1-based) of the log whose first segment is `path`."""
    return path if n == 1 else f"{path}.{n}"


def records(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every complete record of the files, in order; a line that is not JSON (a torn tail) is skipped."""
    for path in paths:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            continue
        with f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec


def resolve(target: str, root: str | None = None) -> list[str]:
    """The segment files of `target`: a log file's path, or a container id (live or deleted) whose
    log is in the audit directory of the state root `root`."""
    if os.sep in target or target.endswith(".jsonl") or _PART.search(target) or os.path.isfile(target):
        if not os.path.isfile(target):
            raise UsageError(f"{target}: no such log file")
        return segments(target)
    from gvmrt.statedir import StateRoot, validate_id
    path = StateRoot(root).audit_path(validate_id(target))
    if not os.path.isfile(path):
        raise UsageError(f"no audit log for container {target!r} (looked for {path}); pass the log file's path")
    return segments(path)


def merge(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per request from the log's records, in decision order: a forwarded request's
    decision record completed by its outcome record (status, bytes, duration; reasons joined).
    Records of other kinds (lifecycle, seals) pass through. Readers use this; the log keeps both."""
    out: list[dict[str, Any]] = []
    by_id: dict[Any, dict[str, Any]] = {}
    for rec in records:
        if rec.get("record") == "outcome":
            dec = by_id.get(rec.get("request_id"))
            if dec is None:
                out.append(rec)                 # its decision is not in this file (rotated, torn)
                continue
            for key in ("status", "bytes_in", "bytes_out", "duration_ms"):
                dec[key] = rec.get(key)
            dec["flagged"] = bool(dec.get("flagged")) or bool(rec.get("flagged"))
            if rec.get("reason"):
                dec["reason"] = f"{dec['reason']}; {rec['reason']}" if dec.get("reason") else rec["reason"]
            if rec.get("credential"):
                dec["credential"] = rec["credential"]
            continue
        rec = dict(rec)
        if rec.get("record") == "decision":
            by_id[rec.get("request_id")] = rec
        out.append(rec)
    return out
