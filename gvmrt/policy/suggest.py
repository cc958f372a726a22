"""A recording against a policy: rules suggested from it (`gvmrt policy suggest`) and the recording
replayed under a policy (`gvmrt policy test`).

Both read the decision records of an audit log (spec/audit.md) as the sidecar wrote them; pure
functions of those dicts, no I/O. A record says what the policy decided for one request: in watch
mode everything was let through and `would` (or, in logs older than that field, the reason text
"watch mode, would be ACTION: ...") says what an enforcing policy would have done.

Suggesting: one `allow` rule per host, method and port (ports 80 and 443 are not written: a rule
without `ports` matches every port), whose `paths` are the recorded paths with id-like segments
generalised to `*` (see `is_id`). The matcher tries every form of a path (raw and canonical,
spec/policy.md, Canonicalisation) and keeps the most restrictive decision, so an allow rule only
allows a request if it matches *every* form: the globs are made from every form, and `suggest`
checks, before it returns, that the rules allow each request they were made from.

Replaying: each request is decided again with `CompiledPolicy.decide`. Headers and bodies are not
recorded, so a rule with `json` body fields sees no body and gives its `on_uninspectable`
decision; rows decided that way say so (`body_rule`), as their outcome says nothing about the body.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gvmrt.policy.canon import BadHost, UnsafePath, canonical_host, canonical_paths, split_target
from gvmrt.policy.matcher import CompiledPolicy

__all__ = ["Observed", "Recording", "Suggestion", "Row", "is_id", "generalise", "path_globs", "observe",
           "suggest", "replay", "MAX_GLOBS"]

ACTIONS = ("allow", "audit_only", "delay", "require_approval", "deny")
LET_THROUGH = ("allow", "audit_only", "delay")      # actions that forward the request

# More distinct path globs than this for one rule, and the rule falls back to their longest common
# prefix + "/**": a list of hundreds of globs is not something a person reviews.
MAX_GLOBS = 20

# Ports a suggested rule does not name: the common case, so one rule per host and method covers both.
_PLAIN_PORTS = (80, 443)

# What a path segment must look like to be taken for an id (fullmatch):
_DIGITS = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Hex of 8 or more with at least one digit: commit and object ids, hashes. The digit keeps words
# made of the letters a-f ("deadbeef", "facade", "effaced") literal.
_HEX = re.compile(r"(?=[a-fA-F]*[0-9])[0-9a-fA-F]{8,}")
# An opaque token (base64url, nanoid, ULID...): 20 or more of [A-Za-z0-9_-] with letters and digits.
# Long slugs with a number ("google-cloud-storage-2") match too: that makes a rule broader than
# needed, never narrower, and the person reading the suggestion sees the `*`.
_TOKEN = re.compile(r"(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,}")
# RFC 9110 §5.6.2 token, as gvmrt.policy.model checks methods (without importing pydantic here).
_METHOD = re.compile(r"[A-Za-z!#$%&'*+.^_`|~0-9-]+")
_WATCH = re.compile(r"watch mode, would be ([a-z_]+)")
_RULE_ID_CHAR = re.compile(r"[^A-Za-z0-9_.:-]")
_RULE_ID_MAX = 128


# --- what the log says ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """One recorded request, as the policy saw it."""

    method: str           # upper case
    host: str             # canonical
    port: int
    path: str             # the request target the policy decided on (path and query)
    rule: str | None      # the rule that decided it
    action: str           # what the (enforcing) policy decided: `would` in watch mode
    outcome: str          # what happened (the record's `decision`)
    watch: bool           # recorded in watch mode
    request_id: str | None


@dataclass
class Recording:
    requests: list[Observed] = field(default_factory=list)
    decisions: int = 0                                   # decision records read
    watch: int = 0                                       # of which recorded in watch mode
    skipped: Counter[str] = field(default_factory=Counter)   # why, for records not in `requests`


def _policy_action(rec: dict[str, Any]) -> tuple[str, bool]:
    """(what the policy decided, recorded in watch mode?) for a decision record."""
    would = rec.get("would")
    if isinstance(would, dict):
        would = would.get("action")
    if isinstance(would, str) and would in ACTIONS:
        return would, True
    m = _WATCH.match(rec.get("reason") or "")
    if m and m.group(1) in ACTIONS:
        return m.group(1), True
    if rec.get("approval") is not None:
        # A held request's record carries the operator's answer as its decision (allow or deny);
        # the policy's decision was to hold it.
        return "require_approval", False
    return str(rec.get("decision")), False


def _skip_reason(rec: dict[str, Any]) -> str | None:
    """Why a decision record is not a request the policy decided (None: it is one)."""
    method = rec.get("method")
    mode = rec.get("mode") or ""
    if mode == "dns" or mode.startswith("dns-") or method == "DNS":
        return "dns"
    # "-" is what the sidecar records for a connection closed before any request (no SNI, not
    # TLS or HTTP, a failed handshake); CONNECT is the tunnel, never decided by the policy.
    if not method or method in ("-", "CONNECT"):
        return "no request"
    reason = rec.get("reason") or ""
    if reason.startswith(("refused:", "tls:")):
        # Refused before the policy (a malformed or evasive request, an unsafe path, a bad host):
        # not traffic to allow, and not something another policy would decide differently.
        return "refused"
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        return "malformed"
    port = rec.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return "malformed"
    if not isinstance(rec.get("host"), str) or not isinstance(rec.get("path"), str):
        return "malformed"
    return None


def observe(records: Iterable[dict[str, Any]]) -> Recording:
    """The requests of a log's records; other records are ignored, odd ones counted as skipped."""
    out = Recording()
    for rec in records:
        if rec.get("record") != "decision":
            continue
        out.decisions += 1
        action, watch = _policy_action(rec)
        out.watch += watch
        why = _skip_reason(rec)
        if why is None and action not in ACTIONS:
            why = "malformed"
        if why is None:
            try:
                host = canonical_host(rec["host"])
                canonical_paths(rec["path"])
            except (BadHost, UnsafePath):
                why = "malformed"       # the policy would refuse it: no rule can be made for it
        if why is not None:
            out.skipped[why] += 1
            continue
        rid = rec.get("request_id")
        out.requests.append(Observed(
            method=rec["method"].upper(), host=host, port=rec["port"], path=rec["path"],
            rule=rec.get("rule") if isinstance(rec.get("rule"), str) else None, action=action,
            outcome=str(rec.get("decision")), watch=watch, request_id=rid if isinstance(rid, str) else None))
    return out


# --- generalising paths --------------------------------------------------------------------------

def is_id(segment: str) -> bool:
    """Whether a path segment looks like an id that varies between requests: digits, a UUID, hex
    of 8+ with a digit, or an opaque token of 20+ letters, digits, '-' and '_' with both letters
    and digits. Words, version labels ("v1") and file names ("1234.json") are kept."""
    return bool(_DIGITS.fullmatch(segment) or _UUID.fullmatch(segment) or _HEX.fullmatch(segment)
                or _TOKEN.fullmatch(segment))


def _generalise_form(form: str) -> str:
    """Glob of one path form (no query; starts with "/"): id segments become `*`.

    A segment holding a literal `*` becomes `*` too: in a glob it would be a wildcard anyway, and
    `**` or `***` would change its meaning or be refused; `*` still matches the literal segment.
    """
    return "/".join("*" if seg and ("*" in seg or is_id(seg)) else seg for seg in form.split("/"))


def generalise(target: str) -> str:
    """The glob for a request target's path as sent: the query is dropped, id segments become `*`."""
    path, _ = split_target(target)
    return _generalise_form(path if path.startswith("/") else "/" + path)


def path_globs(target: str) -> list[str]:
    """Globs for every form of the target's path the matcher tries (raw and canonical), so that a
    rule with them matches the request in each form. Raises UnsafePath as the matcher would."""
    return list(dict.fromkeys(_generalise_form(form) for form in canonical_paths(target)))


def _common_prefix(globs: Iterable[str]) -> str:
    """The longest common segment prefix of the globs, + "/**" (which also matches the prefix itself)."""
    split = [g.split("/") for g in globs]
    prefix: list[str] = []
    for parts in zip(*split):
        if any(p != parts[0] for p in parts):
            break
        prefix.append(parts[0])
    return "/".join(prefix).rstrip("/") + "/**" if len(prefix) > 1 else "/**"


# --- suggesting rules ----------------------------------------------------------------------------

@dataclass
class Suggestion:
    rules: list[dict[str, Any]]                # ready for gvm.egress.rules
    recording: Recording
    used: int                                  # requests the rules were made from
    skipped: Counter[str]                      # the recording's, plus requests not made into rules
    counts: dict[str, int]                     # rule id -> requests it was made from
    notes: list[str]


def _rule_id(host: str, method: str, port: int | None, taken: set[str]) -> str:
    host = host.strip("[]")         # an IPv6 literal reads better without its brackets
    base = f"suggested-{host}-{method.lower()}" + (f"-{port}" if port is not None else "")
    base = _RULE_ID_CHAR.sub("-", base)[:_RULE_ID_MAX]
    rid, n = base, 1
    while rid in taken:     # after sanitising or cutting, two keys may read the same
        n += 1
        rid = f"{base[:_RULE_ID_MAX - len(str(n)) - 1]}-{n}"
    taken.add(rid)
    return rid


def _suggestable(req: Observed) -> str | None:
    """Why a request is not made into an allow rule (None: it is)."""
    if req.rule is not None and req.action in ("deny", "require_approval"):
        # A rule of the policy refuses or holds it on purpose: an allow rule would undo that.
        return "denied or held by a rule"
    if not req.watch and req.outcome not in LET_THROUGH:
        return "denied"         # enforce mode: it never went through
    return None


def suggest(records: Iterable[dict[str, Any]]) -> Suggestion:
    """Allow rules covering the recorded requests; deterministic (sorted by host, method, port)."""
    rec = observe(records)
    skipped = Counter(rec.skipped)
    groups: dict[tuple[str, str, int | None], list[Observed]] = {}
    for req in rec.requests:
        why = _suggestable(req)
        if why is not None:
            skipped[why] += 1
            continue
        port = None if req.port in _PLAIN_PORTS else req.port
        groups.setdefault((req.host, req.method, port), []).append(req)

    rules: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    notes: list[str] = []
    taken: set[str] = set()
    # A rule with a port sorts before the same host and method's rule without one: the latter
    # matches every port, and the first matching rule decides.
    for (host, method, port) in sorted(groups, key=lambda k: (k[0], k[1], k[2] is None, k[2] or 0)):
        reqs = groups[(host, method, port)]
        globs = sorted({g for r in reqs for g in path_globs(r.path)})
        rid = _rule_id(host, method, port, taken)
        if len(globs) > MAX_GLOBS:
            wide = _common_prefix(globs)
            notes.append(f"{rid}: {len(globs)} distinct paths, more than {MAX_GLOBS}: "
                         f"generalised to {wide!r}; review it")
            globs = [wide]
        rule: dict[str, Any] = {"id": rid, "hosts": [host], "methods": [method]}
        if port is not None:
            rule["ports"] = [port]
        rule["paths"] = globs
        rule["decision"] = {"action": "allow"}
        rules.append(rule)
        counts[rid] = len(reqs)
    used = sum(counts.values())
    _check(rules, [r for reqs in groups.values() for r in reqs])
    return Suggestion(rules, rec, used, skipped, counts, notes)


def _check(rules: list[dict[str, Any]], requests: list[Observed]) -> None:
    """The suggested rules are a valid policy that allows every request they were made from.

    A failure here is a bug of this module (a glob that does not match its own path), not of the
    log: raised as such rather than printing rules that do not do what they say.
    """
    from gvmrt.errors import ConfigError
    from gvmrt.policy.model import parse_egress
    try:
        egress = parse_egress({"rules": rules, "default": {"action": "deny", "reason": "not suggested"}},
                              "suggested rules", "")
    except ConfigError as exc:
        raise AssertionError(f"suggested rules do not validate: {exc}") from None
    policy = CompiledPolicy.compile(egress)
    for r in requests:
        v = policy.decide(r.method, r.host, r.port, r.path)
        if v.decision.action != "allow":
            raise AssertionError(f"suggested rules do not allow {r.method} {r.host}:{r.port}{r.path} ({v.reason})")


# --- replaying a recording -----------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One recorded request decided again."""

    request: Observed
    old: str                  # the action recorded (in watch mode: what enforcement would have done)
    old_rule: str | None
    new: str                  # the action of the policy replayed
    new_rule: str | None
    reason: str               # the new verdict's reason
    body_rule: bool           # decided by a rule with `json` fields, which saw no body (none recorded)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def json(self) -> dict[str, Any]:
        r = self.request
        return {"request_id": r.request_id, "method": r.method, "host": r.host, "port": r.port, "path": r.path,
                "old": self.old, "old_rule": self.old_rule, "new": self.new, "new_rule": self.new_rule,
                "changed": self.changed, "watch": r.watch, "reason": self.reason, "body_rule": self.body_rule}


def replay(policy: CompiledPolicy, records: Iterable[dict[str, Any]]) -> list[Row]:
    """Every recorded request decided by `policy` (enforcing: a watch-mode policy's `would` is used).

    Old is the policy's recorded decision (`would` for watch-mode records, require_approval for a
    held request); a row is a change when the action differs. No headers and no body are given to
    the matcher: they are not recorded.
    """
    rows = []
    for req in observe(records).requests:
        v = policy.decide(req.method, req.host, req.port, req.path, (), None)
        new = v.would if v.would is not None else v.decision
        body_rule = v.rule_id is not None and any(
            c.id == v.rule_id and c.json_fields is not None for c in policy.candidates(req.host))
        rows.append(Row(req, req.action, req.rule, new.action, v.rule_id, v.reason, body_rule))
    return rows
