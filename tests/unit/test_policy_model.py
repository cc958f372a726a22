"""The `gvm.egress` models inside config.json: every error names the exact JSON pointer.

`gvmrt.spec.parse_config` validates the whole document, `gvmrt.policy.parse_egress` only the egress
value (hot reload); both report through `gvmrt.validation.errors_of`, so they must agree on the
pointer, and the pointer must name a value that exists in the document (or the missing key of an
object that exists): never a discriminated union's tag or a validator name that pydantic puts in
its error location.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gvmrt.errors import ConfigError
from gvmrt.policy import Egress, parse_egress
from gvmrt.spec import Gvm, parse_config

ALLOW = {"action": "allow"}


def config(egress: Any) -> bytes:
    return json.dumps({
        "ociVersion": "1.1.0",
        "process": {"args": ["/bin/true"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "user"}, {"type": "pid"}, {"type": "mount"}]},
        "gvm": {"egress": egress},
    }).encode()


def rule(rule_id: str = "r", decision: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "hosts": ["api.example.com"], "decision": decision or ALLOW, **fields}


def error_of(egress: Any) -> ConfigError:
    with pytest.raises(ConfigError) as whole:
        parse_config(config(egress))
    with pytest.raises(ConfigError) as alone:
        parse_egress(egress)
    # One way to report: the same pointer and message whether the policy is checked alone or in place.
    assert (alone.value.pointer, alone.value.message) == (whole.value.pointer, whole.value.message)
    assert "\n" not in str(whole.value)
    return whole.value


def resolve(doc: Any, pointer: str) -> Any:
    """The value at ``pointer`` (RFC 6901); KeyError only for the last step (a missing key)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    for i, part in enumerate(parts):
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif i == len(parts) - 1 and part not in doc:
            return KeyError
        else:
            doc = doc[part]
    return doc


@pytest.mark.parametrize("egress, pointer, message", [
    # decisions: the union's tag ("delay") must not appear in the pointer
    ({"rules": [rule(decision={"action": "delay"})]}, "/gvm/egress/rules/0/decision/ms", "is required"),
    ({"rules": [rule(decision={"action": "delay", "ms": -5})]}, "/gvm/egress/rules/0/decision/ms", ">= 0"),
    ({"rules": [rule(decision={"action": "delay", "ms": 1.5})]}, "/gvm/egress/rules/0/decision/ms", "valid integer"),
    ({"rules": [rule(decision={"action": "delay", "delay": 5, "ms": 5})]}, "/gvm/egress/rules/0/decision/delay",
     "not a field"),
    ({"rules": [rule(decision={"action": "require_approval"})]}, "/gvm/egress/rules/0/decision/timeout_s",
     "is required"),
    ({"rules": [rule(decision={"action": "deny", "reason": ""})]}, "/gvm/egress/rules/0/decision/reason",
     "at least 1 character"),
    ({"rules": [rule(decision={"action": "block"})]}, "/gvm/egress/rules/0/decision", "unknown action 'block'"),
    ({"rules": [rule(decision={"ms": 5})]}, "/gvm/egress/rules/0/decision/action", "is required"),
    ({"rules": [rule(decision="allow")]}, "/gvm/egress/rules/0/decision", ""),
    ({"default": {"action": "allow", "reason": "x"}}, "/gvm/egress/default/reason", "not a field"),
    ({"rules": [rule(json={"/a": 1}, on_uninspectable={"action": "delay", "ms": "9"})]},
     "/gvm/egress/rules/0/on_uninspectable/ms", "valid integer"),
    # rule fields: validator paths (_At) extend the pointer to the entry
    ({"rules": [rule("a"), rule("b"), rule("c"), rule("b")]}, "/gvm/egress/rules/3/id", "already used by rule 1"),
    ({"rules": [rule(hosts=["ok.example", "ok2.example", "a*b.com"])]}, "/gvm/egress/rules/0/hosts/2", "first label"),
    ({"rules": [rule(hosts=["*."])]}, "/gvm/egress/rules/0/hosts/0", "needs a domain"),
    ({"rules": [rule(ports=[80, 443, 0])]}, "/gvm/egress/rules/0/ports/2", ">= 1"),
    ({"rules": [rule(paths=["/a", "b"])]}, "/gvm/egress/rules/0/paths/1", "start with '/'"),
    ({"rules": [rule(path_regex="[")]}, "/gvm/egress/rules/0/path_regex", "regular expression"),
    ({"rules": [rule(json={"/ok": 1, "a/b": 2})]}, "/gvm/egress/rules/0/json/a~1b", "JSON pointer"),
    ({"rules": [rule(query={"q": 1})]}, "/gvm/egress/rules/0/query/q", "valid string"),
    ({"rules": [rule(methods=["GET", "G T"])]}, "/gvm/egress/rules/0/methods/1", "not an HTTP method"),
    # a typo is reported as the typo, not as the field it misses
    ({"rules": [{"id": "r", "host": ["a.com"], "decision": ALLOW}]}, "/gvm/egress/rules/0/host",
     "did you mean 'hosts'"),
    ({"rules": [{"id": "r", "hosts": ["a.com"], "decison": ALLOW}]}, "/gvm/egress/rules/0/decison",
     "did you mean 'decision'"),
    ({"rule": []}, "/gvm/egress/rule", "not a field"),
    ({"mode": "learn"}, "/gvm/egress/mode", "'enforce' or 'watch'"),
    ({"rules": {}}, "/gvm/egress/rules", "valid list"),
])
def test_pointer_is_exact_through_parse_config(egress: Any, pointer: str, message: str) -> None:
    err = error_of(egress)
    assert err.pointer == pointer, err.message
    assert message in err.message.replace("greater than or equal to", ">="), err.message
    # The pointer names something in the document: a value, or the missing key of an object.
    assert resolve(json.loads(config(egress)), pointer) is not None


@given(st.integers(0, 20), st.sampled_from([
    ({"action": "delay"}, "decision/ms"),
    ({"action": "deny"}, "decision/reason"),
    ({"action": "allow", "ms": 1}, "decision/ms"),
    ({"action": "nope"}, "decision"),
]))
def test_pointer_names_the_bad_rule_wherever_it_is(index: int, case: tuple[dict[str, Any], str]) -> None:
    decision, tail = case
    rules = [rule(f"r{i}") for i in range(index)] + [rule("bad", decision)] + [rule("after")]
    err = error_of({"rules": rules})
    assert err.pointer == f"/gvm/egress/rules/{index}/{tail}"


def test_gvm_unknown_section_is_refused_with_its_pointer() -> None:
    raw = json.loads(config({}))
    raw["gvm"]["egres"] = {}
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(raw).encode())
    assert info.value.pointer == "/gvm/egres"


def test_valid_policy_in_config_is_the_egress_model() -> None:
    egress = {"mode": "watch", "default": {"action": "audit_only"},
              "rules": [rule("a", methods=["get"], hosts=["API.Example.com."], ports=[443])]}
    cfg = parse_config(config(egress))
    assert isinstance(cfg.gvm, Gvm)
    assert cfg.gvm.egress == parse_egress(egress)
    assert cfg.gvm.egress.rules[0].hosts == ["api.example.com"]
    assert cfg.gvm.egress.rules[0].methods == ["GET"]


def test_absent_egress_is_none_and_empty_egress_is_the_caution_default() -> None:
    assert parse_config(config(None)).gvm.egress is None
    egress = parse_config(config({})).gvm.egress
    assert egress == Egress()
    assert (egress.default.action, egress.default.ms, egress.mode) == ("delay", 300, "enforce")


def test_every_example_in_spec_policy_md_validates() -> None:
    """The JSON examples of spec/policy.md are fragments; each must be valid where it belongs."""
    import json as _json
    import re as _re
    from pathlib import Path as _Path

    from gvmrt.policy.model import Decision, Rule, parse_egress
    from pydantic import TypeAdapter

    text = (_Path(__file__).resolve().parents[2] / "spec" / "policy.md").read_text()
    blocks = _re.findall(r"```json\n(.*?)```", text, _re.S)
    assert len(blocks) >= 10
    for block in blocks:
        src = block.strip()
        if src.startswith("{"):
            Rule.model_validate(_json.loads(src))
            continue
        value = _json.loads("{" + src + "}")
        (key, inner), = value.items()
        if key == "gvm":
            from gvmrt.spec import Gvm
            Gvm.model_validate(inner)
        elif key == "egress":
            parse_egress(inner)
        elif key == "rules":
            parse_egress({"rules": inner})
        elif key == "hosts":
            Rule.model_validate({"id": "x", "hosts": inner, "decision": {"action": "allow"}})
        elif key == "decision":
            TypeAdapter(Decision).validate_python(inner)
        else:
            raise AssertionError(f"an example of spec/policy.md this test does not know how to check: {src[:40]}")
