"""DNS for a governed jail, sans I/O: a strict query parser, answers, and a tunnelling detector (issue 4).

The jail's port 53 (UDP and TCP, any address: the local routes capture it like HTTP) reaches the
sidecar, which answers from its own resolution. Only what a stub resolver sends is accepted: one
question, class IN, no answer/authority records, at most one additional (an EDNS OPT), and no
compression in the question. Anything else is FORMERR (or dropped, when not even a header).
"""

from __future__ import annotations

import ipaddress
import struct
import time
from dataclasses import dataclass

__all__ = ["Query", "DNSError", "parse", "answer", "error_reply", "Tunnelling", "QTYPES",
           "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"]

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
A, AAAA, OPT = 1, 28, 41
QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
          65: "HTTPS", 255: "ANY"}
MAX_UDP = 512
_LABEL_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class DNSError(Exception):
    """A query to refuse: `rcode` to answer with, or None to drop it (no usable header)."""

    def __init__(self, rcode: int | None, reason: str, qid: int = 0, header: bytes = b"") -> None:
        super().__init__(reason)
        self.rcode, self.reason, self.qid, self.header = rcode, reason, qid, header


@dataclass(frozen=True)
class Query:
    qid: int
    flags: int
    name: str            # lower case, no trailing dot; "" is the root
    qtype: int
    question: bytes      # the question section as received (echoed in replies)

    @property
    def type_name(self) -> str:
        return QTYPES.get(self.qtype, f"TYPE{self.qtype}")


def parse(msg: bytes) -> Query:
    if len(msg) < 12:
        raise DNSError(None, "shorter than a DNS header")
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    if flags & 0x8000:
        raise DNSError(None, "a response, not a query", qid)
    if (flags >> 11) & 0xF:
        raise DNSError(NOTIMP, "opcode other than QUERY", qid, msg[:12])
    if qd != 1 or an or ns or ar > 1:
        raise DNSError(FORMERR, f"{qd} questions, {an} answers, {ns} authority, {ar} additional records "
                                "(a query has one question and at most an EDNS record)", qid, msg[:12])
    pos, labels = 12, []
    total = 0
    while True:
        if pos >= len(msg):
            raise DNSError(FORMERR, "question name runs past the message", qid, msg[:12])
        n = msg[pos]
        if n & 0xC0:
            raise DNSError(FORMERR, "compression or extended label in the question", qid, msg[:12])
        pos += 1
        if n == 0:
            break
        label = msg[pos:pos + n]
        if len(label) < n:
            raise DNSError(FORMERR, "truncated label", qid, msg[:12])
        total += n + 1
        if total > 254:
            raise DNSError(FORMERR, "name longer than 255 bytes", qid, msg[:12])
        if not all(c in _LABEL_BYTES for c in label):
            # Letters, digits, '-' and '_' only: a '.', NUL or control byte inside a label would
            # reach resolvers, records and an operator's terminal as something else.
            raise DNSError(FORMERR, "a label with bytes other than letters, digits, '-' and '_'", qid, msg[:12])
        labels.append(label)
        pos += n
    if pos + 4 > len(msg):
        raise DNSError(FORMERR, "question without type and class", qid, msg[:12])
    qtype, qclass = struct.unpack("!HH", msg[pos:pos + 4])
    question = msg[12:pos + 4]
    pos += 4
    if qclass != 1:
        raise DNSError(NOTIMP, f"class {qclass} (only IN)", qid, msg[:12])
    if ar:
        # EDNS: root name, type OPT, then class/ttl/rdlength/rdata; nothing after it.
        if msg[pos:pos + 3] != b"\x00\x00\x29" or pos + 11 > len(msg):
            raise DNSError(FORMERR, "the additional record is not an EDNS OPT", qid, msg[:12])
        rdlen = struct.unpack("!H", msg[pos + 9:pos + 11])[0]
        pos += 11 + rdlen
    if pos != len(msg):
        raise DNSError(FORMERR, "bytes after the question", qid, msg[:12])
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        raise DNSError(FORMERR, "non-ASCII name", qid, msg[:12]) from None
    return Query(qid, flags, name, qtype, question)


def _header(qid: int, flags: int, rcode: int, an: int, qd: int = 1) -> bytes:
    rd = flags & 0x0100
    return struct.pack("!HHHHHH", qid, 0x8000 | rd | 0x0080 | rcode, qd, an, 0, 0)


def answer(q: Query, addresses: list[str], ttl: int = 60, rcode: int = NOERROR) -> bytes:
    """A reply with the addresses of the asked type (A or AAAA) as answers."""
    records = []
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if q.qtype == A and ip.version == 4 or q.qtype == AAAA and ip.version == 6:
            rdata = ip.packed
            records.append(b"\xc0\x0c" + struct.pack("!HHIH", q.qtype, 1, ttl, len(rdata)) + rdata)
    msg = _header(q.qid, q.flags, rcode, len(records)) + q.question + b"".join(records)
    if len(msg) > MAX_UDP:                     # keep what fits; a stub retries over TCP if it must
        keep = records[:max(0, (MAX_UDP - 12 - len(q.question)) // max(1, len(records[0])))]
        msg = _header(q.qid, q.flags | 0x0200, rcode, len(keep)) + q.question + b"".join(keep)
    return msg


def error_reply(err: DNSError, q: Query | None = None) -> bytes | None:
    if err.rcode is None:
        return None
    if q is not None:
        return _header(q.qid, q.flags, err.rcode, 0) + q.question
    flags = struct.unpack("!H", err.header[2:4])[0] if len(err.header) >= 4 else 0
    return _header(err.qid, flags, err.rcode, 0, qd=0)


class Tunnelling:
    """Flags a burst of unique subdomains under one parent (DNS tunnelling, exfiltration through names),
    or a flood of unique names overall, in a sliding window. Bounded: names and parents that left the
    window are forgotten, and at most MAX_NAMES are tracked (beyond that, every new name is flagged)."""

    MAX_NAMES = 50_000

    def __init__(self, per_parent: int = 20, overall: int = 200, window_s: float = 60.0) -> None:
        self.per_parent, self.overall, self.window = per_parent, overall, window_s
        self.last_seen: dict[str, float] = {}          # name -> time, oldest first (re-inserted on sight)
        self.parents: dict[str, int] = {}              # parent -> unique names in the window

    @staticmethod
    def parent(name: str) -> str:
        labels = name.split(".")
        return ".".join(labels[-2:]) if len(labels) > 2 else name

    def _expire(self, now: float) -> None:
        for name, t in list(self.last_seen.items()):
            if t >= now - self.window:
                break
            del self.last_seen[name]
            p = self.parent(name)
            self.parents[p] -= 1
            if not self.parents[p]:
                del self.parents[p]

    def observe(self, name: str, now: float | None = None) -> str | None:
        """Why this query looks like tunnelling, or None."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        parent = self.parent(name)
        if name in self.last_seen:
            del self.last_seen[name]                   # keep the dict ordered by last sight
        else:
            if len(self.last_seen) >= self.MAX_NAMES:
                return f"more than {self.MAX_NAMES} unique names within {self.window:.0f} s"
            self.parents[parent] = self.parents.get(parent, 0) + 1
        self.last_seen[name] = now
        if self.parents[parent] > self.per_parent:
            return f"{self.parents[parent]} unique names under {parent} within {self.window:.0f} s (tunnelling?)"
        if len(self.last_seen) > self.overall:
            return f"more than {self.overall} unique names within {self.window:.0f} s"
        return None
