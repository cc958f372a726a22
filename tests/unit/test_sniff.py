"""The ClientHello reader of transparent capture (gvmrt.proxy.sniff), on real ClientHellos.

The hellos come from the standard library's TLS client (OpenSSL) writing into a memory BIO, so
they carry what real clients send (key shares, ALPN, session tickets), not a hand-made record.
"""

from __future__ import annotations

import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.proxy import sniff


def client_hello(server_hostname: str | None, **ctx_opts: object) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    for k, v in ctx_opts.items():
        setattr(ctx, k, v)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("api.example.com")
    assert sniff.needed(hello) == 0
    assert sniff.classify(hello) == sniff.Hello(tls=True, sni="api.example.com")


def test_tls12_only_client_hello() -> None:
    hello = client_hello("old.example.com", maximum_version=ssl.TLSVersion.TLSv1_2)
    assert sniff.classify(hello).sni == "old.example.com"


def test_no_sni_is_a_problem_not_a_name() -> None:
    got = sniff.classify(client_hello(None))
    assert got.tls and got.sni is None and "no SNI" in (got.problem or "")


def test_ip_literal_clients_send_no_sni() -> None:
    # RFC 6066 §3: no SNI for an address; OpenSSL's client follows it.
    got = sniff.classify(client_hello("192.0.2.1"))
    assert got.sni is None and got.problem


def test_plain_http_is_not_tls() -> None:
    assert sniff.needed(b"GET / HTTP/1.1\r\n") == 0
    assert sniff.classify(b"GET / HTTP/1.1\r\n") == sniff.Hello(tls=False)
    assert sniff.classify(b"") == sniff.Hello(tls=False)


def test_partial_record_asks_for_the_rest() -> None:
    hello = client_hello("api.example.com")
    assert sniff.needed(hello[:3]) == 5
    assert sniff.needed(hello[:100]) == len(hello)
    got = sniff.classify(hello[:100])
    assert got.tls and got.sni is None and "truncated" in (got.problem or "")


def test_handshake_that_is_not_a_client_hello() -> None:
    record = b"\x16\x03\x01\x00\x04" + b"\x02\x00\x00\x00"   # a ServerHello header
    assert "ClientHello" in (sniff.classify(record).problem or "")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    got = sniff.classify(b"\x16" + data)
    assert got.tls and (got.sni is not None) != (got.problem is not None)


HELLO = client_hello("api.example.com")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=8))
def test_corrupted_real_hello_never_raises(pos: int, junk: bytes) -> None:
    hello = bytearray(HELLO)
    pos %= len(hello)
    hello[pos:pos + len(junk)] = junk
    got = sniff.classify(bytes(hello))
    assert got.sni is None or isinstance(got.sni, str)
