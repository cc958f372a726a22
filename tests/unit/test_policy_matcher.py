"""Egress policy models and the compiled matcher (gvmrt.policy.model, gvmrt.policy.matcher)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from gvmrt.errors import ConfigError
from gvmrt.policy import CAUTION, CompiledPolicy, Decision, Delay, Egress, parse_egress
from gvmrt.policy.matcher import MAX_JSON_BODY, glob_to_regex

ALLOW = {"action": "allow"}
AUDIT = {"action": "audit_only"}


def deny(reason: str = "no") -> dict[str, Any]:
    return {"action": "deny", "reason": reason}


def policy(*rules: dict[str, Any], **egress: Any) -> CompiledPolicy:
    return CompiledPolicy.compile(parse_egress({"rules": list(rules), **egress}))


def rule(rid: str, decision: dict[str, Any] | None = None, hosts: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": rid, "hosts": ["api.example.com"] if hosts is None else hosts, "decision": decision or ALLOW, **kw}


def action(p: CompiledPolicy, method: str = "GET", host: str = "api.example.com", port: int = 443,
           target: str = "/", **kw: Any) -> tuple[str | None, str]:
    v = p.decide(method, host, port, target, **kw)
    return v.rule_id, v.decision.action


# --- models --------------------------------------------------------------------------------------

def test_defaults_are_caution() -> None:
    e = parse_egress({})
    assert e.default == CAUTION == Delay(action="delay", ms=300)
    assert e.mode == "enforce" and e.rules == []


def test_decisions_round_trip() -> None:
    data = {"default": deny("unknown"), "mode": "watch", "rules": [
        rule("a", {"action": "delay", "ms": 50}), rule("b", {"action": "require_approval", "timeout_s": 30}),
        rule("c", AUDIT), rule("d", deny()), rule("e", ALLOW, json={"/x": 1}, on_uninspectable=deny("body"))]}
    e = parse_egress(data)
    again = Egress.model_validate(json.loads(e.model_dump_json(by_alias=True, exclude_defaults=True)))
    assert again == e


@pytest.mark.parametrize("data, pointer, message", [
    ({"rules": [rule("a"), rule("b"), rule("a")]}, "/gvm/egress/rules/2/id", "already used by rule 0"),
    ({"rules": [rule("bad id")]}, "/gvm/egress/rules/0/id", "pattern"),
    ({"rules": [{"hosts": ["x"], "decision": ALLOW}]}, "/gvm/egress/rules/0/id", "is required"),
    ({"rules": [rule("a", hosts=[])]}, "/gvm/egress/rules/0/hosts", "at least 1"),
    ({"rules": [rule("a", hosts=["ok.com", "bad host"])]}, "/gvm/egress/rules/0/hosts/1", "not a valid host"),
    ({"rules": [rule("a", hosts=["a.*.com"])]}, "/gvm/egress/rules/0/hosts/0", "whole first label"),
    ({"rules": [rule("a", hosts=["a.com:443"])]}, "/gvm/egress/rules/0/hosts/0", "ports"),
    ({"rules": [rule("a", ports=[0])]}, "/gvm/egress/rules/0/ports/0", "greater than or equal to 1"),
    ({"rules": [rule("a", ports=["443"])]}, "/gvm/egress/rules/0/ports/0", "valid integer"),
    ({"rules": [rule("a", methods=["GET", "BAD METHOD"])]}, "/gvm/egress/rules/0/methods/1", "not an HTTP method"),
    ({"rules": [rule("a", paths=["admin"])]}, "/gvm/egress/rules/0/paths/0", "start with '/'"),
    ({"rules": [rule("a", paths=["/a"], path_regex="/a")]}, "/gvm/egress/rules/0/path_regex", "not both"),
    ({"rules": [rule("a", path_regex="(")]}, "/gvm/egress/rules/0/path_regex", "regular expression"),
    ({"rules": [rule("a", json={"model": 1})]}, "/gvm/egress/rules/0/json/model", "JSON pointer"),
    ({"rules": [rule("a", on_uninspectable=deny())]}, "/gvm/egress/rules/0/on_uninspectable", "only to rules"),
    ({"rules": [rule("a", {"action": "delay"})]}, "/gvm/egress/rules/0/decision/ms", "is required"),
    ({"rules": [rule("a", {"action": "delay", "ms": "5"})]}, "/gvm/egress/rules/0/decision/ms", "valid integer"),
    ({"rules": [rule("a", {"action": "deny"})]}, "/gvm/egress/rules/0/decision/reason", "is required"),
    ({"rules": [rule("a", {"action": "block"})]}, "/gvm/egress/rules/0/decision", "does not match"),
    ({"rules": [rule("a", expires="2030-01-01T00:00:00")]}, "/gvm/egress/rules/0/expires", "timezone"),
    ({"rules": [rule("a", extra=1)]}, "/gvm/egress/rules/0/extra", "not a field"),
    ({"default": {"action": "allow", "ms": 1}}, "/gvm/egress/default/ms", "not a field"),
    ({"mode": "audit"}, "/gvm/egress/mode", "'enforce' or 'watch'"),
])
def test_invalid_policy_names_pointer(data: dict[str, Any], pointer: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_egress(data)
    assert info.value.pointer == pointer
    assert message in info.value.message


def test_not_an_object() -> None:
    with pytest.raises(ConfigError, match="/gvm/egress: must be a JSON object"):
        parse_egress([])


def test_hosts_and_methods_are_normalised() -> None:
    e = parse_egress({"rules": [rule("a", hosts=["API.Example.com.", "*.Foo.ORG", "bücher.de"], methods=["get"])]})
    assert e.rules[0].hosts == ["api.example.com", "*.foo.org", "xn--bcher-kva.de"]
    assert e.rules[0].methods == ["GET"]


# --- globs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("glob, yes, no", [
    ("/admin*", ["/admin", "/admin.txt", "/administrator"], ["/admin/x", "/x/admin", "/Admin"]),
    ("/admin/**", ["/admin", "/admin/", "/admin/x", "/admin/x/y"], ["/administrator", "/x/admin"]),
    ("/a/*/c", ["/a/b/c", "/a//c"], ["/a/b/b/c", "/a/c"]),
    ("/a/**/c", ["/a/c", "/a/b/c", "/a/b/b/c"], ["/a/bc", "/a/b/c/d"]),
    ("/v1/chat.completions", ["/v1/chat.completions"], ["/v1/chatXcompletions"]),
    ("/**", ["/", "/anything/at/all"], []),
])
def test_glob(glob: str, yes: list[str], no: list[str]) -> None:
    rx = re.compile(glob_to_regex(glob))
    for p in yes:
        assert rx.fullmatch(p), (glob, p)
    for p in no:
        assert not rx.fullmatch(p), (glob, p)


# --- matching ------------------------------------------------------------------------------------

ADMIN = policy(rule("deny-admin", deny("admin is off limits"), paths=["/admin*", "/admin/**"]),
               rule("allow-rest", ALLOW, paths=["/**"]))


@pytest.mark.parametrize("target", [
    "/admin", "/a/%2e%2e/admin", "/a/%252e%252e/admin", "//admin", "/admin%00.txt", "/foo/../admin",
    "/%61dmin", "/admin/./x", "\\admin", "/a/..;/admin", "/a/%2e%2e%2fadmin", "/admin.txt", "/admin/x/y",
    "http://api.example.com/x/../admin",
])
def test_evasions_are_denied(target: str) -> None:
    v = ADMIN.decide("GET", "api.example.com", 443, target)
    assert v.decision.action == "deny", target


def test_nul_is_denied_without_a_rule_even_in_watch_mode() -> None:
    for p in (ADMIN, policy(rule("x"), mode="watch")):
        v = p.decide("GET", "api.example.com", 443, "/ok%00.txt")
        assert (v.rule_id, v.decision.action, v.flagged) == (None, "deny", True)
        assert "NUL" in v.reason


def test_paths_are_case_sensitive() -> None:
    # Documented: /ADMIN is a different path; guard case-insensitive upstreams with a (?i) regex.
    assert action(ADMIN, target="/ADMIN") == ("allow-rest", "allow")
    p = policy(rule("ci", deny(), path_regex="(?i)/admin.*"), rule("rest"))
    assert action(p, target="/ADMIN") == ("ci", "deny")


def test_encoding_never_turns_deny_into_allow_but_allow_survives_plain() -> None:
    assert action(ADMIN, target="/api/x") == ("allow-rest", "allow")
    assert action(ADMIN, target="/api/%78") == ("allow-rest", "allow")


def test_most_restrictive_form_wins_over_default() -> None:
    # The raw form matches nothing (default: delay), the canonical one matches allow: delay wins.
    p = policy(rule("api", ALLOW, paths=["/api/**"]))
    assert action(p, target="/x/../api/v") == (None, "delay")
    assert action(p, target="/api/v") == ("api", "allow")


def test_first_match_wins() -> None:
    p = policy(rule("one", AUDIT, paths=["/a/*"]), rule("two", deny(), paths=["/a/**"]), rule("three"))
    assert action(p, target="/a/b") == ("one", "audit_only")
    assert action(p, target="/a/b/c") == ("two", "deny")
    assert action(p, target="/b") == ("three", "allow")


def test_suffix_and_exact_hosts_merge_in_rule_order() -> None:
    p = policy(rule("suffix-first", AUDIT, hosts=["*.example.com"], methods=["POST"]),
               rule("exact", ALLOW, hosts=["api.example.com"]),
               rule("suffix-late", deny(), hosts=["*.example.com"]),
               rule("anyhost", deny("everything else"), hosts=["*"]))
    assert action(p, "POST") == ("suffix-first", "audit_only")
    assert action(p, "GET") == ("exact", "allow")
    assert action(p, "GET", host="deep.sub.example.com") == ("suffix-late", "deny")
    assert action(p, "GET", host="example.com") == ("anyhost", "deny")  # "*.x" does not match x itself
    assert action(p, "GET", host="example.org") == ("anyhost", "deny")
    assert action(p, "GET", host="notexample.com") == ("anyhost", "deny")


def test_host_is_case_insensitive_and_ignores_trailing_dot_and_port() -> None:
    p = policy(rule("a", hosts=["api.example.com"]))
    for host in ("API.EXAMPLE.COM", "api.example.com.", "Api.Example.Com.:443", "api.example.com:8443"):
        assert action(p, host=host) == ("a", "allow"), host
    assert action(p, host="api.example.com.evil.net") == (None, "delay")


def test_bad_host_is_denied() -> None:
    v = ADMIN.decide("GET", "exa mple.com", 443, "/")
    assert (v.decision.action, v.flagged) == ("deny", True)


def test_port_filter() -> None:
    p = policy(rule("tls", hosts=["h.com"], ports=[443, 8443]))
    assert action(p, host="h.com", port=443) == ("tls", "allow")
    assert action(p, host="h.com", port=80) == (None, "delay")


def test_method_list_is_case_insensitive() -> None:
    p = policy(rule("reads", methods=["GET", "head"]))
    assert action(p, "get") == ("reads", "allow")
    assert action(p, "HEAD") == ("reads", "allow")
    assert action(p, "DELETE") == (None, "delay")


def test_query_match() -> None:
    p = policy(rule("no-delete", deny(), query={"action": "delete"}),
               rule("list-only", ALLOW, query={"action": "list"}))
    assert action(p, target="/?action=delete") == ("no-delete", "deny")
    assert action(p, target="/?x=1&action=list") == ("list-only", "allow")
    assert action(p, target="/?action=lis%74") == ("list-only", "allow")  # decoded once
    assert action(p, target="/?action=other") == (None, "delay")
    assert action(p, target="/") == (None, "delay")
    # Parameter pollution: a restrictive rule needs any occurrence, a permissive one all of them.
    assert action(p, target="/?action=list&action=delete") == ("no-delete", "deny")
    assert action(p, target="/?action=list&action=other") == (None, "delay")
    assert action(p, target="/?action=list&action=list") == ("list-only", "allow")


JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def body_policy(**kw: Any) -> CompiledPolicy:
    return policy(rule("cheap-model", ALLOW, methods=["POST"], json={"/model": "small", "/opts/stream": True},
                       **kw),
                  rule("other-models", deny("only the small model"), methods=["POST"]))


def test_json_pointer_match() -> None:
    p = body_policy()
    ok = json.dumps({"model": "small", "opts": {"stream": True}}).encode()
    assert action(p, "POST", body=ok, headers=JSON_HEADERS) == ("cheap-model", "allow")
    for doc in ({"model": "large", "opts": {"stream": True}}, {"model": "small", "opts": {"stream": 1}},
                {"model": "small"}, {"model": "small", "opts": []}, ["small"]):
        assert action(p, "POST", body=json.dumps(doc).encode(), headers=JSON_HEADERS) == ("other-models", "deny")


def test_json_pointer_escapes_and_arrays() -> None:
    p = policy(rule("r", deny(), json={"/a~1b/0/c~0d": 1.0}))
    assert action(p, body=b'{"a/b": [{"c~d": 1}]}', headers=JSON_HEADERS) == ("r", "deny")
    assert action(p, body=b'{"a/b": [{"c~d": 2}]}', headers=JSON_HEADERS) == (None, "delay")
    assert action(p, body=b'{"a/b": {"0": {"c~d": 1}}}', headers=JSON_HEADERS) == ("r", "deny")


@pytest.mark.parametrize("headers, body, why", [
    (JSON_HEADERS, None, "not buffered"),
    (JSON_HEADERS, b'{"model": "small", "pad": "' + b"x" * MAX_JSON_BODY + b'"}', "larger"),
    ({"Content-Type": "text/plain"}, b'{"model": "small"}', "not JSON"),
    ({}, b'{"model": "small"}', "Content-Type"),
    ({**JSON_HEADERS, "Content-Encoding": "gzip"}, b"\x1f\x8b", "content-encoded"),
    (JSON_HEADERS, b'{"model": "small",', "not valid JSON"),
    (JSON_HEADERS, b'{"model": "large", "model": "small"}', "not valid JSON"),  # duplicate keys
    (JSON_HEADERS, b'{"model": NaN}', "not valid JSON"),
    (JSON_HEADERS, b'\xff{}', "not valid JSON"),
    ([("content-type", "application/json"), ("content-type", "text/plain")], b"{}", "single Content-Type"),
])
def test_uninspectable_body(headers: Any, body: bytes | None, why: str) -> None:
    p = body_policy(on_uninspectable={"action": "require_approval", "timeout_s": 60})
    v = p.decide("POST", "api.example.com", 443, "/v1", headers=headers, body=body)
    assert (v.rule_id, v.decision.action) == ("cheap-model", "require_approval")
    assert why in v.reason
    # the default for on_uninspectable is deny
    v = body_policy().decide("POST", "api.example.com", 443, "/v1", headers=headers, body=body)
    assert (v.rule_id, v.decision.action) == ("cheap-model", "deny")


def test_json_subtype_and_bytes_headers() -> None:
    p = body_policy()
    body = b'{"model": "small", "opts": {"stream": true}}'
    assert action(p, "POST", body=body, headers=[(b"Content-Type", b"application/vnd.api+json")]) == \
        ("cheap-model", "allow")
    assert action(p, "POST", body=body, headers={**JSON_HEADERS, "content-encoding": "identity"}) == \
        ("cheap-model", "allow")


def test_body_not_needed_is_not_parsed() -> None:
    # No rule needs the body: garbage is fine.
    assert action(ADMIN, "POST", target="/x", body=b"\xff" * (MAX_JSON_BODY + 1), headers={}) == \
        ("allow-rest", "allow")


def test_expiry() -> None:
    t = datetime(2030, 1, 1, tzinfo=timezone.utc)
    p = policy(rule("temp", deny("until 2030"), expires=t.isoformat()), rule("after"))
    assert action(p, now=t - timedelta(seconds=1)) == ("temp", "deny")
    assert action(p, now=t) == ("after", "allow")
    assert action(p, now=t.timestamp() + 5) == ("after", "allow")
    assert action(p) == (("temp", "deny") if datetime.now(timezone.utc) < t else ("after", "allow"))


def test_default_is_caution_and_flagged() -> None:
    v = policy(rule("a", hosts=["a.com"])).decide("GET", "b.com", 443, "/x")
    assert v.rule_id is None and v.decision == Decision("delay", ms=300) and v.flagged
    assert "no rule matches GET b.com:443" in v.reason
    v = policy(rule("a", hosts=["a.com"])).decide("GET", "a.com", 443, "/x")
    assert not v.flagged


def test_custom_default() -> None:
    v = policy(default=deny("unknown destination")).decide("GET", "b.com", 443, "/")
    assert v.decision == Decision("deny", reason="unknown destination") and v.flagged


def test_watch_mode_allows_and_reports() -> None:
    p = policy(rule("d", deny("nope"), paths=["/admin*"]), mode="watch")
    v = p.decide("GET", "api.example.com", 443, "/a/../admin")
    assert (v.rule_id, v.decision, v.would) == ("d", Decision("allow"), Decision("deny", reason="nope"))
    assert "would be deny" in v.reason and not v.flagged
    v = p.decide("GET", "elsewhere.com", 443, "/")
    assert (v.rule_id, v.decision.action, v.would, v.flagged) == (None, "allow", Decision("delay", ms=300), True)


def test_deny_reason_names_rule() -> None:
    v = ADMIN.decide("GET", "api.example.com", 443, "/admin")
    assert v.reason == "rule 'deny-admin': admin is off limits"


def test_rule_with_overlapping_suffixes_is_a_candidate_once() -> None:
    p = policy(rule("both", AUDIT, hosts=["*.example.com", "*.a.example.com", "x.a.example.com"]))
    assert [c.id for c in p.candidates("x.a.example.com")] == ["both"]


def test_index_lookup_does_not_scan() -> None:
    rules = [rule(f"r{i}", hosts=[f"h{i}.example.net"]) for i in range(2000)]
    rules.append(rule("wild", deny(), hosts=["*.example.net"]))
    p = policy(*rules)
    assert [c.id for c in p.candidates("h7.example.net")] == ["r7", "wild"]
    assert action(p, host="h1999.example.net") == ("r1999", "allow")
    assert action(p, host="zzz.example.net") == ("wild", "deny")
    assert p.linear_decide("GET", "zzz.example.net", 443, "/")[0] == "wild"


# --- the sidecar's path: compiled from the plan's JSON, without pydantic --------------------------

def test_plain_decisions_cover_every_field_and_default_of_the_models() -> None:
    from typing import get_args

    from gvmrt.policy import decision, model
    plain = set(Decision.__dataclass_fields__)
    for kind in get_args(get_args(model.Decision)[0]):
        assert set(kind.model_fields) <= plain, kind
    assert Decision.from_json(CAUTION.model_dump()) == Decision("delay", ms=300)
    assert model.Rule.model_fields["on_uninspectable"].default_factory().model_dump() == decision.UNINSPECTABLE_JSON


@pytest.mark.parametrize("fixture", ["policy.json", "policy-watch.json"])
def test_from_plan_json_decides_as_the_model_does(fixture: str) -> None:
    import json as _json
    from pathlib import Path as _Path
    cfg = _json.loads((_Path(__file__).resolve().parents[2] / "spec/schema/test/good" / fixture).read_text())
    egress = parse_egress(cfg["gvm"]["egress"])
    plan_json = egress.model_dump(mode="json", by_alias=True, exclude_unset=True)   # what gvmrt.plan keeps
    a, b = CompiledPolicy.compile(egress), CompiledPolicy.from_json(plan_json)
    requests = [(m, h, port, t) for m in ("GET", "POST", "DELETE") for h in ("api.openai.com", "pypi.org",
                "files.pythonhosted.org", "evil.example", "api.github.com") for port in (443, 80)
                for t in ("/", "/v1/chat/completions", "/simple/x/", "/admin", "/a/%2e%2e/admin", "/?q=1")]
    for req in requests:
        assert a.decide(*req, now=0) == b.decide(*req, now=0), req
