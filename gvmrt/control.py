"""The control socket of a governed container: a unix socket in its state dir, one JSON object per line.

The monitor serves it (`serve`); `gvmrt events/pending/approve/deny` are its clients (`Client`).
Access: the socket is 0600 in the 0700 state dir, and the monitor checks every peer's uid
(SO_PEERCRED) against the container's owner (or root), so a second user on the machine can
neither read events nor answer anything. The jail never sees it: it is outside the rootfs, and the
jail's network namespace has no path to a unix socket of the host's.

Requests and replies (every reply has "ok", and "error" when it is false):

    {"op": "pending"}                                  -> {"ok": true, "pending": [held request, ...]}
    {"op": "approve", "request_id": ID, "for_s": N?}   -> {"ok": true, "message": "..."}
    {"op": "deny", "request_id": ID}                   -> {"ok": true, "message": "..."}
    {"op": "reload", "egress_json": TEXT}              -> {"ok": true, "old": SHA256, "new": SHA256, "warnings": [...]}
                                                          (TEXT: the policy as canonical JSON, validated by the CLI)
    {"op": "events"}                                   -> {"ok": true}, then one {"event": ...} per line
    {"op": "lifecycle", "event": "started"}            -> {"ok": true} once the step is in the audit log
    {"op": "record", "entries": [filesystem record]}   -> {"ok": true} once they are in the audit log
                                                          ("decision" records, "held" requests) until
                                                          the client closes
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Iterator

__all__ = ["SOCKET", "Client", "ControlError", "serve", "bind"]

SOCKET = "control.sock"
MAX_LINE = 16 << 20     # one request or reply; a reload carries a whole policy (10,000 rules ~ 1 MB)


class ControlError(Exception):
    pass


def policy_text(egress: Any) -> str:
    """A policy's canonical JSON (sorted keys, no spaces): what a reload sends, applies and hashes."""
    return json.dumps(egress, sort_keys=True, separators=(",", ":"))


def _short(directory: str) -> tuple[str, int]:
    """A path to `directory`/control.sock short enough for sun_path (108 bytes), through an O_PATH fd."""
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{SOCKET}", fd


def bind(directory: str) -> socket.socket:
    """The listening socket, 0600 (made by the monitor before it drops privileges)."""
    path, fd = _short(directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return sock


# --- the monitor's side ------------------------------------------------------------------------

async def serve(listener: socket.socket, sidecar: Any, owner: int, reload: Any = None, lifecycle: Any = None,
                record: Any = None) -> Any:
    """Serve the control socket for `sidecar` (a gvmrt.proxy.server.Sidecar); returns the server.
    `await reload(policy_text, uid) -> reply` applies a new policy (the monitor's, which knows the
    rest); `await lifecycle(event, uid) -> reply` records a lifecycle step (gvmrt start)."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        try:
            if uid not in (owner, 0):
                await _reply(writer, {"ok": False, "error": f"uid {uid} may not control this container"})
                return
            while True:
                try:
                    line = await reader.readline()
                except ValueError:      # longer than MAX_LINE
                    await _reply(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                if not line:
                    return
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    await _reply(writer, {"ok": False, "error": f"not a JSON object: {exc}"})
                    continue
                op = msg.get("op")
                if op == "pending":
                    await _reply(writer, {"ok": True, "pending": sidecar.approvals.pending()})
                elif op in ("approve", "deny"):
                    for_s = msg.get("for_s")
                    ok, text = sidecar.approvals.answer(msg.get("request_id"), op == "approve", uid, for_s)
                    await _reply(writer, {"ok": ok, "message": text} if ok else {"ok": False, "error": text})
                elif op == "reload":
                    await _reply(writer, await reload(msg.get("egress_json"), uid))
                elif op == "lifecycle" and lifecycle is not None:
                    await _reply(writer, await lifecycle(msg.get("event"), uid))
                elif op == "record" and record is not None:
                    await _reply(writer, await record(msg.get("entries"), uid))
                elif op == "events":
                    await _stream(reader, writer, sidecar)
                    return
                else:
                    await _reply(writer, {"ok": False, "error": f"unknown op {op!r} (pending, approve, deny, events, "
                                                                f"reload, lifecycle)"})
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def _stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sidecar: Any) -> None:
        q = sidecar.events.subscribe()
        try:
            await _reply(writer, {"ok": True})
            closed = asyncio.ensure_future(reader.read())   # EOF: the client went away
            while True:
                got = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({got, closed}, return_when=asyncio.FIRST_COMPLETED)
                if got not in done:
                    got.cancel()
                    return
                entry = got.result()
                writer.write(json.dumps(entry).encode() + b"\n")
                await writer.drain()
                if entry.get("event") == "overflow":
                    return
        finally:
            sidecar.events.unsubscribe(q)

    return await asyncio.start_unix_server(handle, sock=listener, limit=MAX_LINE)


# --- the client's side -------------------------------------------------------------------------

class Client:
    """One connection to a container's control socket (blocking; for the CLI)."""

    def __init__(self, directory: str, timeout: float | None = 10) -> None:
        path, fd = _short(directory)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot reach the sidecar's control socket: {exc.strerror}") from None
        finally:
            os.close(fd)
        self.file = self.sock.makefile("rb")

    def call(self, **msg: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        line = self.file.readline(MAX_LINE)
        if not line:
            raise ControlError("the sidecar closed the control connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error") or "refused")
        return reply

    def subscribe(self) -> Iterator[dict[str, Any]]:
        """Subscribe now (when this returns, no later record is missed); iterate the result for the
        live records, until the sidecar goes away."""
        self.call(op="events")
        self.sock.settimeout(None)
        return self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        while line := self.file.readline(MAX_LINE * 4):
            yield json.loads(line)

    def close(self) -> None:
        # Shut down first: a thread blocked reading the stream holds the buffered file's lock, and
        # only the end of the stream lets it go (closing the file alone would wait forever).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
