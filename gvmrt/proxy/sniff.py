"""What arrives first on a captured port: a TLS ClientHello (and its SNI), or something else.

Pure (STYLE.md habit 2): the server peeks the first bytes of a transparently captured connection
(MSG_PEEK, so the TLS handshake still sees them) and asks this module what they are. The SNI is
what the sidecar decides on and dials, never the address the agent connected to (DESIGN.md §5);
a ClientHello without one is refused (issue 3), which RFC 6066 §3 allows a server to do.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hello", "MAX_HELLO", "classify", "needed"]

RECORD_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
NAME_TYPE_HOST = 0
MAX_HELLO = 5 + 16384   # one TLS record (RFC 8446 §5.1: at most 2^14 bytes of plaintext)


@dataclass(frozen=True)
class Hello:
    """`tls`: the bytes start a TLS handshake; then `sni` or `problem` says what it asked for."""

    tls: bool
    sni: str | None = None
    problem: str | None = None


def needed(data: bytes) -> int:
    """How many bytes to peek before `classify` can answer (0: it can answer now)."""
    if not data or data[0] != RECORD_HANDSHAKE:
        return 0
    if len(data) < 5:
        return 5
    want = 5 + int.from_bytes(data[3:5], "big")
    return want if len(data) < want else 0


def classify(data: bytes) -> Hello:
    """Read the first TLS record of a connection (as much of it as `needed` asked for)."""
    if not data or data[0] != RECORD_HANDSHAKE:
        return Hello(tls=False)
    try:
        return _parse(data)
    except (IndexError, ValueError):
        return Hello(tls=True, problem="malformed TLS ClientHello")


class _Reader:
    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, start, len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise IndexError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> _Reader:
        n = self.int(len_bytes)
        sub = _Reader(self.data, self.pos, self.pos + n)
        if sub.end > self.end:
            raise IndexError("truncated")
        self.pos += n
        return sub

    def done(self) -> bool:
        return self.pos >= self.end


def _parse(data: bytes) -> Hello:
    if len(data) < 5:
        return Hello(tls=True, problem="truncated TLS record")
    record_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + record_len:
        return Hello(tls=True, problem="truncated TLS record")
    r = _Reader(data, 5, 5 + record_len)
    if r.int(1) != HANDSHAKE_CLIENT_HELLO:
        return Hello(tls=True, problem="TLS handshake that does not start with a ClientHello")
    body_len = r.int(3)
    if body_len > r.end - r.pos:
        # A ClientHello split over several records: legal but rare (huge extension lists).
        return Hello(tls=True, problem="TLS ClientHello spans several records (not supported)")
    r.take(2 + 32)            # legacy_version, random
    r.vector(1)               # legacy_session_id
    r.vector(2)               # cipher_suites
    r.vector(1)               # legacy_compression_methods
    if r.done():
        return Hello(tls=True, problem="TLS client sent no SNI (server_name)")
    exts = r.vector(2)
    while not exts.done():
        ext_type = exts.int(2)
        ext = exts.vector(2)
        if ext_type != EXT_SERVER_NAME:
            continue
        names = ext.vector(2)
        while not names.done():
            kind = names.int(1)
            name = names.vector(2)
            if kind == NAME_TYPE_HOST:
                raw = name.take(name.end - name.pos)
                try:
                    text = raw.decode("ascii")
                except UnicodeDecodeError:
                    return Hello(tls=True, problem="TLS SNI is not an ASCII host name")
                if not text:
                    break
                return Hello(tls=True, sni=text)
    return Hello(tls=True, problem="TLS client sent no SNI (server_name)")
