"""Credentials the agent never holds: stripped from what it sends, injected after the decision (issue 4).

Pure: headers in, headers out. The secrets arrive in the monitor's memory from `gvmrt create` (a
0600 secrets file or GVMRT_SECRET_<NAME> in its environment); they are never in the bundle, the
plan, the state dir, the jail or a record. A record names the credential that was injected.

On a host any credential covers, every header that commonly carries a credential is removed
(the agent's own Authorization never reaches it), and the credential whose scope matches the
request (host, method, every form of the path) is added. A placeholder (what the agent finds in
its environment so SDKs start) sent anywhere outside its credential's scope is a refusal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gvmrt.policy.canon import UnsafePath, canonical_paths
from gvmrt.policy.matcher import glob_to_regex

__all__ = ["Credentials", "STRIPPED"]

# Headers that carry credentials by convention; plus each credential's own header.
STRIPPED = frozenset({b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"x-auth-token",
                      b"x-http-method-override", b"x-http-method", b"x-method-override"})


@dataclass(frozen=True)
class _Cred:
    name: str
    hosts: tuple[str, ...]
    methods: frozenset[str] | None
    path_match: Any
    header: bytes
    value: bytes
    placeholder: bytes
    strip: frozenset[bytes]

    def covers(self, host: str) -> bool:
        return any(h == "*" or h == host or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def in_scope(self, method: str, host: str, target: str, scheme: str = "https") -> bool:
        # Only ever over TLS: a secret on plain HTTP is readable by anyone on the path.
        if scheme != "https" or not self.covers(host) or (self.methods is not None and method not in self.methods):
            return False
        if self.path_match is None:
            return True
        try:
            forms = canonical_paths(target)
        except UnsafePath:
            return False
        return all(self.path_match(p) is not None for p in forms)   # every reading of the path


class Credentials:
    def __init__(self, declared: list[dict[str, Any]], secrets: dict[str, str]) -> None:
        """`declared`: the plan's gvm.credentials (validated JSON); `secrets`: name -> value."""
        self.creds = []
        for c in declared:
            secret = secrets[c["name"]]
            paths = c.get("paths")
            self.creds.append(_Cred(
                c["name"], tuple(c["hosts"]), frozenset(c["methods"]) if c.get("methods") else None,
                re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in paths)).fullmatch if paths else None,
                c["inject"]["header"].encode("ascii"),
                c["inject"].get("format", "{secret}").replace("{secret}", secret).encode("latin-1"),
                c["placeholder"].encode("ascii"),
                frozenset(n.lower().encode("ascii") for n in c.get("strip") or ())))

    def __bool__(self) -> bool:
        return bool(self.creds)

    def misuse(self, method: str, host: str, target: str, headers: Any, scheme: str = "https") -> str | None:
        """Why a request that carries a placeholder out of its credential's scope is refused, or None."""
        for cred in self.creds:
            if any(cred.placeholder in v for _, v in headers) and not cred.in_scope(method, host, target, scheme):
                return (f"the placeholder of credential {cred.name!r} was sent to {host} ({method} outside "
                        f"its scope); it is worth nothing there, and the attempt is recorded")
        return None

    def apply(self, method: str, host: str, target: str, headers: tuple[tuple[bytes, bytes], ...],
              scheme: str = "https") -> tuple[tuple[tuple[bytes, bytes], ...], str | None]:
        """(headers to send upstream, name of the credential injected or None). Method-override
        headers are stripped too on covered hosts: they would widen a method-scoped credential."""
        covering = [c for c in self.creds if c.covers(host)]
        if not covering:
            return headers, None
        strip = STRIPPED.union(*(c.strip | {c.header.lower()} for c in covering))
        out = tuple((n, v) for n, v in headers if n.lower() not in strip)
        for cred in covering:
            if cred.in_scope(method, host, target, scheme):
                return out + ((cred.header, cred.value),), cred.name
        return out, None
