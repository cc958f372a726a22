"""Compiled egress policy: one decision per request, found by host index, not by scanning rules.

`CompiledPolicy.compile(egress)` turns the validated model into tables once (per reload), and
`CompiledPolicy.from_json(data)` does the same from the validated policy's JSON without importing
pydantic (the sidecar's way: gvmrt.policy.decision); `decide` takes the request's values and
returns a `Verdict`. No I/O, no clock unless rules expire (and then
`now` can be passed in), so the proxy can call it on the hot path and tests can call it bare.

Lookup (DESIGN.md §6, issue 3 target: median ≤ 20 µs with 10,000 rules): rules are indexed by
exact host, by wildcard suffix and a short list of "*" rules. A request's candidates are the rules of
its host, of each of its label suffixes (a.b.example.com → b.example.com, example.com, com) and the
"*" rules, merged by rule order: O(labels + candidates), independent of the policy's size. The
merged list is cached per host.
"""

from __future__ import annotations

import heapq
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gvmrt.policy.canon import BadHost, UnsafePath, canonical_host, canonical_paths, parse_query
from gvmrt.policy.decision import ALLOW, CAUTION_JSON, UNINSPECTABLE_JSON, Decision, severity

TYPE_CHECKING = False
if TYPE_CHECKING:
    from gvmrt.policy.model import Egress

__all__ = ["CompiledPolicy", "Verdict", "glob_to_regex", "MAX_JSON_BODY"]

# Bodies larger than this are never buffered for inspection; a rule that needs the body then
# applies its on_uninspectable decision.
MAX_JSON_BODY = 64 * 1024

_HOST_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class Verdict:
    rule_id: str | None
    decision: Decision
    flagged: bool
    reason: str
    # In watch mode: what enforce mode would have decided (``decision`` is then Allow).
    would: Decision | None = None


def glob_to_regex(glob: str) -> str:
    """Regex source for a path glob: ``*`` within one segment, ``**`` across segments.

    ``/admin*`` matches /admin, /admin.txt, /administrator but not /admin/x; ``/admin/**`` matches
    /admin and everything below it; ``/a/**/b`` matches /a/b, /a/x/b, /a/x/y/b. Everything else is
    literal (``?`` too: the query is never part of the path).
    """
    out = []
    i = 0
    while i < len(glob):
        if glob.startswith("/**/", i):
            out.append("(?:/.*)?/")
            i += 4
        elif glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("(?:/.*)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


class _Compiled:
    """One rule with its matchers prepared; ``match`` is the hot path."""

    __slots__ = ("order", "hosts", "id", "methods", "ports", "path_match", "query", "permissive",
                 "json_fields", "expires_ts", "decision", "on_uninspectable")

    def __init__(self, order: int, rule: dict[str, Any], decision: Any = Decision.from_json) -> None:
        """`rule`: one validated rule as JSON (canonical hosts, upper-case methods); `decision`
        makes a Decision from its JSON (from_json passes one that shares equal decisions)."""
        self.order = order
        self.hosts: list[str] = rule["hosts"]
        self.id: str = rule["id"]
        self.methods = frozenset(rule["methods"]) if rule.get("methods") else None
        self.ports = frozenset(rule["ports"]) if rule.get("ports") else None
        if rule.get("paths") is not None:
            self.path_match = re.compile("|".join(f"(?:{glob_to_regex(g)})" for g in rule["paths"])).fullmatch
        elif rule.get("path_regex") is not None:
            self.path_match = re.compile(rule["path_regex"]).fullmatch
        else:
            self.path_match = None
        self.query = tuple(rule["query"].items()) if rule.get("query") else None
        self.decision = decision(rule["decision"])
        # A permissive rule (allow, audit_only) must not be satisfied by one of several values of a
        # repeated key: upstreams differ on which occurrence wins (HTTP parameter pollution).
        self.permissive = self.decision.action in ("allow", "audit_only")
        fields = rule.get("json")
        self.json_fields = tuple((_split_pointer(p), v) for p, v in fields.items()) if fields else None
        expires = rule.get("expires")
        self.expires_ts = datetime.fromisoformat(expires).timestamp() if expires else None
        self.on_uninspectable = decision(rule.get("on_uninspectable") or UNINSPECTABLE_JSON)

    def match_head(self, method: str, port: int, path: str, query: dict[str, list[str]] | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.ports is not None and port not in self.ports:
            return False
        if self.path_match is not None and self.path_match(path) is None:
            return False
        if self.query is not None:
            assert query is not None
            for key, want in self.query:
                got = query.get(key)
                if not got:
                    return False
                if self.permissive:
                    if any(v != want for v in got):
                        return False
                elif want not in got:
                    return False
        return True


def _split_pointer(ptr: str) -> tuple[str, ...]:
    # RFC 6901 §4: "~1" before "~0", so "~01" decodes to "~1", not "/".
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:])


_MISSING = object()


def _resolve(doc: Any, parts: tuple[str, ...]) -> Any:
    for part in parts:
        if isinstance(doc, dict):
            doc = doc.get(part, _MISSING)
        elif isinstance(doc, list) and part.isdigit() and (part == "0" or not part.startswith("0")):
            i = int(part)
            doc = doc[i] if i < len(doc) else _MISSING
        else:
            return _MISSING
        if doc is _MISSING:
            return _MISSING
    return doc


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 equals 1.0 (RFC 8259 numbers have no int/float split)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, some upstreams the first: refuse to guess.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _header_values(headers: Mapping[str, str] | Iterable[tuple[Any, Any]] | None, name: str) -> list[str]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes) else k
        if k.lower() == name:
            out.append(v.decode("latin-1") if isinstance(v, bytes) else v)
    return out


def _body_json(headers: Any, body: bytes | None) -> tuple[Any, str | None]:
    """(document, None) or (None, why the body cannot be inspected)."""
    if body is None:
        return None, "body not buffered"
    if len(body) > MAX_JSON_BODY:
        return None, f"body larger than {MAX_JSON_BODY} bytes"
    encodings = [e.strip().lower() for v in _header_values(headers, "content-encoding") for e in v.split(",")]
    if any(e not in ("", "identity") for e in encodings):
        return None, "body is content-encoded"
    types = _header_values(headers, "content-type")
    if len(types) != 1:
        return None, "no single Content-Type"
    mime = types[0].split(";", 1)[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        return None, f"Content-Type {mime!r} is not JSON"
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_refuse_constant), None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"body is not valid JSON ({exc.__class__.__name__})"


class _Request:
    """Per-decision lazily computed values shared by all candidate rules and path forms."""

    __slots__ = ("target", "headers", "body", "_query", "_json", "_json_why", "_json_done")

    def __init__(self, target: str, headers: Any, body: bytes | None) -> None:
        self.target = target
        self.headers = headers
        self.body = body
        self._query: dict[str, list[str]] | None = None
        self._json_done = False

    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = parse_query(self.target)
        return self._query

    def json(self) -> tuple[Any, str | None]:
        if not self._json_done:
            self._json, self._json_why = _body_json(self.headers, self.body)
            self._json_done = True
        return self._json, self._json_why


class CompiledPolicy:
    """An immutable, indexed policy. Reload builds a new one and swaps the reference (atomic)."""

    def __init__(self, watch: bool, default: Decision, compiled: list[_Compiled], exact: dict[str, list[_Compiled]],
                 suffix: dict[str, list[_Compiled]], anyhost: list[_Compiled]) -> None:
        self.watch = watch
        self.default = default
        self._rules = compiled
        self._exact = exact
        self._suffix = suffix
        self._any = anyhost
        self._expiring = any(c.expires_ts is not None for c in compiled)
        self._cache: dict[str, tuple[_Compiled, ...]] = {}

    @classmethod
    def compile(cls, egress: Egress) -> CompiledPolicy:
        """From the validated model."""
        return cls.from_json(egress.model_dump(mode="json", by_alias=True, exclude_none=True))

    @classmethod
    def from_json(cls, data: dict[str, Any], *, watch: bool | None = None) -> CompiledPolicy:
        """From a validated policy's JSON (`Egress.model_dump(mode="json", by_alias=True)`, with or
        without unset defaults: the plan keeps only what was set). Not a validator: give it only
        what `gvmrt.policy.model` accepted. `watch` overrides the policy's mode (`run --watch`)."""
        # Decisions are frozen values: a policy of 10,000 "allow" rules needs one, not 20,000
        # (half of the compile time of a reload, measured by scripts/bench-reload).
        memo: dict[tuple[Any, ...], Decision] = {}

        def decision(d: dict[str, Any]) -> Decision:
            key = (d["action"], d.get("ms"), d.get("timeout_s"), d.get("reason"))
            hit = memo.get(key)
            if hit is None:
                hit = memo[key] = Decision.from_json(d)
            return hit
        compiled = [_Compiled(i, r, decision) for i, r in enumerate(data.get("rules") or ())]
        exact: dict[str, list[_Compiled]] = {}
        suffix: dict[str, list[_Compiled]] = {}
        anyhost: list[_Compiled] = []
        for c in compiled:
            # A rule that lists the same host twice must not appear twice among the candidates.
            for h in dict.fromkeys(c.hosts):
                if h == "*":
                    anyhost.append(c)
                elif h.startswith("*."):
                    suffix.setdefault(h[2:], []).append(c)
                else:
                    exact.setdefault(h, []).append(c)
        if watch is None:
            watch = data.get("mode") == "watch"
        return cls(watch, Decision.from_json(data.get("default") or CAUTION_JSON), compiled, exact, suffix, anyhost)

    def candidates(self, host: str) -> tuple[_Compiled, ...]:
        """Rules that can match canonical ``host``, in rule order."""
        hit = self._cache.get(host)
        if hit is not None:
            return hit
        lists = []
        if host in self._exact:
            lists.append(self._exact[host])
        if not host.startswith("["):  # an IP literal has no parent domains
            dot = host.find(".")
            while dot >= 0:
                rules = self._suffix.get(host[dot + 1:])
                if rules:
                    lists.append(rules)
                dot = host.find(".", dot + 1)
        if self._any:
            lists.append(self._any)
        if len(lists) == 1:
            merged = tuple(lists[0])
        else:
            merged = tuple(c for c, _ in _dedupe(heapq.merge(*lists, key=lambda c: c.order)))
        if len(self._cache) >= _HOST_CACHE_MAX:
            self._cache.clear()
        self._cache[host] = merged
        return merged

    def decide(self, method: str, host: str, port: int, target: str, headers: Any = None,
               body: bytes | None = None, now: datetime | float | None = None) -> Verdict:
        """The verdict for one request. ``host`` may carry a port or trailing dot; ``target`` is the
        request target (origin or absolute form); ``body`` is the buffered body or None."""
        try:
            host_c = canonical_host(host)
        except BadHost as exc:
            return Verdict(None, Decision("deny", reason=str(exc)), True, f"refused: {exc}")
        try:
            forms = canonical_paths(target)
        except UnsafePath as exc:
            # Deny even in watch mode: no upstream handles such a path the way the policy would read it.
            return Verdict(None, Decision("deny", reason=f"unsafe request path: {exc}"), True,
                           f"refused: unsafe request path: {exc}")
        method = method.upper()
        cands = self.candidates(host_c)
        if self._expiring:
            now_ts = time.time() if now is None else now if isinstance(now, (int, float)) else now.timestamp()
            cands = tuple(c for c in cands if c.expires_ts is None or c.expires_ts > now_ts)
        req = _Request(target, headers, body)

        best: tuple[_Compiled | None, Any, str] | None = None
        for path in forms:
            found = self._first_match(cands, method, port, path, req)
            if best is None or severity(found[1]) > severity(best[1]):
                best = found
        assert best is not None
        rule, decision, why = best
        flagged = rule is None
        if rule is None:
            reason = f"no rule matches {method} {host_c}:{port}; default decision"
        else:
            reason = f"rule {rule.id!r}" + (f": {why}" if why else "")
            if decision.action == "deny":
                reason += f": {decision.reason}"
        if self.watch:
            return Verdict(rule.id if rule else None, ALLOW, flagged,
                           f"watch mode, would be {decision.action}: {reason}", would=decision)
        return Verdict(rule.id if rule else None, decision, flagged, reason)

    def _first_match(self, cands: tuple[_Compiled, ...], method: str, port: int, path: str,
                     req: _Request) -> tuple[_Compiled | None, Any, str]:
        for c in cands:
            if not c.match_head(method, port, path, req.query() if c.query is not None else None):
                continue
            if c.json_fields is None:
                return c, c.decision, ""
            doc, why = req.json()
            if why is not None:
                return c, c.on_uninspectable, f"body not inspectable ({why})"
            if all(_json_equal(_resolve(doc, parts), want) for parts, want in c.json_fields):
                return c, c.decision, ""
        return None, self.default, ""

    def linear_decide(self, method: str, host: str, port: int, target: str) -> tuple[str | None, Any]:
        """First match by scanning every rule (no index, no cache): the benchmark's baseline."""
        host_c = canonical_host(host)
        forms = canonical_paths(target)
        req = _Request(target, None, None)
        best: tuple[str | None, Any] | None = None
        for path in forms:
            found: tuple[str | None, Any] = (None, self.default)
            for c in self._rules:
                if any(_host_matches(h, host_c) for h in c.hosts) and \
                        c.match_head(method.upper(), port, path, req.query() if c.query is not None else None):
                    found = (c.id, c.decision)
                    break
            if best is None or severity(found[1]) > severity(best[1]):
                best = found
        assert best is not None
        return best


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


def _dedupe(items: Iterable[_Compiled]) -> Iterable[tuple[_Compiled, None]]:
    # A rule listing both "*.example.com" and "*.a.example.com" appears in two suffix lists.
    last = -1
    for c in items:
        if c.order != last:
            last = c.order
            yield c, None
