"""Sans-IO HTTP/1.1 for the sidecar: bytes in, events out, no sockets (STYLE.md habit 1).

One `RequestParser` per client connection, one `ResponseParser` per upstream connection.
``feed(data)`` returns a list of events; every message is ``Head, Data*, EndOfMessage``.
A malformed message raises `ProtocolError` (400 for requests, 502 for upstream responses) and the
parser stays broken: the connection must be closed (RFC 9112 §11.2: after a framing error, the
two ends no longer agree where messages start).

Division of labour:
- We frame the head ourselves (find CRLF CRLF, bounded) and check its raw bytes with strict
  regexes *before* llhttp sees it, because llhttp accepts some shapes a proxy must refuse
  (trailing whitespace in values, lenient Connection parsing, ...) and a proxy that is more
  lenient than the upstream is how request smuggling happens.
- httptools (llhttp) then parses that head in a fresh parser (0.2 µs) as a second opinion and
  reports the fields and keep-alive; we compare its header count with ours.
- Bodies (Content-Length, chunked, read-until-close) are framed here, so no byte after the end of
  a message ever reaches llhttp unchecked, and the body is streamed as `Data` slices of what was
  fed, never accumulated: buffering is bounded by the head/chunk-line/trailer limits.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

import httptools

from gvmrt.errors import GvmrtError

MAX_HEAD = 64 * 1024          # request/status line + fields + CRLF CRLF; also the trailer section
MAX_HEADERS = 100             # field lines per head (and per trailer section)
MAX_CHUNK_LINE = 4096         # chunk-size line with its extensions
MAX_LENGTH_DIGITS = 15        # Content-Length < 10**15 (1 PB): no overflow anywhere downstream
MAX_CHUNK_DIGITS = 16         # chunk-size hex digits, leading zeros included (< 2**64)

Headers = tuple[tuple[bytes, bytes], ...]


class BodyKind(enum.Enum):
    """How the body of a message is framed (RFC 9112 §6.3)."""

    NONE = "none"                # no body: GET without CL/TE, HEAD response, 1xx/204/304
    LENGTH = "length"            # Content-Length bytes
    CHUNKED = "chunked"          # Transfer-Encoding: chunked
    UNTIL_CLOSE = "until-close"  # response without CL/TE: the body ends when upstream closes


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes               # b"1.0" or b"1.1"
    headers: Headers             # names as received, values without surrounding OWS
    keep_alive: bool
    body: BodyKind
    content_length: int | None = None
    # The value of its one Host field (the parser refuses two): derived from `headers`, so not
    # part of equality.
    host: bytes | None = field(default=None, compare=False)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    body: BodyKind
    content_length: int | None = None


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    trailers: Headers = ()


Event = RequestHead | ResponseHead | Data | EndOfMessage
_EOM = EndOfMessage()          # the end of every message without trailers (events are not changed)


class ProtocolError(GvmrtError):
    """The peer sent something that is not (safe) HTTP/1.1; answer `status` and close.

    `events` holds what this `feed` call parsed before the fault, so a caller may still serve
    complete pipelined messages that preceded it (or, more simply, drop the connection).
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        self.events: tuple[Event, ...] = ()
        super().__init__(f"HTTP {status}: {reason}")


# --- grammar (RFC 9110 §5.6.2 token, §5.5 field values; RFC 9112 §3, §4, §5, §7.1) ----------

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# A field line: token, colon with no whitespace before it (RFC 9112 §5.1: MUST reject), then a
# value of VCHAR / obs-text / SP / HTAB only. This rejects, on the raw bytes: obs-fold (a line
# starting with SP/HTAB, RFC 9112 §5.2), NUL/CR/LF and every other CTL in a value (RFC 9110 §5.5),
# bare LF line endings, and non-token names. The value class excludes CR, so no backtracking.
_FIELD_LINE = _TCHAR + rb"+:[\t \x21-\x7e\x80-\xff]*\r\n"
_FIELDS_RE = re.compile(rb"(?:" + _FIELD_LINE + rb")*")
_FIELD_LINE_RE = re.compile(_FIELD_LINE)
# RFC 9112 §3: method SP request-target SP HTTP-version, single spaces, no leniency.
_REQUEST_LINE_RE = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
# RFC 9112 §4; the SP before an empty reason is optional in practice, so we accept its absence.
_STATUS_LINE_RE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
# CONNECT takes authority-form only (RFC 9112 §3.2.3): host:port, IPv6 in brackets.
_AUTHORITY_RE = re.compile(rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")
_ABSOLUTE_RE = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://[\x21-\x7e]+")
_DIGITS_RE = re.compile(rb"[0-9]+")
# A bare LF, or a CR not followed by LF, while still looking for the end of a head: refused at
# once rather than after 64 KiB (RFC 9112 §2.2 lets us refuse bare LF; a lone CR MUST NOT pass).
_BAD_EOL_RE = re.compile(rb"(?<!\r)\n|\r[^\n]")
# "Transfer-Encoding:\tchunked" and "chunked\t" are classic obfuscations (PortSwigger); llhttp
# refuses a trailing HTAB but not a leading one. We refuse HTAB anywhere in the field: SP only.
_TE_TAB_RE = re.compile(rb"(?im)^transfer-encoding:[^\r\n]*\t")
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] with chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
_QSTRING = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})" % MAX_CHUNK_DIGITS
    + rb"(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR + rb"+|" + _QSTRING + rb"))?)*"
)

# Names that some servers fold to the real thing ("_" -> "-", e.g. CGI's HTTP_* variables); a
# look-alike framing header is a known smuggling vector, so it is refused outright.
_LOOKALIKE = {b"content-length", b"transfer-encoding", b"host", b"connection"}
_FRAMING_LINE_RE = re.compile(rb"\r\n(?:(host)|(content-length)|(transfer-encoding)):", re.IGNORECASE)
# Fields that must never come in a trailer section (RFC 9110 §6.5.1): framing and routing.
_NOT_IN_TRAILERS = {b"content-length", b"transfer-encoding", b"host"}


def header_values(headers: Headers, name: bytes) -> list[bytes]:
    """All values of field `name` (case-insensitive), in order."""
    name = name.lower()
    return [v for n, v in headers if n.lower() == name]


def connection_tokens(headers: Headers) -> set[bytes]:
    """Lower-cased options of every Connection field (RFC 9110 §7.6.1)."""
    return {t.strip(b" \t").lower() for v in header_values(headers, b"connection") for t in v.split(b",")} - {b""}


class _S(enum.Enum):
    HEAD = 1
    LENGTH = 2
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    CHUNK_CRLF = 5
    TRAILERS = 6
    UNTIL_CLOSE = 7
    CLOSED = 8                   # after a non-keep-alive message or EOF: further bytes are dropped


class _Llhttp:
    """httptools callback target; a fresh one per head."""

    __slots__ = ("parser", "headers", "keep_alive", "complete")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading OWS but keeps trailing OWS (RFC 9112 §5.1: not part of the value).
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        # Read keep-alive *here*: once a response with a body completes, llhttp's
        # should_keep_alive() turns False (issue 3, "two traps"), and every upstream connection
        # would close.
        self.keep_alive = bool(self.parser.should_keep_alive())
        self.complete = True


class _Parser:
    _status = 400                # what a malformed message from this peer is answered with
    _too_large = 431             # RFC 6585 §5 for requests; 502 for responses

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _S.HEAD
        self._scanned = 0        # bytes of _buf already searched for the end of the head
        self._remaining = 0      # body or chunk bytes still expected
        self._keep_alive = True  # of the message being read
        self._error: ProtocolError | None = None
        self.discarded = 0       # bytes dropped after a message that closes the connection

    # --- public ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Parse `data` (any split); return the events completed so far."""
        if self._error is not None:
            raise self._error
        if self._state is _S.CLOSED:
            self.discarded += len(data)
            return []
        events: list[Event] = []
        try:
            if not self._buf:
                data = self._direct(data, events)
            if data:
                self._buf += data
                # An empty buffer never makes progress in any state: stop probing then.
                while self._buf and self._step(events):
                    pass
        except ProtocolError as exc:
            exc.events = tuple(events)
            self._error = exc
            raise
        return events

    def feed_eof(self) -> list[Event]:
        """The peer closed its side. Ends a read-until-close body; refuses a cut message."""
        if self._error is not None:
            raise self._error
        state, self._state = self._state, _S.CLOSED
        if state is _S.CLOSED or (state is _S.HEAD and not self._buf.strip(b"\r\n")):
            return []
        if state is _S.UNTIL_CLOSE:
            return [_EOM]                # RFC 9112 §6.3 item 8
        self._error = ProtocolError(self._status, "connection closed in the middle of a message")
        raise self._error

    @property
    def buffered(self) -> int:
        """Bytes held back (an incomplete head, chunk line or trailer); never a body."""
        return len(self._buf)

    # --- the machine ----------------------------------------------------------------------

    def _fail(self, reason: str, status: int | None = None) -> ProtocolError:
        return ProtocolError(status or self._status, reason)

    def _direct(self, data: bytes, events: list[Event]) -> bytes:
        """While nothing is buffered, work on `data` itself: whole heads and body bytes straight
        from it, with no copy into the buffer and back (a keep-alive message usually arrives
        whole). Returns what is left for the buffered machine: a partial head, a chunk line, a
        head it must refuse or trim (oversize, leading CRLF), anything after the last message."""
        while data:
            state = self._state
            if state is _S.HEAD:
                end = data.find(b"\r\n\r\n")
                if end <= 0 or end + 4 > MAX_HEAD or data.startswith(b"\r\n"):
                    return data
                self._head(data[: end + 2], events)
                data = data[end + 4:]
            elif state is _S.LENGTH or state is _S.CHUNK_DATA or state is _S.UNTIL_CLOSE:
                data = self._body_direct(data, events)
            else:
                return data
        return data

    def _body_direct(self, data: bytes, events: list[Event]) -> bytes:
        """Body bytes straight from `data` while nothing is buffered (a large body's usual
        case): no copy into the buffer and back out. Returns what is left for the buffer."""
        state = self._state
        if state is _S.LENGTH or state is _S.CHUNK_DATA:
            n = self._remaining
            if n >= len(data):
                piece, data = data, b""
            else:
                piece, data = data[:n], data[n:]
            events.append(Data(piece))
            self._remaining -= len(piece)
            if self._remaining == 0:
                if state is _S.LENGTH:
                    self._end(events)
                else:
                    self._state = _S.CHUNK_CRLF
        elif state is _S.UNTIL_CLOSE:
            events.append(Data(data))
            data = b""
        return data

    def _step(self, events: list[Event]) -> bool:
        """Make one move; False when more input is needed."""
        state, buf = self._state, self._buf
        if state is _S.HEAD:
            return self._step_head(events)
        if state is _S.LENGTH or state is _S.CHUNK_DATA:
            n = min(self._remaining, len(buf))
            if n == 0:
                return False
            events.append(Data(bytes(buf[:n])))
            del buf[:n]
            self._remaining -= n
            if self._remaining == 0:
                if state is _S.LENGTH:
                    self._end(events)
                else:
                    self._state = _S.CHUNK_CRLF
            return True
        if state is _S.UNTIL_CLOSE:
            if not buf:
                return False
            events.append(Data(bytes(buf)))
            buf.clear()
            return False
        if state is _S.CHUNK_SIZE:
            return self._step_chunk_size()
        if state is _S.CHUNK_CRLF:
            # RFC 9112 §7.1: chunk-data CRLF, exactly.
            if buf[:2] != b"\r\n"[: len(buf)]:
                raise self._fail("chunk data not followed by CRLF (chunk size does not match its data)")
            if len(buf) < 2:
                return False
            del buf[:2]
            self._state = _S.CHUNK_SIZE
            return True
        if state is _S.TRAILERS:
            return self._step_trailers(events)
        # CLOSED: drop whatever followed the last message.
        self.discarded += len(buf)
        buf.clear()
        return False

    def _block_end(self, what: str) -> int:
        """Index of the CRLF CRLF ending a head or trailer section in _buf, or -1 (need more).

        Scans only bytes not seen before, so a head sent one byte at a time costs O(n), not O(n²).
        """
        buf = self._buf
        start = max(0, self._scanned - 3)
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise self._fail(f"{what} larger than {MAX_HEAD} bytes", self._too_large)
            if _BAD_EOL_RE.search(buf, max(0, start - 1)) is not None:
                raise self._fail(f"bare CR or LF line ending in {what} (RFC 9112 §2.2)")
            self._scanned = len(buf)
            return -1
        if end + 4 > MAX_HEAD:
            raise self._fail(f"{what} larger than {MAX_HEAD} bytes", self._too_large)
        self._scanned = 0
        return end

    def _step_head(self, events: list[Event]) -> bool:
        end = self._block_end("head")
        if end < 0:
            return False
        head = bytes(self._buf[: end + 2])     # start line + field lines, each with its CRLF
        del self._buf[: end + 4]
        self._head(head, events)
        return True

    def _head(self, head: bytes, events: list[Event]) -> None:
        raise NotImplementedError

    def _fields(self, block: bytes) -> int:
        """Check a field block's raw bytes; return its line count."""
        if _FIELDS_RE.fullmatch(block) is None:
            raise self._fail(_why_bad_fields(block))
        count = block.count(b"\r\n")
        if count > MAX_HEADERS:
            raise self._fail(f"more than {MAX_HEADERS} header fields", self._too_large)
        return count

    def _llhttp(self, parser_type: type, head: bytes, lines: int) -> _Llhttp:
        """Second opinion: llhttp parses the (already checked) head."""
        cb = _Llhttp()
        cb.parser = parser_type(cb)
        try:
            cb.parser.feed_data(head + b"\r\n")
        except httptools.HttpParserUpgrade:
            pass                               # CONNECT / Upgrade: llhttp pauses after the head
        except httptools.HttpParserInvalidMethodError as exc:
            # RFC 9110 §9.1: a method we do not know is 501, not a malformed request.
            raise self._fail("unknown method", 501 if self._status == 400 else None) from exc
        except httptools.HttpParserError as exc:
            raise self._fail(f"malformed head ({exc})") from exc
        if not cb.complete or len(cb.headers) != lines:
            raise self._fail("head parsed differently by llhttp")
        return cb

    def _framing(self, head: bytes, headers: Headers, version: bytes) -> tuple[BodyKind | None, int | None, list[bytes]]:
        """Body framing fields, checked (RFC 9112 §6.1, §6.3; RFC 9110 §8.6); also counts Host."""
        cl: list[bytes] = []
        te: list[bytes] = []
        hosts: list[bytes] = []
        # Only the lines that matter, found by one regex over the (already checked) head rather
        # than a Python step per field: Host, Content-Length, Transfer-Encoding; names are
        # looked at one by one only if the head has a "_" at all (a look-alike framing name).
        # A value is the rest of its line without surrounding OWS, as llhttp reports it.
        if b"_" in head:
            for name, _ in headers:
                if b"_" in name and name.lower().replace(b"_", b"-") in _LOOKALIKE:
                    raise self._fail(f"header {name.decode()!r} looks like a framing header")
        for m in _FRAMING_LINE_RE.finditer(head):
            which = m.lastindex
            value = head[m.end():head.index(b"\r\n", m.end())].strip(b" \t")
            (hosts if which == 1 else cl if which == 2 else te).append(value)
        if cl and te:
            # RFC 9112 §6.1: "ought to be handled as an error"; the classic CL.TE / TE.CL shape.
            raise self._fail("both Content-Length and Transfer-Encoding")
        if te:
            if _TE_TAB_RE.search(head) is not None:
                raise self._fail("HTAB in Transfer-Encoding")
            if version == b"1.0":
                # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
                raise self._fail("Transfer-Encoding in an HTTP/1.0 message")
            codings = [c.strip(b" \t").lower() for c in b",".join(te).split(b",")]
            if codings != [b"chunked"]:
                # Only the single coding "chunked": anything else ("chunked, identity",
                # "gzip, chunked", "xchunked", two TE lines) is refused rather than interpreted.
                raise self._fail(f"unsupported Transfer-Encoding {b', '.join(codings).decode(errors='replace')!r}")
            return BodyKind.CHUNKED, None, hosts
        if cl:
            # One Content-Length, digits only. Duplicates are refused even when identical
            # (RFC 9110 §8.6 allows either); one rule is simpler to audit, and a
            # list "5, 5" or two lines are equally suspect.
            if len(cl) > 1:
                raise self._fail("more than one Content-Length")
            value = cl[0]
            if _DIGITS_RE.fullmatch(value) is None:
                raise self._fail(f"invalid Content-Length {value.decode(errors='replace')!r}")
            if len(value) > MAX_LENGTH_DIGITS:
                raise self._fail("Content-Length too large")
            return BodyKind.LENGTH, int(value), hosts
        return None, None, hosts

    def _begin_body(self, events: list[Event], kind: BodyKind, length: int | None, keep_alive: bool) -> None:
        self._keep_alive = keep_alive
        if kind is BodyKind.NONE or (kind is BodyKind.LENGTH and length == 0):
            self._end(events)
        elif kind is BodyKind.LENGTH:
            self._state, self._remaining = _S.LENGTH, length or 0
        elif kind is BodyKind.CHUNKED:
            self._state = _S.CHUNK_SIZE
        else:
            self._state = _S.UNTIL_CLOSE

    def _end(self, events: list[Event], trailers: Headers = ()) -> None:
        events.append(EndOfMessage(trailers) if trailers else _EOM)
        self._state = _S.HEAD if self._keep_alive else _S.CLOSED

    def _step_chunk_size(self) -> bool:
        buf = self._buf
        end = buf.find(b"\r\n")
        if end > MAX_CHUNK_LINE or (end < 0 and len(buf) > MAX_CHUNK_LINE):
            raise self._fail("chunk-size line too long")
        if end < 0:
            if b"\n" in buf:
                raise self._fail("bare LF after chunk size")
            return False
        match = _CHUNK_LINE_RE.fullmatch(buf, 0, end)
        if match is None:
            raise self._fail(f"invalid chunk-size line {bytes(buf[:min(end, 40)])!r}")
        size = int(match[1], 16)
        del buf[: end + 2]
        if size == 0:
            self._state = _S.TRAILERS          # last-chunk; a trailer section follows
        else:
            self._state, self._remaining = _S.CHUNK_DATA, size
        return True

    def _step_trailers(self, events: list[Event]) -> bool:
        # RFC 9112 §7.1.2: trailer-section = *( field-line CRLF ), then the final CRLF.
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"\r\n":
            del buf[:2]
            self._end(events)
            return True
        end = self._block_end("trailer section")
        if end < 0:
            return False
        block = bytes(buf[: end + 2])
        self._fields(block)
        trailers = _split_fields(block)
        for name, _ in trailers:
            if name.lower() in _NOT_IN_TRAILERS:
                raise self._fail(f"{name.decode()} in a trailer section (RFC 9110 §6.5.1)")
        del buf[: end + 4]
        self._end(events, trailers)
        return True


def _split_fields(block: bytes) -> Headers:
    out = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return tuple(out)


def _why_bad_fields(block: bytes) -> str:
    """Slow path: name the first offending field line."""
    for line in block.split(b"\r\n")[:-1]:
        if _FIELD_LINE_RE.fullmatch(line + b"\r\n") is not None:
            continue
        shown = line[:40]
        if line[:1] in (b" ", b"\t"):
            return f"obs-fold (line starting with whitespace, RFC 9112 §5.2): {shown!r}"
        name, colon, value = line.partition(b":")
        if not colon:
            return f"header line without a colon: {shown!r}"
        if name[-1:] in (b" ", b"\t"):
            return f"whitespace between header name and colon (RFC 9112 §5.1): {shown!r}"
        if not re.fullmatch(_TCHAR + rb"+", name):
            return f"invalid header name: {shown!r}"
        return f"invalid character in header value (RFC 9110 §5.5): {shown!r}"
    return "malformed header section"


def _version(major: bytes, minor: bytes) -> bytes | None:
    v = major + b"." + minor
    return v if v in (b"1.0", b"1.1") else None


def _persistent(version: bytes, headers: Headers) -> bool:
    """RFC 9112 §9.3, for when llhttp cannot know (a response to HEAD without Content-Length)."""
    tokens = connection_tokens(headers)
    if b"close" in tokens:
        return False
    return version == b"1.1" or b"keep-alive" in tokens


class RequestParser(_Parser):
    """Requests from a client (the agent). Errors are 400 (431 for oversize heads, 501, 505)."""

    _status = 400
    _too_large = 431

    def _step_head(self, events: list[Event]) -> bool:
        # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request-line.
        buf = self._buf
        skip = 0
        while buf.startswith(b"\r\n", skip):
            skip += 2
        if skip:
            del buf[:skip]
            self._scanned = 0
        return super()._step_head(events)

    def _head(self, head: bytes, events: list[Event]) -> None:
        eol = head.find(b"\r\n")
        line = head[:eol]
        match = _REQUEST_LINE_RE.fullmatch(line)
        if match is None:
            if re.fullmatch(_TCHAR + rb"+ [\x21-\x7e]+", line):
                raise self._fail("HTTP/0.9 request (no version)")
            raise self._fail(f"malformed request line {line[:60]!r}")
        method, target = match[1], match[2]
        version = _version(match[3], match[4])
        if version is None:
            raise self._fail(f"HTTP/{match[3].decode()}.{match[4].decode()} not supported", 505)
        # RFC 9112 §3.2: the four target forms, each with its method.
        if method == b"CONNECT":
            m = _AUTHORITY_RE.fullmatch(target)
            if m is None or not 0 < int(m[1]) < 65536:
                raise self._fail("CONNECT needs an authority-form target host:port (RFC 9112 §3.2.3)")
        elif target == b"*":
            if method != b"OPTIONS":
                raise self._fail("asterisk-form is for OPTIONS only (RFC 9112 §3.2.4)")
        elif not target.startswith(b"/") and _ABSOLUTE_RE.fullmatch(target) is None:
            raise self._fail(f"invalid request target {target[:60]!r}")
        lines = self._fields(head[eol + 2:])
        cb = self._llhttp(httptools.HttpRequestParser, head, lines)
        headers = tuple(cb.headers)
        kind, length, hosts = self._framing(head, headers, version)
        # RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; two are refused in any
        # version, since the policy decides on the host and must see the one upstream sees.
        if len(hosts) > 1 or (version == b"1.1" and not hosts):
            raise self._fail("an HTTP/1.1 request needs exactly one Host header")
        if kind is None:
            kind = BodyKind.NONE               # RFC 9112 §6.3 item 7
        keep_alive = cb.keep_alive
        events.append(RequestHead(method, target, version, headers, keep_alive, kind, length,
                                  hosts[0] if hosts else None))
        self._begin_body(events, kind, length, keep_alive)


class ResponseParser(_Parser):
    """Responses from an upstream server. Errors are 502.

    Call `expect(method)` for every request sent on the connection, in order: the method decides
    whether a response has a body (HEAD), and a response nobody asked for is refused.
    """

    _status = 502
    _too_large = 502

    def __init__(self) -> None:
        super().__init__()
        self._pending: deque[bytes] = deque()

    def expect(self, method: bytes) -> None:
        if method == b"CONNECT":
            raise ValueError("the sidecar answers CONNECT itself; it is never sent upstream")
        self._pending.append(method)

    def _head(self, head: bytes, events: list[Event]) -> None:
        eol = head.find(b"\r\n")
        line = head[:eol]
        match = _STATUS_LINE_RE.fullmatch(line)
        if match is None:
            raise self._fail(f"malformed status line {line[:60]!r}")
        version = _version(match[1], match[2])
        if version is None:
            raise self._fail(f"upstream speaks HTTP/{match[1].decode()}.{match[2].decode()}")
        status = int(match[3])
        if status == 101:
            # The sidecar strips Upgrade (hop-by-hop), so a protocol switch was never asked for.
            raise self._fail("unrequested 101 Switching Protocols")
        if not self._pending:
            raise self._fail("response without a request")
        method = self._pending[0]
        if status >= 200:
            self._pending.popleft()            # 1xx are interim: the final response follows
        lines = self._fields(head[eol + 2:])
        cb = self._llhttp(httptools.HttpResponseParser, head, lines)
        headers = tuple(cb.headers)
        kind, length, _ = self._framing(head, headers, version)   # checked even when it will not frame
        keep_alive = cb.keep_alive
        # RFC 9112 §6.3 items 1 and 8: no body after HEAD, 1xx, 204, 304; otherwise CL, chunked,
        # or until close.
        if method == b"HEAD" or status < 200 or status in (204, 304):
            kind, length = BodyKind.NONE, None
            keep_alive = _persistent(version, headers)   # llhttp thinks "until close" for HEAD
        elif kind is None:
            kind, keep_alive = BodyKind.UNTIL_CLOSE, False
        events.append(ResponseHead(status, match[4] or b"", version, headers, keep_alive, kind, length))
        self._begin_body(events, kind, length, True if status < 200 else keep_alive)


# --- serialisation ----------------------------------------------------------------------------

def _field_block(headers: Headers, checked: bool = True) -> bytes:
    block = b"\r\n".join([b": ".join(h) for h in headers]) + b"\r\n" if headers else b""
    # Never emit what we would refuse: a CR/LF in an injected value is header injection.
    # (`checked=False` only for fields a parser of ours has already checked, plus our own.)
    if checked and (_FIELDS_RE.fullmatch(block) is None or block.count(b"\r\n") != len(headers)):
        raise ValueError(f"refusing to serialise invalid header fields: {_why_bad_fields(block)}")
    return block


def serialize_request_head(head: RequestHead, headers_override: Headers | None = None, *,
                           checked: bool = True) -> bytes:
    headers = head.headers if headers_override is None else headers_override
    return b"%s %s HTTP/%s\r\n%s\r\n" % (head.method, head.target, head.version, _field_block(headers, checked))


def serialize_response_head(head: ResponseHead, headers_override: Headers | None = None, *,
                            checked: bool = True) -> bytes:
    headers = head.headers if headers_override is None else headers_override
    return b"HTTP/%s %d %s\r\n%s\r\n" % (head.version, head.status, head.reason, _field_block(headers, checked))


def request_head_11(method: bytes, target: bytes, headers: Headers, *, checked: bool = True) -> bytes:
    """An HTTP/1.1 request head (what a proxy sends on), without a RequestHead to build first."""
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _field_block(headers, checked))


def response_head_11(status: int, reason: bytes, headers: Headers, *, checked: bool = True) -> bytes:
    """An HTTP/1.1 response head, without a ResponseHead to build first."""
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _field_block(headers, checked))


def chunk(data: bytes) -> bytes:
    """One chunk (RFC 9112 §7.1). Empty data gives b"": a zero-size chunk would end the body."""
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Headers = ()) -> bytes:
    """last-chunk, trailer section, final CRLF (RFC 9112 §7.1)."""
    return b"0\r\n%s\r\n" % _field_block(trailers)


# RFC 9110 §7.6.1 (Connection, and what it names), plus the fields that are by definition only
# for this hop: Keep-Alive, Proxy-Connection (obsolete), TE, Trailer, Transfer-Encoding (we
# re-frame), Upgrade (we do not switch protocols), and the proxy's own credentials.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
# A Connection option may not remove these: "Connection: Content-Length" would otherwise strip
# the framing of a body we forward (the hop-by-hop smuggling trick) or the Host the policy read.
_NEVER_HOP = frozenset({b"content-length", b"host"})


def strip_hop_by_hop(headers: Headers, also: frozenset[bytes] = frozenset(), prefix: bytes | None = None) -> Headers:
    """Headers to forward: without hop-by-hop fields, those named in Connection, those named in
    `also` (lower case) and those whose lower-cased name starts with `prefix`. One pass over the
    fields on the usual path (no Connection options beyond keep-alive/close)."""
    drop = _DROP.get(also)
    if drop is None:
        drop = _DROP[also] = HOP_BY_HOP | also
    kept = []
    options: list[bytes] = []
    for pair in headers:
        low = pair[0].lower()
        if low in drop:
            if low == b"connection":
                options += [t.strip(b" \t").lower() for t in pair[1].split(b",")]
            continue
        if prefix is not None and low.startswith(prefix):
            continue
        kept.append(pair)
    named = set(options) - _NEVER_HOP - HOP_BY_HOP - {b""}
    if named:
        return tuple(pair for pair in kept if pair[0].lower() not in named)
    return tuple(kept)


_DROP: dict[frozenset[bytes], frozenset[bytes]] = {}


__all__ = [
    "MAX_HEAD", "MAX_HEADERS", "BodyKind", "Data", "EndOfMessage", "Event", "Headers", "HOP_BY_HOP",
    "ProtocolError", "RequestHead", "RequestParser", "ResponseHead", "ResponseParser", "chunk",
    "connection_tokens", "header_values", "last_chunk", "request_head_11", "response_head_11", "serialize_request_head",
    "serialize_response_head", "strip_hop_by_hop",
]
