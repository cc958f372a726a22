"""The monitor's appender: the chain (gvmrt.audit.chain) on disk, durably where it must be.

- Every `append` is one write(2) to a file opened O_APPEND, so a line is either whole or the torn
  tail of a crash; on a failed or short write the line is cut off again (ftruncate) and the
  chain forgets it, so the log never skips a number. The caller gets `AuditError` and refuses the
  request (fail closed); the next append that works first records the outage.
- `durable(seq)` waits until an fdatasync covers entry `seq`. Concurrent waiters share one
  (group commit): each durable append costs at most its own fsync, plus the end of one already
  running. Entries nobody waits for are synced at the latest by the next `tick` (SYNC_INTERVAL):
  that is the bounded window a power loss can take, and `verify` reports it as an unsealed or
  missing tail, never as a gap.
- Batches are sealed every SEAL_INTERVAL, at BATCH_MAX entries, before a rotation and at close.
- Size-based rotation: past `max_segment_bytes` the batch is sealed and the log continues in the
  next segment file (`<path>.2`, ...), whose first entry links to the last one of the previous file.
- An fsync failure is permanent (Linux may have dropped the dirty pages: nothing later can be
  trusted to be on disk); every later append is refused.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import time
from typing import Any, Callable

from gvmrt.audit.chain import Chain, Entry
from gvmrt.audit.read import part_path
from gvmrt.errors import GvmrtError

__all__ = ["AuditError", "AuditLog", "record_time", "open_segment"]

SEAL_INTERVAL = 1.0
SYNC_INTERVAL = 1.0
BATCH_MAX = 4096
MAX_SEGMENT_BYTES = 64 * 1024 * 1024


class AuditError(GvmrtError):
    """The audit log could not be written (or synced): the request it was for must be refused."""


_second: list[Any] = [None, ""]     # the last whole second formatted, and its text


def record_time() -> str:
    """Now, as every record says it: UTC, milliseconds, RFC 3339 ("2026-11-26T01:02:03.456Z")."""
    ms = int(time.time() * 1000)
    second, rest = divmod(ms, 1000)
    if second != _second[0]:
        # strftime once per second, not per record (two records per proxied request)
        _second[0], _second[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{rest:03d}Z"


def open_segment(path: str, n: int) -> int:
    """Create segment `n` of the log `path` (never an existing file: a log is only ever appended)."""
    return os.open(part_path(path, n), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                   | os.O_NOFOLLOW, 0o600)


class AuditLog:
    """One container's log. Not thread-safe: the monitor's event loop is its only caller (the
    fdatasync runs in a worker thread on a descriptor nothing else closes meanwhile).

    `signer` (gvmrt.audit.keys.Signer) signs seals; without one the log is unsigned. `opener(path,
    n) -> fd` creates the segment files of rotations (a root monitor that dropped its privileges
    gets them from a helper that kept them). `on_status(dict)` hears when the log starts and stops failing.
    """

    def __init__(self, path: str | os.PathLike[str], *, container: str, signer: Any = None,
                 max_segment_bytes: int = MAX_SEGMENT_BYTES, batch_max: int = BATCH_MAX,
                 opener: Callable[[str, int], int] = open_segment,
                 on_status: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = os.fspath(path)
        self.container = container
        self.max_segment_bytes = max_segment_bytes
        self.batch_max = batch_max
        self._opener = opener
        self.on_status = on_status
        self.log_id = secrets.token_hex(16)
        self.signed = signer is not None
        self.chain = Chain(self.log_id, signer.sign if signer else None, signer.key if signer else None)
        self.segment = 1
        try:
            self._fd = open_segment(self.path, 1)      # by us, with our rights (before any drop)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot create: {exc.strerror}") from exc
        self.size = 0
        self.fsyncs = 0                 # fdatasync calls made (the benchmark counts them)
        self._durable = -1              # every entry up to this seq is on disk
        self._flush: asyncio.Future[None] | None = None
        self._retired: list[int] = []   # descriptors of rotated segments a running flush still uses
        self._batch_started = time.monotonic()
        self.failed: str | None = None  # permanent failure
        self._outage: dict[str, Any] | None = None
        self._rotate_pending = False    # the segment is full: the next append starts a new one
        self._need_header = False       # a new segment still lacks its header
        self._pubkey = base64.b64encode(signer.public_raw).decode() if signer else None
        self.append({"record": "log", "time": record_time(), "log": self.log_id, "container": container,
                     "segment": 1, "key": self.chain.key, "pubkey": self._pubkey})

    @classmethod
    def resume(cls, path: str, *, signer: Any = None) -> AuditLog:
        """Continue a log whose monitor is gone (to record what `gvmrt commit` or `delete` did
        after the container stopped): its chain, open batch and last seal are read back from the
        last segment, and it goes on from there. Refused if the log ends torn or is signed by a
        key other than `signer`'s. The caller must be the only writer (the monitor has exited)."""
        from gvmrt.audit.read import segments
        from gvmrt.audit.verify import parse_line
        last = segments(path)[-1]
        header: dict[str, Any] | None = None
        prev, seq, root = None, -1, None
        leaves: list[bytes] = []
        first = 0
        size = 0
        with open(last, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    raise AuditError(f"audit log {last}: it ends with a torn line; run `gvmrt audit verify` on it")
                obj, h, problem = parse_line(raw)
                if problem is not None or obj is None or h is None:
                    raise AuditError(f"audit log {last}: line {seq + 2 if seq >= 0 else 1} does not verify ({problem}); "
                                     "not appending to it")
                size += len(raw)
                seq, prev = obj["seq"], h
                if obj.get("record") in ("log", "segment") and header is None:
                    header = obj
                if obj.get("record") == "seal":
                    root, leaves, first = obj.get("root"), [], seq + 1
                else:
                    leaves.append(bytes.fromhex(h))
        if header is None or prev is None:
            raise AuditError(f"audit log {last}: no header; not appending to it")
        if root is None:
            # No seal in this segment yet (a monitor that died right after a rotation): its open
            # batch began with the segment's header, and chains to the previous segment's last seal.
            first = header["seq"]
            parts = segments(path)
            if len(parts) > 1:
                with open(parts[-2], "rb") as f:
                    for raw in f:
                        obj, _h, problem = parse_line(raw)
                        if problem is None and obj is not None and obj.get("record") == "seal":
                            root = obj.get("root")
        key = header.get("key")
        if key is not None and (signer is None or signer.key != key):
            raise AuditError(f"audit log {last}: signed by key {key}; its private key is needed to continue it "
                             f"({'another key was given' if signer is not None else 'none is configured'})")
        self = cls.__new__(cls)
        self.path = path
        self.container = header.get("container", "")
        self.max_segment_bytes = MAX_SEGMENT_BYTES
        self.batch_max = BATCH_MAX
        self._opener = open_segment
        self.on_status = None
        self.log_id = header.get("log")
        self.signed = key is not None
        self.chain = Chain(self.log_id, signer.sign if key is not None else None, key, seq=seq + 1, prev=prev,
                           prev_root=root or "0" * 64)
        self.chain.first, self.chain.leaves = first, leaves
        self.segment = int(header.get("segment") or 1)
        self._pubkey = header.get("pubkey")
        try:
            self._fd = os.open(last, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditError(f"audit log {last}: cannot append: {exc.strerror}") from None
        self.size = size
        self.fsyncs = 0
        self._durable = seq
        self._flush = None
        self._retired = []
        self._batch_started = time.monotonic()
        self.failed = None
        self._outage = None
        self._rotate_pending = False
        self._need_header = False
        return self

    # --- appending -------------------------------------------------------------------------

    def append(self, entry: Entry) -> int:
        """Chain and write one entry (a dict gains v, seq, prev, h; see chain.Rendered for the
        other kind); its seq. Raises AuditError."""
        self._check()
        mark = self.chain.mark()
        try:
            data = self.chain.append(entry)
            seq = self.chain.seq - 1
            if len(self.chain.leaves) >= self.batch_max:
                data += self._seal_line()
        except BaseException:
            self.chain.rollback(mark)   # e.g. an entry that cannot be encoded, a signer that fails
            raise
        self._write(data, mark)
        return seq

    def append_many(self, entries: list[Entry]) -> int:
        """Several entries in one write (records that gate nothing); the last one's seq."""
        self._check()
        mark = self.chain.mark()
        parts = []
        try:
            for e in entries:
                parts.append(self.chain.append(e))
                if len(self.chain.leaves) >= self.batch_max:
                    parts.append(self._seal_line())
        except BaseException:
            # Nothing of the batch is written, so the chain must not count any of it: a later
            # line would link to entries the log never got.
            self.chain.rollback(mark)
            raise
        self._write(b"".join(parts), mark)
        return self.chain.seq - 1

    def seal(self) -> None:
        """Seal the open batch now (if it has entries)."""
        self._check()
        mark = self.chain.mark()
        try:
            line = self._seal_line()
        except BaseException:
            self.chain.rollback(mark)
            raise
        if line:
            self._write(line, mark)

    def _seal_line(self) -> bytes:
        self._batch_started = time.monotonic()
        return self.chain.seal(record_time()) or b""

    def _check(self) -> None:
        """Before an entry: what must come first (a rotation, a segment header, the record of an
        outage); an AuditError from any of them refuses the entry, which is not written."""
        if self.failed is not None:
            raise AuditError(self.failed)
        if self._rotate_pending:
            self._rotate()
        if self._need_header:
            mark = self.chain.mark()
            # Each segment names its key too, so one file alone can be checked.
            self._write(self.chain.append({"record": "segment", "time": record_time(), "log": self.log_id,
                                           "container": self.container, "segment": self.segment,
                                           "key": self.chain.key, "pubkey": self._pubkey}), mark)
            self._need_header = False
        if self._outage is not None:
            # The first write that works says what the log missed (a failure here counts in it).
            mark = self.chain.mark()
            self._write(self.chain.append({"record": "lifecycle", "event": "audit_recovered",
                                           "time": record_time(), **self._outage}), mark)
            self._outage = None
            if self.on_status:
                self.on_status({"audit": "ok"})

    def _write(self, data: bytes, mark: tuple[Any, ...]) -> None:
        try:
            written = os.write(self._fd, data)
            problem = None if written == len(data) else f"short write ({written} of {len(data)} bytes)"
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem is None:
            self.size += len(data)
            if self.size >= self.max_segment_bytes and not self._need_header:
                self._rotate_pending = True
            return
        # Nothing of it counts: forget it in the chain and cut any torn part off the file.
        self.chain.rollback(mark)
        reason = f"audit log {self._segment_path()}: {problem}"
        try:
            os.ftruncate(self._fd, self.size)
        except OSError as exc:
            self._fail(f"{reason}; and cannot cut the torn line off: {exc.strerror}")
        else:
            if self._outage is None:
                self._outage = {"since": record_time(), "reason": reason, "refused": 0}
            self._outage["refused"] += 1
            if self.on_status:
                self.on_status({"audit": "failing", "reason": reason})
        raise AuditError(reason)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        if self.on_status:
            self.on_status({"audit": "failed", "reason": reason})

    def _segment_path(self) -> str:
        return part_path(self.path, self.segment)

    # --- durability ------------------------------------------------------------------------

    async def durable(self, seq: int) -> None:
        """Return once entry `seq` is on disk; AuditError if it cannot be."""
        while self._durable < seq:
            if self.failed is not None:
                raise AuditError(self.failed)
            if self._flush is None:
                self._flush = asyncio.ensure_future(self._do_flush())
            await asyncio.shield(self._flush)

    async def _do_flush(self) -> None:
        target, fd = self.chain.seq - 1, self._fd
        try:
            await asyncio.to_thread(os.fdatasync, fd)
            self.fsyncs += 1
        except OSError as exc:
            self._fail(f"audit log {self._segment_path()}: fsync: {exc.strerror}")
            raise AuditError(self.failed) from exc
        finally:
            # Not closing retired descriptors here: if this task is cancelled (shutdown), the
            # thread may still be in fdatasync on one. They are closed by the next rotation with
            # no flush running, or by close() (after the loop and its threads are gone).
            self._flush = None
        self._durable = max(self._durable, target)

    def sync(self) -> None:
        """Blocking fdatasync of everything written (rotation, close, a caller without a loop)."""
        if self.failed is not None:
            raise AuditError(self.failed)
        try:
            os.fdatasync(self._fd)
            self.fsyncs += 1
        except OSError as exc:
            self._fail(f"audit log {self._segment_path()}: fsync: {exc.strerror}")
            raise AuditError(self.failed) from exc
        self._durable = self.chain.seq - 1

    async def tick(self) -> None:
        """The periodic part: seal a batch older than SEAL_INTERVAL, sync what nobody waited for."""
        if self.failed is not None:
            return
        try:
            if self.chain.leaves and time.monotonic() - self._batch_started >= SEAL_INTERVAL:
                self.seal()
            if self._durable < self.chain.seq - 1:
                await self.durable(self.chain.seq - 1)
        except AuditError:
            pass            # the next request that needs the log hears it

    async def run(self) -> None:
        """`tick` forever (the monitor runs it as a task)."""
        while True:
            await asyncio.sleep(min(SEAL_INTERVAL, SYNC_INTERVAL))
            await self.tick()

    # --- rotation and close ----------------------------------------------------------------

    def _rotate(self) -> None:
        """Seal and sync the full segment, then continue in the next file (its header is written
        by _check). Each step is checked: a failure refuses the entry that asked, and the next
        append tries again from where this one stopped."""
        mark = self.chain.mark()
        line = self._seal_line()
        if line:
            self._write(line, mark)
        self.sync()
        try:
            fd = self._opener(self.path, self.segment + 1)
        except OSError as exc:
            raise AuditError(f"audit log {self.path}: cannot start segment {self.segment + 1}: "
                             f"{exc.strerror}") from None
        old, self._fd = self._fd, fd
        self.segment += 1
        self._retired.append(old)
        if self._flush is None:
            while self._retired:
                os.close(self._retired.pop())
        self.size = 0
        self._rotate_pending = False
        self._need_header = True

    def close(self, reason: str = "stopped") -> None:
        """Record the end, seal, sync and close. Best effort: a failing log is closed as it is."""
        if self._fd < 0:
            return
        try:
            self.append({"record": "close", "time": record_time(), "log": self.log_id, "reason": reason})
            self.seal()
            self.sync()
        except AuditError:
            pass
        finally:
            os.close(self._fd)
            self._fd = -1
            while self._retired:
                os.close(self._retired.pop())

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
