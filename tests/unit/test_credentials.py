"""gvmrt.proxy.credentials: what is stripped, what is injected, what is refused (pure)."""

from __future__ import annotations

from gvmrt.proxy.credentials import Credentials

DECL = [{"name": "gh", "inject": {"header": "Authorization", "format": "token {secret}"},
         "hosts": ["api.github.com", "*.githubusercontent.com"], "methods": ["GET"], "paths": ["/repos/**"],
         "placeholder": "gvmrt-placeholder-gh"},
        {"name": "key", "inject": {"header": "X-Api-Key"}, "hosts": ["api.example.com"],
         "placeholder": "gvmrt-placeholder-key", "strip": ["Cookie"]}]
C = Credentials(DECL, {"gh": "ghp_real", "key": "k-real"})


def test_in_scope_gets_the_secret_and_loses_the_agents_own() -> None:
    headers = ((b"Authorization", b"Bearer mine"), (b"X-Api-Key", b"x"), (b"Accept", b"*/*"))
    out, name = C.apply("GET", "api.github.com", "/repos/a/b?x=1", headers)
    assert name == "gh" and out == ((b"Accept", b"*/*"), (b"Authorization", b"token ghp_real"))


def test_covered_host_out_of_scope_is_stripped_not_injected() -> None:
    for method, target in (("POST", "/repos/a"), ("GET", "/user"), ("GET", "/repos/../user"),
                           ("GET", "/repos/%2e%2e/user"), ("GET", "/repos%00/x")):
        out, name = C.apply(method, "api.github.com", target, ((b"authorization", b"mine"),))
        assert (out, name) == ((), None), (method, target)


def test_other_hosts_are_left_alone() -> None:
    headers = ((b"Authorization", b"Bearer mine"),)
    assert C.apply("GET", "pypi.org", "/simple/", headers) == (headers, None)


def test_wildcard_host_and_header_only_credential() -> None:
    assert C.apply("GET", "raw.githubusercontent.com", "/repos/x", ())[1] == "gh"
    assert C.apply("DELETE", "api.example.com", "/anything", ((b"x-api-key", b"mine"),)) == (
        ((b"X-Api-Key", b"k-real"),), "key")


def test_placeholder_outside_its_scope_is_misuse() -> None:
    ph = ((b"Authorization", b"token gvmrt-placeholder-gh"),)
    assert C.misuse("GET", "api.github.com", "/repos/a", ph) is None
    for method, host, target in (("POST", "api.github.com", "/repos/a"), ("GET", "evil.example", "/repos/a"),
                                 ("GET", "api.github.com", "/user")):
        why = C.misuse(method, host, target, ph)
        assert why is not None and "'gh'" in why and "ghp_real" not in why
    assert C.misuse("GET", "evil.example", "/", ((b"Cookie", b"a=gvmrt-placeholder-key"),)) is not None
    assert C.misuse("GET", "evil.example", "/", ((b"Cookie", b"a=b"),)) is None


def test_no_credentials_is_falsy() -> None:
    assert not Credentials([], {})


def test_configured_extra_headers_are_stripped_too() -> None:
    headers = ((b"Cookie", b"session=agent"), (b"Accept", b"*/*"))
    out, _ = C.apply("GET", "api.example.com", "/", headers)
    assert (b"Cookie", b"session=agent") not in out and (b"Accept", b"*/*") in out
    assert C.apply("GET", "api.github.com", "/repos/x", headers)[0][:2] == headers, "only where configured"


def test_never_over_plain_http_and_method_overrides_are_stripped() -> None:
    out, name = C.apply("GET", "api.github.com", "/repos/x", ((b"X-HTTP-Method-Override", b"DELETE"),), "http")
    assert (out, name) == ((), None)
    assert C.misuse("GET", "api.github.com", "/repos/x", ((b"Authorization", b"token gvmrt-placeholder-gh"),),
                    "http") is not None
