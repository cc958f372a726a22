"""The operator's side of a sidecar: held requests and their answers, temporary allows, live events.

Issue 4. The server holds a RequireApproval request by awaiting `Approvals.hold`; the control
socket (gvmrt.proxy.control) calls `answer`. Everything runs on the sidecar's one event loop, so
an answer is applied whole before the next one is looked at: concurrent approve and deny give
exactly one outcome, and a second answer finds the id no longer held and is refused by name.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Approvals", "Held", "Events", "REQUEST_ID"]

REQUEST_ID = re.compile(r"[0-9a-f]{16}")
_ANSWERED_KEPT = 4096          # outcomes remembered for "already approved" messages
_MAX_FOR_S = 7 * 24 * 3600


@dataclass
class Held:
    request_id: str
    method: str
    host: str
    port: int
    path: str
    body_bytes: int | None
    rule: str | None
    timeout_s: int
    since: float = field(default_factory=time.time)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def public(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "method": self.method, "host": self.host, "port": self.port,
                "path": self.path, "body_bytes": self.body_bytes, "rule": self.rule,
                "held_s": round(time.time() - self.since, 3), "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class Outcome:
    approved: bool
    by: int | None              # uid of the operator, None at the timeout
    reason: str
    for_s: int | None = None


class Approvals:
    def __init__(self, events: Events | None = None) -> None:
        self.held: dict[str, Held] = {}
        self.answered: OrderedDict[str, str] = OrderedDict()
        # (method, host, port, path) -> (expires at, request id that was approved)
        self.allows: dict[tuple[str, str, int, str], tuple[float, str]] = {}
        self.events = events

    def allowed_before(self, method: str, host: str, port: int, path: str) -> str | None:
        """The request id of an approval with --for that covers this exact request, if live."""
        key = (method, host, port, path)
        hit = self.allows.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self.allows[key]
            return None
        return hit[1]

    async def hold(self, held: Held) -> Outcome:
        """Wait for an answer or the timeout (deny)."""
        self.held[held.request_id] = held
        if self.events is not None:
            self.events.publish({"event": "held", **held.public()})
        try:
            return await asyncio.wait_for(asyncio.shield(held.future), held.timeout_s)
        except TimeoutError:
            if held.future.done() and not held.future.cancelled():
                return held.future.result()      # answered in the very moment the timeout fired
            self._done(held.request_id, "timed out")
            return Outcome(False, None, f"approval not given within {held.timeout_s} s")
        finally:
            self.held.pop(held.request_id, None)

    def answer(self, request_id: str, approve: bool, by: int, for_s: int | None = None,
               reason: str | None = None) -> tuple[bool, str]:
        """(True, what happened) or (False, why not). Idempotence is refused, not assumed."""
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            return False, f"{request_id!r} is not a request id (16 hex digits, as in X-Gvm-Request-Id and `gvmrt pending`)"
        if for_s is not None and (not approve or not isinstance(for_s, int) or not 0 < for_s <= _MAX_FOR_S):
            return False, "--for goes with approve, as a duration from 1 s to 7 days"
        held = self.held.get(request_id)
        if held is None or held.future.done():
            before = self.answered.get(request_id)
            if before is not None:
                return False, f"request {request_id} was {before} already; an answer is given once"
            return False, f"no request {request_id} is held by this container (see `gvmrt pending`)"
        verb = "approved" if approve else "denied"
        if approve and for_s:
            key = (held.method, held.host, held.port, held.path)
            self.allows[key] = (time.monotonic() + for_s, request_id)
        text = reason or f"{verb} by uid {by}"
        held.future.set_result(Outcome(approve, by, text, for_s))
        self._done(request_id, f"{verb} by uid {by}")
        return True, f"request {request_id} {verb}" + (f"; identical requests allowed for {for_s} s" if for_s else "")

    def _done(self, request_id: str, what: str) -> None:
        self.answered[request_id] = what
        while len(self.answered) > _ANSWERED_KEPT:
            self.answered.popitem(last=False)

    def pending(self) -> list[dict[str, Any]]:
        return [h.public() for h in sorted(self.held.values(), key=lambda h: h.since) if not h.future.done()]


class Events:
    """Fan-out of decision records to live subscribers (gvmrt events --follow, approve --interactive).

    Each subscriber gets a bounded queue; one that falls behind is dropped with a last
    {"event": "overflow"} rather than growing the sidecar's memory.
    """

    QUEUE = 1024

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(self.QUEUE)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)

    def publish(self, entry: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(entry)
            except asyncio.QueueFull:
                self.subscribers.discard(q)
                q.get_nowait()   # make room for the last word
                q.put_nowait({"event": "overflow", "reason": "subscriber too slow; reconnect"})
