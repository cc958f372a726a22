"""Canonical paths, hosts and queries (gvmrt.policy.canon): the evasion table and properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.policy.canon import (
    BadHost, UnsafePath, canonical_host, canonical_path, canonical_paths, parse_query, split_target,
)

# --- paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, canonical", [
    ("/", "/"),
    ("", "/"),
    ("/api/v1/items", "/api/v1/items"),
    ("/a/%2e%2e/admin", "/admin"),
    ("/a/%2E%2E/admin", "/admin"),
    ("/a/%252e%252e/admin", "/admin"),          # double-encoded dot segment
    ("/a/%25252e%25252e/admin", "/admin"),      # triple
    ("//admin", "/admin"),
    ("///admin//x", "/admin/x"),
    ("/foo/../admin", "/admin"),
    ("/foo/bar/../../admin", "/admin"),
    ("/../../admin", "/admin"),                 # above the root stays at the root
    ("/%61dmin", "/admin"),
    ("/admin/./x", "/admin/x"),
    ("\\admin", "/admin"),
    ("/a\\..\\admin", "/admin"),
    ("/a%5c..%5cadmin", "/admin"),              # encoded backslash
    ("/a/%2e%2e%2fadmin", "/admin"),            # encoded slash joins the dot segment
    ("/admin/", "/admin/"),                     # trailing slash kept
    ("/a/..", "/"),
    ("/a/.", "/a/"),
    ("/admin?x=/../y", "/admin"),               # the query is not part of the path
    ("/admin#frag", "/admin"),
    ("http://example.com/a/../admin?q=1", "/admin"),  # absolute-form
    ("https://example.com", "/"),
])
def test_canonical_path(target: str, canonical: str) -> None:
    assert canonical_path(target) == canonical
    forms = canonical_paths(target)
    assert canonical in forms
    assert forms[0] == (split_target(target)[0] if split_target(target)[0].startswith("/")
                        else "/" + split_target(target)[0])


def test_raw_form_comes_first_and_is_kept() -> None:
    assert canonical_paths("/a/%2e%2e/admin") == ["/a/%2e%2e/admin", "/admin"]
    assert canonical_paths("/plain") == ["/plain"]


def test_path_parameters_give_an_extra_form() -> None:
    # Tomcat/Spring drop ";params" per segment: "/a/..;/admin" is /admin to them.
    assert canonical_paths("/a/..;/admin") == ["/a/..;/admin", "/admin"]
    assert canonical_paths("/admin;jsessionid=1") == ["/admin;jsessionid=1", "/admin"]
    assert canonical_path("/admin;jsessionid=1") == "/admin;jsessionid=1"


def test_paths_are_case_sensitive() -> None:
    # RFC 3986 §6.2.2.1: only scheme and host are case-insensitive.
    assert canonical_paths("/ADMIN") == ["/ADMIN"]


@pytest.mark.parametrize("target", ["/admin%00.txt", "/admin\x00.txt", "/admin%2500.txt", "/%252500"])
def test_nul_is_refused(target: str) -> None:
    with pytest.raises(UnsafePath, match="NUL"):
        canonical_paths(target)


def test_too_deep_encoding_is_refused() -> None:
    five = "/a/%" + "25" * 4 + "2e"  # %2525252525e: five rounds to reach "."
    with pytest.raises(UnsafePath, match="more than 4"):
        canonical_paths(five)
    assert canonical_path("/a/%" + "25" * 3 + "2e") == "/a/"  # four rounds: fine


def test_invalid_percent_and_utf8_survive() -> None:
    assert canonical_path("/a%zz/b") == "/a%zz/b"
    assert canonical_path("/%ff") == "/\ufffd"


_ENCODED_DOT_OR_SLASH = re.compile(r"%(2e|2f|5c|25|00)", re.I)

_path_chars = st.sampled_from(["/", "\\", ".", "..", "%2e", "%2E", "%252e", "%2f", "%5c", "%25", "%", ";",
                               "a", "b", "admin", "x", "%61", "~", "-", "?", "#"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_path_chars, max_size=20).map("".join))
def test_canonicalisation_is_idempotent_and_clean(path: str) -> None:
    try:
        forms = canonical_paths(path)
    except UnsafePath:
        return
    assert all(f.startswith("/") for f in forms)
    canonicals = forms[1:] if len(forms) > 1 else forms
    for form in canonicals:
        assert canonical_paths(form)[-1] == form or ";" in form  # idempotent (";" gives one more form)
        assert "//" not in form
        assert "/../" not in form and not form.endswith("/..")
        assert "/./" not in form and not form.endswith("/.")
        assert "\\" not in form
        assert not _ENCODED_DOT_OR_SLASH.search(form)
    canonical = canonical_path(path)
    assert canonical_path(canonical) == canonical


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_canonical_path_never_crashes(text: str) -> None:
    try:
        forms = canonical_paths(text)
    except UnsafePath:
        assert "\x00" in text or "%" in text
        return
    assert all(f.startswith("/") for f in forms)


# --- hosts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("host, canonical", [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("example.com:443", "example.com"),
    ("EXAMPLE.com.:8443", "example.com"),
    ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]:8080", "[::1]"),
    ("[::FFFF:127.0.0.1]", "[::ffff:127.0.0.1]"),
    ("::1", "[::1]"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("my_host.internal", "my_host.internal"),
])
def test_canonical_host(host: str, canonical: str) -> None:
    assert canonical_host(host) == canonical


@pytest.mark.parametrize("host", ["", ".", "a..b", "exa mple.com", "user@example.com", "example.com:http",
                                  "[::1", "[zz::1]", "[::1]x", "a/b", "example.com..", "\u2028.com"])
def test_bad_hosts(host: str) -> None:
    with pytest.raises(BadHost):
        canonical_host(host)


# --- query ---------------------------------------------------------------------------------------

def test_parse_query() -> None:
    assert parse_query("/p?a=1&b=two+words&a=3&empty=&flag") == {
        "a": ["1", "3"], "b": ["two words"], "empty": [""], "flag": [""]}
    assert parse_query("/p") == {}
    assert parse_query("/p?x=%2541") == {"x": ["%41"]}  # decoded once, as an upstream would
    assert parse_query("http://h/p?k=v#frag") == {"k": ["v"]}
