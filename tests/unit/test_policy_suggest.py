"""`gvmrt policy suggest` and `gvmrt policy test` (gvmrt.policy.suggest, gvmrt.cli.policy).

Pure: records are dicts shaped as the sidecar writes them (spec/policy.md, Responses and records);
the CLI tests write them to a log file in tmp_path and run the typer app directly.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import gvmrt.plan as plan_mod
from gvmrt.cli import policy as cli
from gvmrt.errors import ConfigError, UsageError
from gvmrt.policy import CompiledPolicy, parse_egress
from gvmrt.policy.suggest import MAX_GLOBS, generalise, is_id, observe, path_globs, replay, suggest

RULE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
UUID = "550e8400-e29b-41d4-a716-446655440000"
_ids = iter(range(1, 1_000_000))


def dec(method: str = "GET", host: str = "api.example.com", port: int = 443, path: str = "/", *,
        decision: str = "allow", rule: str | None = None, would: str | None = "delay", mode: str = "proxy",
        reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """A decision record; watch mode (with `would`) unless would=None."""
    if reason is None:
        reason = f"watch mode, would be {would}: x" if would else f"rule {rule!r}" if rule else "default decision"
    rec = {"time": "2030-01-01T00:00:00Z", "record": "decision", "container": "c1", "mode": mode,
           "request_id": f"{next(_ids):016x}", "method": method, "host": host, "port": port, "path": path,
           "rule": rule, "decision": decision, "reason": reason, "status": None, "flagged": rule is None, **extra}
    if would is not None:
        rec["would"] = would
    return rec


def compiled(rules: list[dict[str, Any]], default: dict[str, Any] | None = None) -> CompiledPolicy:
    """The rules through the same validation as a bundle's (parse_egress), then compiled."""
    egress: dict[str, Any] = {"rules": rules}
    if default is not None:
        egress["default"] = default
    return CompiledPolicy.compile(parse_egress(egress))


# --- generalising paths --------------------------------------------------------------------------

@pytest.mark.parametrize("segment", ["0", "12345", UUID, UUID.upper(), "0123abcd", "a1b2c3d4e5f6a7b8",
                                     "DEADBEEF1", "AbCdEf0123456789xyzQ", "dQw4w9WgXcQ-abc_DEF12"])
def test_ids(segment: str) -> None:
    assert is_id(segment)
    assert generalise(f"/v1/things/{segment}/parts") == "/v1/things/*/parts"


@pytest.mark.parametrize("segment", ["v1", "users", "me", "deadbeef", "facade", "abc123", "1234.json", "v2.1",
                                     "AbCdEf0123456789xyz",            # 19: too short for a token
                                     "google-cloud-storage-client",    # long, but no digit
                                     "release-notes-v", "x.tar.gz",
                                     "%31%32%33", ""])
def test_words_kept(segment: str) -> None:
    assert not is_id(segment)
    assert generalise(f"/v1/{segment}/x") == f"/v1/{segment}/x"


def test_generalise_strips_query_and_fragment_keeps_trailing_slash() -> None:
    assert generalise("/repos/42/issues?page=2&per_page=100") == "/repos/*/issues"
    assert generalise("/repos/42/#frag") == "/repos/*/"
    assert generalise("/a/7?") == "/a/*"
    assert generalise("relative/9") == "/relative/*"


def test_literal_star_segment_becomes_one_segment_wildcard() -> None:
    # "**" or "***" would mean something else (or be refused); "*" still matches the literal.
    assert path_globs("/a/x*y/b") == ["/a/*/b"]
    assert path_globs("/a/***") == ["/a/*"]


def test_percent_encoding_gives_a_glob_per_form() -> None:
    # The matcher tries the raw path and its canonical forms and keeps the most restrictive: the
    # rule needs a glob for each, or the canonical form falls to the default.
    globs = path_globs("/files/%31%32%33/a%2Fb")
    assert globs == ["/files/%31%32%33/a%2Fb", "/files/*/a/b"]
    globs = path_globs("/a/../b/;x=1/7")
    assert set(globs) == {"/a/../b/;x=1/*", "/b/;x=1/*", "/b/*"}


# --- suggest -------------------------------------------------------------------------------------

def test_one_rule_per_host_method_and_odd_port() -> None:
    recs = [dec(path="/v1/users/1/repos"), dec(path="/v1/users/2/repos?page=3"), dec(path="/v1/me"),
            dec("POST", path="/v1/items"), dec(port=80, path="/health"),
            dec(port=8443, path="/v1/users/3/repos"), dec(host="cdn.example.net", path=f"/assets/{UUID}.js")]
    s = suggest(recs)
    assert s.rules == [
        {"id": "suggested-api.example.com-get-8443", "hosts": ["api.example.com"], "methods": ["GET"],
         "ports": [8443], "paths": ["/v1/users/*/repos"], "decision": {"action": "allow"}},
        {"id": "suggested-api.example.com-get", "hosts": ["api.example.com"], "methods": ["GET"],
         "paths": ["/health", "/v1/me", "/v1/users/*/repos"], "decision": {"action": "allow"}},
        {"id": "suggested-api.example.com-post", "hosts": ["api.example.com"], "methods": ["POST"],
         "paths": ["/v1/items"], "decision": {"action": "allow"}},
        # "<uuid>.js" is not a whole id segment: kept as it is.
        {"id": "suggested-cdn.example.net-get", "hosts": ["cdn.example.net"], "methods": ["GET"],
         "paths": [f"/assets/{UUID}.js"], "decision": {"action": "allow"}},
    ]
    assert s.used == 7 and s.counts["suggested-api.example.com-get"] == 4
    assert s.recording.watch == 7 and not s.skipped and not s.notes


def test_output_is_deterministic() -> None:
    recs = [dec(host=h, method=m, path=f"/{p}/{n}") for h in ("b.example", "a.example") for m in ("GET", "PUT")
            for p in ("x", "y") for n in (1, 2)]
    first = suggest(recs).rules
    random.Random(1).shuffle(recs)
    assert suggest(recs).rules == first
    assert [r["id"] for r in first] == ["suggested-a.example-get", "suggested-a.example-put",
                                        "suggested-b.example-get", "suggested-b.example-put"]


def test_ids_valid_and_unique_even_when_cut_or_sanitised() -> None:
    long = "x" * 130
    recs = [dec(host=f"{long}.a"), dec(host=f"{long}.b"), dec(host=f"{long}.c"),
            dec(host="[fe80::1%eth0]"), dec(host="[::1]"), dec(host="127.0.0.1", port=8080), dec(method="M-SEARCH")]
    rules = suggest(recs).rules
    ids = [r["id"] for r in rules]
    assert len(set(ids)) == len(ids) == 7
    assert all(RULE_ID.fullmatch(i) for i in ids), ids
    assert "suggested-::1-get" in ids and "suggested-127.0.0.1-get-8080" in ids
    parse_egress({"rules": rules})      # ids unique and valid for the model too


def _requests() -> list[dict[str, Any]]:
    return [dec(path="/v1/users/42/repos?page=2"), dec(path=f"/v1/orders/{UUID}"),
            dec("POST", path="/v1/chat/completions"), dec(path="/files/%31%32/a%2Fb"),
            dec(path="/a/..;/admin/0123abcd9"), dec(path="//double//slash/"), dec(path="/back\\slash/7"),
            dec(host="[2001:db8::1]", port=8080, path="/x/1"), dec(host="10.0.0.1", path="/"),
            dec(method="DELETE", host="sub.api.example.com", path="/tok/AbCdEf0123456789xyzQ")]


def test_suggested_rules_validate_and_allow_every_recorded_request() -> None:
    recs = _requests()
    rules = suggest(recs).rules
    policy = compiled(rules)            # the default: caution (delay)
    for r in recs:
        v = policy.decide(r["method"], r["host"], r["port"], r["path"])
        assert v.decision.action == "allow", (r["path"], v.reason)
    # Another id under a recorded shape is allowed; anything else gets the default.
    assert policy.decide("GET", "api.example.com", 443, "/v1/users/7/repos").decision.action == "allow"
    for method, host, path in [("GET", "new.example.org", "/v1/users/1/repos"), ("GET", "api.example.com", "/v1/new"),
                               ("PUT", "api.example.com", "/v1/users/1/repos"),
                               ("GET", "api.example.com", "/v1/users/42/other")]:
        v = policy.decide(method, host, 443, path)
        assert v.rule_id is None and v.decision.action == "delay", (method, host, path)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "users", "1", "42", UUID, "0123abcd9", "%2e%2e", "..", ".", "",
                                          "%2F", "x;y=1", "a\\b", "%25", "*", "**", "q?", "%31", "deadbeef",
                                          "AbCdEf0123456789xyzQ", "é", "%C3%A9"]),
                         min_size=0, max_size=6), min_size=1, max_size=8),
       st.sampled_from(["", "?a=1", "?a=1&a=2"]))
def test_property_rules_allow_what_they_were_made_from(paths: list[list[str]], query: str) -> None:
    recs = [dec(path="/" + "/".join(p) + query) for p in paths]
    s = suggest(recs)                    # checks itself too (raises if a request is not allowed)
    policy = compiled(s.rules, default={"action": "deny", "reason": "no"})
    for r in recs:
        assert policy.decide("GET", "api.example.com", 443, r["path"]).decision.action == "allow", r["path"]


def test_many_paths_fall_back_to_common_prefix() -> None:
    words = [a + b for a in "bcdghk" for b in "mnprst"][:MAX_GLOBS + 5]
    recs = [dec(path=f"/static/{w}/index.html") for w in words] + [dec("POST", path=f"/p/{w}") for w in words[:3]]
    s = suggest(recs)
    get = next(r for r in s.rules if r["methods"] == ["GET"])
    assert get["paths"] == ["/static/**"]
    assert len(s.notes) == 1 and "suggested-api.example.com-get" in s.notes[0] and "/static/**" in s.notes[0]
    post = next(r for r in s.rules if r["methods"] == ["POST"])
    assert post["paths"] == ["/p/bm", "/p/bn", "/p/bp"]     # under the limit: exact
    policy = compiled(s.rules)
    assert policy.decide("GET", "api.example.com", 443, "/static/zz/other").decision.action == "allow"
    assert policy.decide("GET", "api.example.com", 443, "/elsewhere").decision.action == "delay"


def test_fallback_without_common_prefix_is_everything() -> None:
    recs = [dec(path=f"/{a}{b}") for a in "bcdg" for b in "hkmnpr"]
    assert len(recs) > MAX_GLOBS
    assert suggest(recs).rules[0]["paths"] == ["/**"]


def test_records_that_are_not_requests_are_skipped() -> None:
    recs = [
        dec(path="/ok"),
        {"record": "outcome", "request_id": "1", "status": 200},
        {"record": "lifecycle", "event": "start"}, {"record": "seal", "root": "x"}, {"event": "reload"},
        dec("DNS", mode="dns-udp", port=53, path="A", would=None, reason=""),
        dec("DNS", mode="dns", port=53, path="A", would=None, reason=""),
        dec("-", host="192.0.2.1", would=None, decision="deny", mode="transparent",
            reason="connection to 192.0.2.1:443 closed: no SNI"),
        dec("CONNECT", would=None, reason="x"),
        dec(None, would=None, reason="x"),          # type: ignore[arg-type]
        dec("", would=None, reason="x"),
        dec(path="/admin%00", would=None, decision="deny", reason="refused: unsafe request path: NUL"),
        dec(path="http://other/", would=None, decision="deny",
            reason="refused: absolute-form or asterisk-form target inside a CONNECT tunnel"),
        dec(would=None, decision="deny", reason="tls: handshake failed"),
        dec(host="bad host", would=None),            # not a host the policy can name
        dec(port="443"),                             # type: ignore[arg-type]
        dec(path="/%2500", would=None),              # an encoded NUL: the policy refuses it
    ]
    s = suggest(recs)
    assert [r["paths"] for r in s.rules] == [["/ok"]]
    assert s.recording.decisions == 13
    assert dict(s.skipped) == {"dns": 2, "no request": 4, "refused": 3, "malformed": 3}


def test_watch_mode_skips_what_a_rule_denies_or_holds() -> None:
    recs = [dec(path="/a", would="deny", rule=None),                       # default deny: traffic to write rules for
            dec(path="/b", would="deny", rule="no-admin"),                 # an explicit deny rule: kept as it is
            dec(path="/c", would="require_approval", rule="held"),
            dec(path="/d", would="allow", rule="known"),
            dec(path="/e", would=None, reason="watch mode, would be deny: rule 'x': no", rule="x")]  # older log
    s = suggest(recs)
    assert s.rules[0]["paths"] == ["/a", "/d"]
    assert s.skipped == {"denied or held by a rule": 3}
    assert s.recording.watch == 5


def test_enforce_log_suggests_what_was_let_through() -> None:
    recs = [dec(path="/allowed", would=None, decision="allow", rule="r"),
            dec(path="/delayed", would=None, decision="delay"),
            dec(path="/audited", would=None, decision="audit_only", rule="a"),
            dec(path="/denied", would=None, decision="deny", reason="default decision"),
            dec(path="/held", would=None, decision="allow", rule="h", approval={"outcome": "approved"})]
    s = suggest(recs)
    assert s.recording.watch == 0
    assert s.rules[0]["paths"] == ["/allowed", "/audited", "/delayed"]
    assert s.skipped == {"denied": 1, "denied or held by a rule": 1}


# --- replay --------------------------------------------------------------------------------------

def test_replay_finds_changes_and_uses_would_as_old() -> None:
    policy = compiled([
        {"id": "users", "hosts": ["api.example.com"], "methods": ["GET"], "paths": ["/v1/users/*"],
         "decision": {"action": "allow"}},
        {"id": "no-admin", "hosts": ["*"], "paths": ["/admin/**"], "decision": {"action": "deny", "reason": "no"}},
    ], default={"action": "delay", "ms": 300})
    recs = [dec(path="/v1/users/1", would="delay"),                                  # delay -> allow
            dec(path="/admin/x", would="allow", rule="old-allow"),                   # allow -> deny
            dec(path="/a/%2e%2e/admin/", would="delay"),                             # delay -> deny (canonical form)
            dec(path="/other", would="delay"),                                       # unchanged
            dec(path="/other", would=None, decision="allow", reason="watch mode, would be delay: x"),  # older log
            dec(path="/v1/users/2", would=None, decision="delay", reason="default"),  # enforce record
            dec("DNS", mode="dns-udp", path="A", would=None)]                        # not replayed
    rows = replay(policy, recs)
    got = [(r.request.path, r.old, r.new, r.new_rule, r.changed) for r in rows]
    assert got == [("/v1/users/1", "delay", "allow", "users", True),
                   ("/admin/x", "allow", "deny", "no-admin", True),
                   ("/a/%2e%2e/admin/", "delay", "deny", "no-admin", True),
                   ("/other", "delay", "delay", None, False),
                   ("/other", "delay", "delay", None, False),
                   ("/v1/users/2", "delay", "allow", "users", True)]
    assert rows[1].old_rule == "old-allow" and rows[0].request.watch and not rows[5].request.watch


def test_replay_watch_allow_is_not_the_old_decision() -> None:
    # In watch mode the recorded decision is always allow; what counts is what would have happened.
    policy = compiled([], default={"action": "deny", "reason": "no"})
    # `would` decides, whatever the reason text says (it is free text).
    row, = replay(policy, [dec(path="/x", decision="allow", would="deny", reason="default decision")])
    assert (row.old, row.new, row.changed, row.request.watch) == ("deny", "deny", False, True)


def test_replay_held_request_was_require_approval() -> None:
    policy = compiled([{"id": "held", "hosts": ["api.example.com"], "decision": {"action": "require_approval",
                                                                                 "timeout_s": 60}}])
    rows = replay(policy, [dec(would=None, decision="deny", rule="held", approval={"outcome": "timeout"}),
                           dec(would=None, decision="allow", rule="held", approval={"outcome": "approved"})])
    assert [(r.old, r.new, r.changed) for r in rows] == [("require_approval", "require_approval", False)] * 2


def test_replay_a_watch_policy_compares_its_enforcing_decisions() -> None:
    egress = parse_egress({"mode": "watch", "default": {"action": "deny", "reason": "no"}})
    policy = CompiledPolicy.compile(egress)
    assert policy.watch
    row, = replay(policy, [dec(would="allow", rule="gone")])
    assert (row.old, row.new) == ("allow", "deny")


def test_replay_marks_body_rules() -> None:
    policy = compiled([{"id": "model", "hosts": ["api.example.com"], "methods": ["POST"],
                        "json": {"/model": "small"}, "decision": {"action": "allow"}}])
    body, other = replay(policy, [dec("POST", path="/v1/chat", would="allow", rule="model"), dec(path="/x")])
    assert body.body_rule and body.new == "deny" and "inspect" in body.reason
    assert not other.body_rule and other.new == "delay"


def test_observe_counts() -> None:
    rec = observe([dec(), dec(would=None), dec("DNS", mode="dns-tcp", would=None), {"record": "outcome"}])
    assert rec.decisions == 3 and rec.watch == 1 and len(rec.requests) == 2 and rec.skipped == {"dns": 1}


# --- CLI -----------------------------------------------------------------------------------------

def write_log(path: Path, recs: list[dict[str, Any]], torn: bool = True) -> str:
    text = "".join(json.dumps(r) + "\n" for r in recs) + ('{"record": "decision", "meth' if torn else "")
    path.write_text(text)
    return str(path)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.policy_app, list(args))


def test_cli_suggest_json(tmp_path: Path) -> None:
    recs = _requests() + [dec("DNS", mode="dns-udp", path="A", would=None)]
    log = write_log(tmp_path / "c1.jsonl", recs)
    r = invoke("suggest", log)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == suggest(recs).rules
    assert r.stdout.startswith('[\n  {\n    "id": ')               # 2-space indent, a list
    assert "5 rules from 10 requests (10 watch-mode records); skipped 1: 1 dns" in r.stderr
    assert "note" not in r.stderr


def test_cli_suggest_text(tmp_path: Path) -> None:
    log = write_log(tmp_path / "c1.jsonl", [dec(path="/v1/users/1"), dec(path="/v1/me"),
                                            dec(port=8443, path="/v1/\x1b[2Jx")])
    r = invoke("suggest", log, "--format", "text")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "METHOD", "HOST", "PORT", "REQUESTS", "PATHS"]
    assert lines[1].split() == ["suggested-api.example.com-get-8443", "GET", "api.example.com", "8443", "1",
                                "/v1/\\x1b[2Jx"]        # the agent's bytes cannot drive the terminal
    assert lines[2].split() == ["suggested-api.example.com-get", "GET", "api.example.com", "any", "2", "/v1/me"]
    assert lines[3].split() == ["/v1/users/*"]
    assert "\x1b" not in r.stdout


def test_cli_suggest_enforce_log_says_so(tmp_path: Path) -> None:
    log = write_log(tmp_path / "c1.jsonl", [dec(would=None, decision="allow", rule="r"),
                                            dec(path="/d", would=None, decision="deny")])
    r = invoke("suggest", log)
    assert r.exit_code == 0, r.output
    assert "no record of this log is from watch mode" in r.stderr
    assert "1 rules from 1 requests (0 watch-mode records); skipped 1: 1 denied" in r.stderr


def test_cli_suggest_without_decisions_is_an_error(tmp_path: Path) -> None:
    log = write_log(tmp_path / "c1.jsonl", [{"record": "lifecycle", "event": "start"}])
    r = invoke("suggest", log)
    assert isinstance(r.exception, UsageError) and "no decision records" in str(r.exception)
    assert "\n" not in str(r.exception) and r.stdout == ""
    r = invoke("suggest", str(tmp_path / "missing.jsonl"))
    assert isinstance(r.exception, UsageError) and "no such log file" in str(r.exception)
    r = invoke("suggest", log, "--format", "yaml")
    assert isinstance(r.exception, UsageError)


def test_cli_passes_the_global_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gvmrt.audit.read
    from gvmrt.cli.app import GLOBALS
    log = write_log(tmp_path / "c1.jsonl", [dec()])
    seen = []

    def resolve(target: str, root: str | None = None) -> list[str]:
        seen.append((target, root))
        return [log]
    monkeypatch.setattr(gvmrt.audit.read, "resolve", resolve)
    monkeypatch.setitem(GLOBALS, "--root", str(tmp_path / "state"))
    assert invoke("suggest", "c1").exit_code == 0
    assert seen == [("c1", str(tmp_path / "state"))]


def bundle(tmp_path: Path, egress: Any, *, name: str = "b") -> Path:
    d = tmp_path / name
    d.mkdir()
    cfg = {"ociVersion": "1.1.0", "process": {"args": ["/bin/sh"]}, "root": {"path": "rootfs"},
           "linux": {"namespaces": [{"type": t} for t in ("user", "pid", "mount", "network")]},
           "gvm": {"egress": egress}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root the real cache is /var/cache/gvmrt/plans; keep the tests' plans out of it.
    monkeypatch.setattr(plan_mod, "cache_dir", lambda: str(tmp_path / "plans"))


USERS = {"rules": [{"id": "users", "hosts": ["api.example.com"], "methods": ["GET"], "paths": ["/v1/users/*"],
                    "decision": {"action": "allow"}}],
         "default": {"action": "deny", "reason": "not listed"}}


def test_cli_test_no_change_exits_0(tmp_path: Path) -> None:
    b = bundle(tmp_path, USERS)
    log = write_log(tmp_path / "c1.jsonl", [dec(path="/v1/users/1", would="allow", rule="users"),
                                            dec(path="/x", would="deny")])
    r = invoke("test", str(b), log)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    assert r.stderr.startswith("2 requests, 0 would change\n")
    r = invoke("test", str(b / "config.json"), log, "--all")      # the config.json names its bundle too
    assert r.exit_code == 0
    assert [ln.split()[:3] for ln in r.stdout.splitlines()[1:]] == [["allow", "==", "allow"], ["deny", "==", "deny"]]


def test_cli_test_changes_exit_1(tmp_path: Path) -> None:
    b = bundle(tmp_path, {**USERS, "mode": "watch"})         # a watch policy is replayed as enforcing
    recs = [dec(path="/v1/users/1", would="delay"), dec(path="/v1/users/2", would="delay"),
            dec(path="/y", would="allow", rule="old"), dec(path="/v1/users/3", would="allow", rule="x"),
            dec("DNS", mode="dns-udp", path="A", would=None)]
    log = write_log(tmp_path / "c1.jsonl", recs)
    r = invoke("test", str(b), log)
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "OLD"
    assert lines[1].split()[:4] == ["delay", "->", "allow", "GET"] and "- -> users" in lines[1]
    assert lines[3].split()[:5] == ["allow", "->", "deny", "GET", "api.example.com:443/y"]
    assert "4 requests, 3 would change (2 delay->allow, 1 allow->deny); skipped 1: 1 dns" in r.stderr

    r = invoke("test", str(b), log, "--format", "json")
    assert r.exit_code == 1
    rows = json.loads(r.stdout)
    assert [(x["path"], x["old"], x["new"], x["new_rule"]) for x in rows] == [
        ("/v1/users/1", "delay", "allow", "users"), ("/v1/users/2", "delay", "allow", "users"),
        ("/y", "allow", "deny", None)]
    r = invoke("test", str(b), log, "--format", "json", "--all")
    assert len(json.loads(r.stdout)) == 4


def test_cli_test_bad_bundle_gets_creates_message(tmp_path: Path) -> None:
    bad = {"rules": [{"id": "r", "hosts": ["a.example"], "decision": {"action": "delay"}}]}
    b = bundle(tmp_path, bad)
    log = write_log(tmp_path / "c1.jsonl", [dec()])
    r = invoke("test", str(b), log)
    assert isinstance(r.exception, ConfigError)
    # What `gvmrt create` says: the plan's validation, naming the bundle's config.json.
    raw = (b / "config.json").read_bytes()
    with pytest.raises(ConfigError) as create:
        plan_mod.load_plan(raw, str(b / "config.json"))
    assert str(r.exception) == str(create.value)
    assert str(r.exception).startswith(f"{b}/config.json: /gvm/egress/rules/0/decision/ms: ")

    r = invoke("test", str(tmp_path / "nope"), log)
    assert isinstance(r.exception, UsageError) and "no such directory" in str(r.exception)
    plain = bundle(tmp_path, None, name="plain")
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["gvm"]
    (plain / "config.json").write_text(json.dumps(cfg))
    r = invoke("test", str(plain), log)
    assert isinstance(r.exception, UsageError) and "no gvm section" in str(r.exception)


def test_cli_test_errors_exit_2_not_1(tmp_path: Path) -> None:
    # 1 means "some decision changes": an error must not read as that.
    b = bundle(tmp_path, USERS)
    r = invoke("test", str(b), str(tmp_path / "missing.jsonl"))
    assert r.exception is not None and getattr(r.exception, "exit_code", None) == 2
    empty = write_log(tmp_path / "e.jsonl", [{"record": "seal"}])
    r = invoke("test", str(b), empty)
    assert getattr(r.exception, "exit_code", None) == 2 and "no decision records" in str(r.exception)
