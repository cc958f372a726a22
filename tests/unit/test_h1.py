"""gvmrt.proxy.h1: the sans-IO HTTP/1.1 layer (STYLE.md habit 1).

Every fixture is fed whole, one byte at a time, and in random splits (hypothesis); the events
must be the same (adjacent Data merged, since how a body is sliced depends on the reads).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.proxy.h1 import (
    MAX_HEAD, BodyKind, Data, EndOfMessage, ProtocolError, RequestHead, RequestParser, ResponseHead,
    ResponseParser, chunk, last_chunk, serialize_request_head, serialize_response_head, strip_hop_by_hop,
)


# --- helpers ----------------------------------------------------------------------------------

def merged(events):
    """Adjacent Data joined: the split of a body into Data events depends on the reads."""
    out = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def make(kind, expect=()):
    if kind == "req":
        return RequestParser()
    parser = ResponseParser()
    for method in expect:
        parser.expect(method)
    return parser


def run(kind, pieces, expect=(), eof=False):
    parser = make(kind, expect)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    if eof:
        events += parser.feed_eof()
    return merged(events)


def whole(data):
    return [data]


def bytewise(data):
    return [data[i:i + 1] for i in range(len(data))]


def split_at(data, cuts):
    cuts = sorted(set(c % (len(data) + 1) for c in cuts))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def error_of(kind, pieces, expect=(), eof=False):
    with pytest.raises(ProtocolError) as info:
        run(kind, pieces, expect, eof)
    return info.value


def head(method=b"GET", target=b"/", version=b"1.1", headers=((b"Host", b"a"),), keep_alive=True,
         body=BodyKind.NONE, length=None):
    return RequestHead(method, target, version, tuple(headers), keep_alive, body, length)


# --- valid requests ---------------------------------------------------------------------------

REQUESTS = {
    "get": (
        b"GET /a?b=c HTTP/1.1\r\nHost: a\r\n\r\n",
        [head(target=b"/a?b=c"), EndOfMessage()],
    ),
    "ows-and-obs-text": (
        b"GET / HTTP/1.1\r\nHost:a\r\nX-A: \t v a l \t\r\nX-B:\r\nX-C: caf\xc3\xa9\r\n\r\n",
        [head(headers=((b"Host", b"a"), (b"X-A", b"v a l"), (b"X-B", b""), (b"X-C", b"caf\xc3\xa9"))),
         EndOfMessage()],
    ),
    "post-length": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        [head(b"POST", b"/p", headers=((b"Host", b"a"), (b"Content-Length", b"5")), body=BodyKind.LENGTH, length=5),
         Data(b"hello"), EndOfMessage()],
    ),
    "post-length-zero": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        [head(b"POST", b"/p", headers=((b"Host", b"a"), (b"Content-Length", b"0")), body=BodyKind.LENGTH, length=0),
         EndOfMessage()],
    ),
    "post-chunked-ext-trailers": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=val;q=\"a b\\\"c\" ; x\r\nhello\r\n000A\r\n0123456789\r\n0\r\nX-Sum: 1\r\nX-T: 2\r\n\r\n",
        [head(b"POST", b"/p", headers=((b"Host", b"a"), (b"Transfer-Encoding", b"chunked")), body=BodyKind.CHUNKED),
         Data(b"hello0123456789"), EndOfMessage(((b"X-Sum", b"1"), (b"X-T", b"2")))],
    ),
    "chunked-odd-ows-and-case": (
        b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:   Chunked  \r\n\r\n0\r\n\r\n",
        [head(b"POST", b"/p", headers=((b"Host", b"a"), (b"Transfer-Encoding", b"Chunked")), body=BodyKind.CHUNKED),
         EndOfMessage()],
    ),
    "pipelined": (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        [head(target=b"/1"), EndOfMessage(),
         head(b"POST", b"/2", headers=((b"Host", b"a"), (b"Content-Length", b"3")), body=BodyKind.LENGTH, length=3),
         Data(b"abc"), EndOfMessage(),
         head(target=b"/3", headers=((b"Host", b"a"), (b"Connection", b"close")), keep_alive=False), EndOfMessage()],
    ),
    "leading-crlf": (
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        [head(), EndOfMessage()],
    ),
    "absolute-form": (
        b"GET http://example.com:8080/x?y HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
        [head(target=b"http://example.com:8080/x?y", headers=((b"Host", b"example.com:8080"),)), EndOfMessage()],
    ),
    "connect": (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        [head(b"CONNECT", b"example.com:443", headers=((b"Host", b"example.com:443"),)), EndOfMessage()],
    ),
    "connect-ipv6": (
        b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n",
        [head(b"CONNECT", b"[::1]:8443", headers=((b"Host", b"[::1]:8443"),)), EndOfMessage()],
    ),
    "options-asterisk": (
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        [head(b"OPTIONS", b"*"), EndOfMessage()],
    ),
    "http10-no-keepalive": (
        b"GET / HTTP/1.0\r\n\r\n",
        [head(version=b"1.0", headers=(), keep_alive=False), EndOfMessage()],
    ),
    "http10-keepalive": (
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\n",
        [head(version=b"1.0", headers=((b"Connection", b"keep-alive"),)), EndOfMessage(),
         head(target=b"/2", version=b"1.0", headers=(), keep_alive=False), EndOfMessage()],
    ),
    "connection-close-token-list": (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, Close\r\n\r\n",
        [head(headers=((b"Host", b"a"), (b"Connection", b"foo, Close")), keep_alive=False), EndOfMessage()],
    ),
}


@pytest.mark.parametrize("name", REQUESTS)
def test_request_whole_and_bytewise(name):
    data, expected = REQUESTS[name]
    assert run("req", whole(data)) == expected
    assert run("req", bytewise(data)) == expected


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(REQUESTS)), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_request_random_splits(name, cuts):
    data, expected = REQUESTS[name]
    assert run("req", split_at(data, cuts)) == expected


# --- valid responses --------------------------------------------------------------------------

def resp(status=200, reason=b"OK", version=b"1.1", headers=(), keep_alive=True, body=BodyKind.NONE, length=None):
    return ResponseHead(status, reason, version, tuple(headers), keep_alive, body, length)


CL5 = ((b"Content-Length", b"5"),)
RESPONSES = {
    # The trap (issue 3): llhttp says "don't keep alive" once a body is complete; the head must say yes.
    "length-keepalive": (
        [b"GET"], b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False,
        [resp(headers=CL5, body=BodyKind.LENGTH, length=5), Data(b"hello"), EndOfMessage()],
    ),
    "chunked-keepalive-two": (
        [b"GET", b"GET"],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False,
        [resp(headers=((b"Transfer-Encoding", b"chunked"),), body=BodyKind.CHUNKED), Data(b"abc"), EndOfMessage(),
         resp(404, b"Not Found", headers=((b"Content-Length", b"0"),), body=BodyKind.LENGTH, length=0),
         EndOfMessage()],
    ),
    "head-has-no-body": (
        [b"HEAD", b"GET"],
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False,
        [resp(headers=CL5), EndOfMessage(),
         resp(headers=((b"Content-Length", b"2"),), body=BodyKind.LENGTH, length=2), Data(b"hi"), EndOfMessage()],
    ),
    "head-chunked-no-length-keeps-alive": (
        [b"HEAD"], b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False,
        [resp(headers=((b"Transfer-Encoding", b"chunked"),)), EndOfMessage()],
    ),
    "head-bare-keeps-alive": (
        [b"HEAD"], b"HTTP/1.1 200 OK\r\n\r\n", False,
        [resp(), EndOfMessage()],
    ),
    "204-and-304": (
        [b"GET", b"GET"],
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", False,
        [resp(204, b"No Content"), EndOfMessage(), resp(304, b"Not Modified", headers=CL5), EndOfMessage()],
    ),
    "100-continue-then-final": (
        [b"POST"], b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", False,
        [resp(100, b"Continue"), EndOfMessage(),
         resp(201, b"Created", headers=CL5, body=BodyKind.LENGTH, length=5), Data(b"hello"), EndOfMessage()],
    ),
    "until-close": (
        [b"GET"], b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome body\r\n\r\nmore", True,
        [resp(headers=((b"Content-Type", b"text/plain"),), keep_alive=False, body=BodyKind.UNTIL_CLOSE),
         Data(b"some body\r\n\r\nmore"), EndOfMessage()],
    ),
    "http10-length": (
        [b"GET"], b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", False,
        [resp(version=b"1.0", headers=CL5, keep_alive=False, body=BodyKind.LENGTH, length=5),
         Data(b"hello"), EndOfMessage()],
    ),
    "http10-keepalive": (
        [b"GET"], b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello", False,
        [resp(version=b"1.0", headers=((b"Connection", b"keep-alive"), *CL5), body=BodyKind.LENGTH, length=5),
         Data(b"hello"), EndOfMessage()],
    ),
    "connection-close": (
        [b"GET"], b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello", False,
        [resp(headers=((b"Connection", b"close"), *CL5), keep_alive=False, body=BodyKind.LENGTH, length=5),
         Data(b"hello"), EndOfMessage()],
    ),
    "no-reason": (
        [b"GET"], b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", False,
        [resp(reason=b"", headers=((b"Content-Length", b"0"),), body=BodyKind.LENGTH, length=0), EndOfMessage()],
    ),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_response_whole_and_bytewise(name):
    expect, data, eof, expected = RESPONSES[name]
    assert run("resp", whole(data), expect, eof) == expected
    assert run("resp", bytewise(data), expect, eof) == expected


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(RESPONSES)), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_response_random_splits(name, cuts):
    expect, data, eof, expected = RESPONSES[name]
    assert run("resp", split_at(data, cuts), expect, eof) == expected


# --- refused requests -------------------------------------------------------------------------

def req(*fields, line=b"POST / HTTP/1.1", body=b""):
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


H = b"Host: a"
TE = b"Transfer-Encoding: chunked"
BAD_REQUESTS = {
    # framing: RFC 9112 §6.1, §6.3; RFC 9110 §8.6
    "cl-and-te": (req(H, b"Content-Length: 5", TE, body=b"0\r\n\r\n"), 400),
    "te-and-cl": (req(H, TE, b"Content-Length: 5", body=b"0\r\n\r\n"), 400),
    "cl-conflict": (req(H, b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    "cl-duplicate-identical": (req(H, b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    "cl-list": (req(H, b"Content-Length: 5, 5", body=b"hello"), 400),
    "cl-negative": (req(H, b"Content-Length: -5"), 400),
    "cl-plus": (req(H, b"Content-Length: +5", body=b"hello"), 400),
    "cl-hex": (req(H, b"Content-Length: 0x5", body=b"hello"), 400),
    "cl-exponent": (req(H, b"Content-Length: 1e3"), 400),
    "cl-inner-space": (req(H, b"Content-Length: 5 5"), 400),
    "cl-empty": (req(H, b"Content-Length:"), 400),
    "cl-huge": (req(H, b"Content-Length: " + b"9" * 20), 400),
    "te-chunked-identity": (req(H, b"Transfer-Encoding: chunked, identity"), 400),
    "te-identity": (req(H, b"Transfer-Encoding: identity"), 400),
    "te-gzip-chunked": (req(H, b"Transfer-Encoding: gzip, chunked"), 400),
    "te-xchunked": (req(H, b"Transfer-Encoding: xchunked"), 400),
    "te-chunked-twice": (req(H, TE, TE), 400),
    "te-quoted": (req(H, b'Transfer-Encoding: "chunked"'), 400),
    "te-tab-leading": (req(H, b"Transfer-Encoding:\tchunked", body=b"0\r\n\r\n"), 400),
    "te-tab-trailing": (req(H, b"Transfer-Encoding: chunked\t", body=b"0\r\n\r\n"), 400),
    "te-vtab": (req(H, b"Transfer-Encoding: \x0bchunked"), 400),
    "te-space-before-colon": (req(H, b"Transfer-Encoding : chunked"), 400),
    "te-tab-before-colon": (req(H, b"Transfer-Encoding\t: chunked"), 400),
    "te-underscore-lookalike": (req(H, b"Transfer_Encoding: chunked", b"Content-Length: 3", body=b"abc"), 400),
    "cl-underscore-lookalike": (req(H, b"Content_Length: 3"), 400),
    "te-obs-fold": (req(H, b"Transfer-Encoding:", b" chunked"), 400),
    "te-in-http10": (req(TE, line=b"POST / HTTP/1.0", body=b"0\r\n\r\n"), 400),
    # field lines: RFC 9112 §5.1, §5.2; RFC 9110 §5.5
    "obs-fold": (req(H, b"X-A: a", b" b"), 400),
    "obs-fold-tab": (req(H, b"X-A: a", b"\tb"), 400),
    "first-line-folded": (req(b" Host: a"), 400),
    "nul-in-value": (req(H, b"X-A: a\x00b"), 400),
    "cr-in-value": (req(H, b"X-A: a\rb"), 400),
    "lf-in-value": (req(H, b"X-A: a\nb"), 400),
    "del-in-value": (req(H, b"X-A: a\x7fb"), 400),
    "space-in-name": (req(H, b"X A: b"), 400),
    "paren-in-name": (req(H, b"X(A): b"), 400),
    "non-ascii-name": (req(H, b"X\xc3\xa9: b"), 400),
    "empty-name": (req(H, b": b"), 400),
    "no-colon": (req(H, b"X-A b"), 400),
    "bare-lf-head": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare-lf-mixed": (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
    "missing-host": (req(line=b"GET / HTTP/1.1"), 400),
    "two-hosts": (req(H, b"Host: b", line=b"GET / HTTP/1.1"), 400),
    "cl-in-trailer": (req(H, TE, body=b"0\r\nContent-Length: 5\r\n\r\n"), 400),
    # chunks: RFC 9112 §7.1
    "chunk-non-hex": (req(H, TE, body=b"g\r\nx\r\n0\r\n\r\n"), 400),
    "chunk-0x": (req(H, TE, body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-negative": (req(H, TE, body=b"-1\r\n"), 400),
    "chunk-plus": (req(H, TE, body=b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-leading-space": (req(H, TE, body=b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-trailing-space": (req(H, TE, body=b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-empty-size": (req(H, TE, body=b"\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-overlong-zeros": (req(H, TE, body=b"00000000000000005\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-overflow": (req(H, TE, body=b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-ext-nul": (req(H, TE, body=b"5;a\x00b\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-ext-empty-name": (req(H, TE, body=b"5;\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-ext-bad-value": (req(H, TE, body=b"5;a=b c\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-ext-open-quote": (req(H, TE, body=b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    "chunk-bare-lf": (req(H, TE, body=b"5\nhello\r\n0\r\n\r\n"), 400),
    "chunk-data-too-long": (req(H, TE, body=b"3\r\nhello\r\n0\r\n\r\n"), 400),
    "chunk-missing-crlf": (req(H, TE, body=b"5\r\nhello0\r\n\r\n"), 400),
    "chunk-line-too-long": (req(H, TE, body=b"5;a=" + b"b" * 5000 + b"\r\n"), 400),
    # start line: RFC 9112 §2.3, §3
    "http09": (b"GET /\r\n\r\n", 400),
    "http20": (req(H, line=b"GET / HTTP/2.0"), 505),
    "http12": (req(H, line=b"GET / HTTP/1.2"), 505),
    "http-1-10": (req(H, line=b"GET / HTTP/1.10"), 400),
    "lowercase-http": (req(H, line=b"GET / http/1.1"), 400),
    "double-space": (req(H, line=b"GET  / HTTP/1.1"), 400),
    "tab-separator": (req(H, line=b"GET\t/ HTTP/1.1"), 400),
    "trailing-space": (req(H, line=b"GET / HTTP/1.1 "), 400),
    "unknown-method": (req(H, line=b"FROB / HTTP/1.1"), 501),
    "target-relative": (req(H, line=b"GET a/b HTTP/1.1"), 400),
    "target-non-ascii": (req(H, line=b"GET /\xc3\xa9 HTTP/1.1"), 400),
    "target-ftp": (req(H, line=b"GET ftp://a/ HTTP/1.1"), 400),
    "asterisk-not-options": (req(H, line=b"GET * HTTP/1.1"), 400),
    "connect-origin-form": (req(H, line=b"CONNECT / HTTP/1.1"), 400),
    "connect-absolute-form": (req(H, line=b"CONNECT http://a:443 HTTP/1.1"), 400),
    "connect-no-port": (req(H, line=b"CONNECT a HTTP/1.1"), 400),
    "connect-port-zero": (req(H, line=b"CONNECT a:0 HTTP/1.1"), 400),
    "connect-port-huge": (req(H, line=b"CONNECT a:70000 HTTP/1.1"), 400),
    "connect-userinfo": (req(H, line=b"CONNECT u@a:443 HTTP/1.1"), 400),
    # bounds
    "head-too-large": (req(H, b"X-A: " + b"a" * MAX_HEAD), 431),
    "too-many-headers": (req(H, *[b"X-%d: a" % i for i in range(100)]), 431),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_request_refused(name):
    data, status = BAD_REQUESTS[name]
    assert error_of("req", whole(data)).status == status
    assert error_of("req", bytewise(data)).status == status


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(BAD_REQUESTS)), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_request_refused_random_splits(name, cuts):
    data, status = BAD_REQUESTS[name]
    assert error_of("req", split_at(data, cuts)).status == status


def test_hundred_headers_is_the_limit():
    data = req(*[b"X-%d: a" % i for i in range(99)], b"Host: a", line=b"GET / HTTP/1.1")
    assert len(run("req", whole(data))[0].headers) == 100


def test_error_is_sticky_and_carries_prior_events():
    parser = RequestParser()
    with pytest.raises(ProtocolError) as info:
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert merged(info.value.events) == [head(), EndOfMessage()]
    with pytest.raises(ProtocolError):
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


@pytest.mark.parametrize("close", [
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
])
def test_trailing_garbage_after_closing_message_is_dropped(close):
    garbage = b"\x00\xffGET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n"
    for pieces in (whole(close + garbage), bytewise(close + garbage)):
        parser = RequestParser()
        events = merged([ev for piece in pieces for ev in parser.feed(piece)])
        assert [type(ev) for ev in events if not isinstance(ev, Data)] == [RequestHead, EndOfMessage]
        assert parser.discarded == len(garbage)
        assert parser.feed_eof() == []


def test_eof_mid_message_is_refused():
    for data, kind, expect in [
        (b"GET / HTTP/1.1\r\nHo", "req", ()),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel", "req", ()),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", "resp", (b"GET",)),
    ]:
        assert error_of(kind, whole(data), expect, eof=True).status == (400 if kind == "req" else 502)


def test_eof_between_messages_is_clean():
    assert run("req", whole(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), eof=True) == [head(), EndOfMessage()]


# --- refused responses ------------------------------------------------------------------------

def rsp(*fields, line=b"HTTP/1.1 200 OK", body=b""):
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


BAD_RESPONSES = {
    "cl-and-te": rsp(b"Content-Length: 5", TE, body=b"0\r\n\r\n"),
    "cl-conflict": rsp(b"Content-Length: 5", b"Content-Length: 6"),
    "cl-duplicate-identical": rsp(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
    "cl-alpha": rsp(b"Content-Length: five"),
    "te-not-chunked": rsp(b"Transfer-Encoding: gzip"),
    "te-chunked-identity": rsp(b"Transfer-Encoding: chunked, identity"),
    "obs-fold": rsp(b"X-A: a", b" b", b"Content-Length: 0"),
    "nul-in-value": rsp(b"X-A: a\x00", b"Content-Length: 0"),
    "bad-chunk": rsp(TE, body=b"zz\r\n"),
    "status-four-digits": rsp(line=b"HTTP/1.1 2000 OK"),
    "status-600": rsp(line=b"HTTP/1.1 600 Odd"),
    "http2": rsp(line=b"HTTP/2 200 OK"),
    "http20": rsp(line=b"HTTP/2.0 200 OK"),
    "http09-ish": b"hello world\r\n\r\n",
    "switching-protocols": rsp(b"Upgrade: websocket", b"Connection: upgrade", line=b"HTTP/1.1 101 Switching"),
    "head-too-large": rsp(b"X-A: " + b"a" * MAX_HEAD),
    "unsolicited-second": rsp(b"Content-Length: 0") + rsp(b"Content-Length: 0"),
}


@pytest.mark.parametrize("name", BAD_RESPONSES)
def test_response_refused_with_502(name):
    data = BAD_RESPONSES[name]
    assert error_of("resp", whole(data), [b"GET"]).status == 502
    assert error_of("resp", bytewise(data), [b"GET"]).status == 502


def test_response_without_request_is_refused():
    assert error_of("resp", whole(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).status == 502


def test_connect_is_never_expected_upstream():
    with pytest.raises(ValueError):
        ResponseParser().expect(b"CONNECT")


# --- streaming with bounded buffering ---------------------------------------------------------

def test_ten_megabyte_chunked_body_streams():
    body = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    wire = bytearray(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(body), 100_000):                      # chunks that straddle the reads
        wire += chunk(body[i:i + 100_000])
    wire += last_chunk()
    parser = RequestParser()
    received = 0
    digest_ok = True
    for i in range(0, len(wire), 65_536):
        events = parser.feed(bytes(wire[i:i + 65_536]))
        for ev in events:
            if isinstance(ev, Data):
                digest_ok &= body[received:received + len(ev.data)] == ev.data
                received += len(ev.data)
        # Nothing but a partial chunk-size line may be held back: the body is never accumulated.
        assert parser.buffered < 32
    assert digest_ok and received == len(body)
    assert isinstance(events[-1], EndOfMessage)


def test_until_close_response_streams():
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    for i in range(100):
        assert parser.feed(b"data: %d\n\n" % i) == [Data(b"data: %d\n\n" % i)]
        assert parser.buffered == 0
    assert parser.feed_eof() == [EndOfMessage()]


# --- serialisation ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["get", "post-length", "ows-and-obs-text", "absolute-form", "connect"])
def test_request_head_round_trip(name):
    data, expected = REQUESTS[name]
    first = expected[0]
    assert run("req", whole(serialize_request_head(first) + (b"hello" if first.content_length else b"")))[0] == first


def test_response_head_round_trip():
    first = RESPONSES["length-keepalive"][3][0]
    parser = ResponseParser()
    parser.expect(b"GET")
    assert parser.feed(serialize_response_head(first))[0] == first


def test_headers_override_and_injection_refused():
    first = REQUESTS["get"][1][0]
    assert serialize_request_head(first, ((b"Host", b"b"),)) == b"GET /a?b=c HTTP/1.1\r\nHost: b\r\n\r\n"
    for bad in [((b"X", b"a\r\nEvil: 1"),), ((b"X", b"a\x00"),), ((b"X Y", b"a"),), ((b"X", b"a\n"),)]:
        with pytest.raises(ValueError):
            serialize_request_head(first, bad)


def test_chunk_helpers_parse_back():
    assert chunk(b"") == b""
    wire = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(b"a" * 300) + chunk(b"") + chunk(b"b") + last_chunk(((b"X-Sum", b"ok"),)))
    events = run("req", whole(wire))
    assert events[1:] == [Data(b"a" * 300 + b"b"), EndOfMessage(((b"X-Sum", b"ok"),))]


def test_strip_hop_by_hop():
    headers = (
        (b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret, content-length, Host"), (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"), (b"Transfer-Encoding", b"chunked"), (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic eA=="), (b"Content-Length", b"5"), (b"Accept", b"*/*"),
    )
    # Connection may not strip Content-Length or Host: that would unframe the body upstream.
    assert strip_hop_by_hop(headers) == ((b"Host", b"a"), (b"Content-Length", b"5"), (b"Accept", b"*/*"))
