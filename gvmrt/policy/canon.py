"""Canonical forms of request paths, hosts and queries for policy matching (pure; no I/O).

An agent that wants past a Deny rule for ``/admin*`` will spell the path the way the *upstream*
reads it but the policy does not: ``/a/%2e%2e/admin``, ``//admin``, ``\\admin``, ``/a/..;/admin``.
So the matcher tries every form returned by `canonical_paths` (the raw one and the canonical ones)
and keeps the most restrictive decision: an encoding can only make a request *more* likely to be
denied, never less.

Paths are case-sensitive (RFC 3986 §6.2.2.1: only scheme and host are case-insensitive), so
``/ADMIN`` does not match a rule for ``/admin``; a policy that guards a case-insensitive upstream
(IIS, some object stores) needs a rule per spelling or a ``path_regex`` with ``(?i)``.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import parse_qsl, unquote

__all__ = ["UnsafePath", "BadHost", "canonical_paths", "canonical_path", "canonical_host", "parse_query",
           "split_target"]

# How many layers of percent-encoding are peeled off. Upstreams decode once, proxies and
# frameworks sometimes twice (`%252e` → `%2e` → `.`); a path still encoded after four rounds has no
# honest reason to exist and is refused rather than matched half-decoded.
MAX_DECODE_ROUNDS = 4

# Anything that could make the raw form differ from the canonical one; a path with none of them
# is already canonical (the common case, and the fast path).
_SUSPECT = re.compile(r"%|\\|//|/\.|;|\x00")


class UnsafePath(ValueError):
    """The request path can never be matched safely (NUL, or percent-encoded too deeply)."""


class BadHost(ValueError):
    """The host name is not one the policy can compare (bad characters, non-encodable IDN)."""


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of an origin-form or absolute-form request target (RFC 9112 §3.2)."""
    if target.startswith(("http://", "https://", "HTTP://", "HTTPS://")):
        # absolute-form: drop scheme and authority; the host is matched from the Host/CONNECT target.
        rest = target.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        target = rest[cut:]
    target = target.split("#", 1)[0]  # a fragment is never sent (RFC 9110 §7.1); ignore one if it is
    path, _, query = target.partition("?")
    return path, query


def _decode(path: str) -> str:
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = unquote(path, errors="replace")
        if decoded == path:
            return path
        path = decoded
    if unquote(path, errors="replace") != path:
        raise UnsafePath(f"path is percent-encoded more than {MAX_DECODE_ROUNDS} times")
    return path


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path that starts with "/" and has no empty segments."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")  # "/a/.." → "/" (the output keeps its trailing slash)
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _normalise(decoded: str, strip_params: bool) -> str:
    # Backslash is a separator for IIS, Windows backends and WHATWG URL parsing of special schemes.
    path = decoded.replace("\\", "/")
    if strip_params:
        # Tomcat and Spring treat ";..." as a path parameter and drop it before routing, so
        # "/a/..;/admin" reaches /admin ("Breaking Parser Logic", O. Tsai, Black Hat 2018).
        path = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    # Collapse duplicate slashes (nginx merge_slashes, most routers), then dot segments.
    path = "/" + "/".join(seg for seg in path.split("/") if seg)
    if path != "/" and decoded.replace("\\", "/").endswith("/"):
        path += "/"
    return _remove_dot_segments(path)


def canonical_path(target: str) -> str:
    """The canonical form of the target's path (parameters kept); UnsafePath as `canonical_paths`."""
    path, _ = split_target(target)
    raw = path if path.startswith("/") else "/" + path
    if not _SUSPECT.search(raw):
        return raw
    return _normalise(_checked_decode(raw), strip_params=False)


def _checked_decode(raw: str) -> str:
    if "\x00" in raw:
        raise UnsafePath("path contains a NUL byte")
    decoded = _decode(raw)
    if "\x00" in decoded:
        raise UnsafePath("path contains an encoded NUL byte (%00)")
    return decoded


def canonical_paths(raw_target: str) -> list[str]:
    """Every form of the request path a policy must try: the raw path first, then canonical forms.

    Canonical: percent-decoded until stable (at most 4 rounds), backslash as slash, duplicate
    slashes collapsed, dot segments removed (RFC 3986 §5.2.4); a second canonical form also drops
    ";parameters" from every segment. Every form starts with "/"; duplicates are dropped.
    Raises UnsafePath if the path holds a NUL, literally or encoded, at any decoding depth.
    """
    path, _ = split_target(raw_target)
    raw = path if path.startswith("/") else "/" + path
    if not _SUSPECT.search(raw):
        return [raw]
    decoded = _checked_decode(raw)
    forms = [raw]
    for strip in (False, True):
        form = _normalise(decoded, strip)
        if form not in forms:
            forms.append(form)
    return forms


_HOST_CHARS = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_IPV6 = re.compile(r"[0-9a-f:.]+(%[a-z0-9._~-]+)?")


@functools.lru_cache(maxsize=4096)   # pure; twice per request (sidecar, then policy), same few hosts
def canonical_host(host: str) -> str:
    """Lowercase ASCII host name without port or trailing dot; IDNs in punycode (xn--).

    "Example.COM.:443" → "example.com"; "[::1]:8080" → "[::1]"; "bücher.de" → "xn--bcher-kva.de".
    Raises BadHost for anything else (spaces, "@", empty labels, IDNs that do not encode).
    """
    h = host.strip()
    if h.startswith("["):  # IPv6 literal, RFC 3986 §3.2.2
        end = h.find("]")
        inner = h[1:end].lower() if end > 0 else ""
        port = h[end + 1:] if end > 0 else ""
        if not inner or not _IPV6.fullmatch(inner) or (port and not (port[0] == ":" and port[1:].isdigit())):
            raise BadHost(f"{host!r} is not a valid IPv6 literal")
        return f"[{inner}]"
    if h.count(":") == 1:
        h, _, port = h.partition(":")
        if port and not port.isdigit():
            raise BadHost(f"{host!r} has a non-numeric port")
    elif h.count(":") > 1:  # a bare IPv6 address, as some clients send in CONNECT
        inner = h.lower()
        if not _IPV6.fullmatch(inner):
            raise BadHost(f"{host!r} is not a valid host")
        return f"[{inner}]"
    if h.endswith("."):
        h = h[:-1]
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise BadHost(f"{host!r} is not a valid internationalised domain name ({exc})") from exc
    h = h.lower()
    if not _HOST_CHARS.fullmatch(h):
        raise BadHost(f"{host!r} is not a valid host name")
    return h


def parse_query(target: str) -> dict[str, list[str]]:
    """Query parameters of a request target, decoded once as an upstream would (``+`` is a space).

    Every occurrence of a repeated key is kept, in order: upstreams disagree on whether the first
    or the last wins, so the matcher looks at all of them.
    """
    _, query = split_target(target)
    out: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        out.setdefault(key, []).append(value)
    return out
