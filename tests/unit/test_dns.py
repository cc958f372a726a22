"""gvmrt.proxy.dns: the strict query parser, replies, the tunnelling detector (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.proxy import dns


def q(name: str, qtype: int = 1, flags: int = 0x0100, extra: bytes = b"", counts: tuple[int, int, int, int] = (1, 0, 0, 0)
      ) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, *counts) + b"".join(
        bytes([len(label)]) + label.encode() for label in name.split(".") if label) + b"\0" + \
        struct.pack("!HH", qtype, 1) + extra


def test_parse_a_query_and_answer_it() -> None:
    query = dns.parse(q("API.Example.COM"))
    assert (query.qid, query.name, query.type_name) == (0xBEEF, "api.example.com", "A")
    reply = dns.answer(query, ["192.0.2.1", "2001:db8::1", "192.0.2.2"])
    qid, flags, qd, an = struct.unpack("!HHHH", reply[:8])
    assert (qid, flags & 0x8000, flags & 0x0100, flags & 0xF, qd, an) == (0xBEEF, 0x8000, 0x0100, 0, 1, 2)
    assert reply.endswith(bytes([192, 0, 2, 2]))


def test_edns_opt_is_accepted() -> None:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    assert dns.parse(q("a.b", extra=opt, counts=(1, 0, 0, 1))).name == "a.b"


@pytest.mark.parametrize("msg, rcode", [
    (q("a.b", counts=(0, 0, 0, 0)), dns.FORMERR),
    (q("a.b", counts=(2, 0, 0, 0)), dns.FORMERR),
    (q("a.b", counts=(1, 1, 0, 0)), dns.FORMERR),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", dns.FORMERR),
    (struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05ab", dns.FORMERR),
    (q("a.b") + b"junk", dns.FORMERR),
    (q("a.b", flags=0x2800), dns.NOTIMP),                 # opcode UPDATE
    (q("a.b")[:-2] + b"\x00\x03", dns.NOTIMP),            # class CH
    (q("a.b", extra=b"\x00\x00\x01", counts=(1, 0, 0, 1)), dns.FORMERR),
])
def test_malformed_queries_get_an_rcode(msg: bytes, rcode: int) -> None:
    with pytest.raises(dns.DNSError) as info:
        dns.parse(msg)
    assert info.value.rcode == rcode
    reply = dns.error_reply(info.value)
    assert reply is not None and struct.unpack("!H", reply[2:4])[0] & 0xF == rcode


def test_no_header_or_a_response_is_dropped() -> None:
    for msg in (b"", b"\x01\x02\x03", q("a.b", flags=0x8100)):
        with pytest.raises(dns.DNSError) as info:
            dns.parse(msg)
        assert dns.error_reply(info.value) is None


def test_names_over_255_bytes_are_refused() -> None:
    with pytest.raises(dns.DNSError):
        dns.parse(q(".".join(["a" * 63] * 5)))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_never_raises_anything_but_dnserror(data: bytes) -> None:
    try:
        dns.parse(data)
    except dns.DNSError:
        pass


def test_tunnelling_burst_per_parent_in_a_window() -> None:
    t = dns.Tunnelling(per_parent=5, overall=1000, window_s=10)
    assert all(t.observe(f"x{i}.exfil.example", now=i) is None for i in range(5))
    assert t.observe("x5.exfil.example", now=5) is not None
    assert t.observe("x0.exfil.example", now=5) is not None, "still within the window"
    assert t.observe("fresh.exfil.example", now=100) is None, "the window moved on"
    assert all(t.observe("same.other.example", now=200 + i) is None for i in range(50)), "repeats are not unique"


@pytest.mark.parametrize("label", [b"a.b", b"a\x00b", b"\x1b]0;pwned\x07", b"a b", b"caf\xc3\xa9"])
def test_labels_with_other_bytes_are_refused(label: bytes) -> None:
    msg = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + bytes([len(label)]) + label + b"\x04test\x00" + \
        struct.pack("!HH", 1, 1)
    with pytest.raises(dns.DNSError) as info:
        dns.parse(msg)
    assert info.value.rcode == dns.FORMERR


def test_tunnelling_memory_is_bounded() -> None:
    t = dns.Tunnelling(per_parent=10**9, overall=10**9, window_s=10)
    t.MAX_NAMES = 100
    for i in range(100):
        t.observe(f"n{i}.p{i}.example", now=0)
    assert t.observe("one-more.example", now=1) is not None, "beyond the bound: flagged, not stored"
    assert len(t.last_seen) == 100 and len(t.parents) == 100
    t.observe("late.example", now=100)           # the window moved on: everything old is forgotten
    assert list(t.last_seen) == ["late.example"] and t.parents == {"late.example": 1}
