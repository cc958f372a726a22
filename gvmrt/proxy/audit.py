"""The sidecar's audit log: one JSON line per decision (issue 3; DESIGN.md §7).

One small interface on purpose: "An audit log that stands up in front of an auditor" will replace
this writer with a hash-chained one, and the server only ever calls `write`.

The file is opened O_APPEND and each line goes out in one write(2), so lines from concurrent
writers never interleave (POSIX: an append write is atomic with respect to the file offset). A
failure raises `AuditError`; the server then refuses the request with 503 (fail closed: a request
that cannot be recorded is not forwarded).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from gvmrt.errors import GvmrtError

__all__ = ["AuditError", "AuditWriter", "record_time"]

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def record_time() -> str:
    """Now, as every record says it: UTC, milliseconds, RFC 3339 ("2026-11-26T01:02:03.456Z")."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class AuditError(GvmrtError):
    """The audit line could not be written (or synced)."""


class AuditWriter:
    """Appends ``json.dumps(entry) + "\\n"`` to `path`; ``sync=True`` also fsyncs before returning.

    Blocking (write/fsync): the server calls it from a worker thread when it syncs (STYLE.md
    habit 8). Safe to call from several threads: each line is a single append write.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot open: {exc.strerror}") from exc

    def write(self, entry: dict[str, Any], *, sync: bool = False) -> None:
        # Keys in the order the writer gives them (deterministic); one encoder for all lines, as
        # json.dumps with arguments builds a new one per call (~5 % of a proxied request).
        line = (_ENCODE(entry) + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                # A short append (disk full mid-line) leaves a torn line; say so rather than retry
                # and interleave the rest with another writer's line.
                raise AuditError(f"audit log {self.path}: short write ({written} of {len(line)} bytes)")
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: {exc.strerror}") from exc

    def write_many(self, entries: list[dict[str, Any]]) -> None:
        """Several lines in one append write (group commit of records that gate nothing)."""
        data = "".join(_ENCODE(e) + "\n" for e in entries).encode()
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise AuditError(f"audit log {self.path}: short write ({written} of {len(data)} bytes)")
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(records: Any) -> list[dict[str, Any]]:
    """One dict per request from the log's records, in decision order: a forwarded request's
    decision record completed by its outcome record (status, bytes, duration; reasons joined).
    Records of other kinds (reloads) pass through. Readers use this; the log keeps both records."""
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
