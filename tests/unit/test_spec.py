"""Unit tests for gvmrt.spec: the fixtures in spec/schema/test, the generated schema, parse errors.

Every file in spec/schema/test/good must validate and compile; every file in spec/schema/test/bad
must fail with exactly the JSON pointer on line 1 of its sibling .expect file and a message that
contains line 2.  Some refusals only happen when the plan is compiled (mount types, seccomp
system call names), so both steps run, as `gvmrt create` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gvmrt.errors import ConfigError
from gvmrt.plan import MOUNT_FLAGS, PROPAGATION, compile_config, parse_mount_options
from gvmrt.policy import Egress
from gvmrt.spec import Config, Rlimit, default_config, json_schema, parse_config

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "spec" / "schema" / "test"
SCHEMA = REPO / "spec" / "schema" / "config.schema.json"
GEN_SCHEMA = REPO / "scripts" / "gen-schema"

GOOD = sorted(FIXTURES.glob("good/*.json"))
BAD = sorted(FIXTURES.glob("bad/*.json"))


def check(raw: bytes, file: str = "config.json") -> tuple[dict[str, Any], list[str]]:
    """parse + compile, as `gvmrt create` does on a cache miss: (plan, warnings)."""
    warnings: list[str] = []
    return compile_config(parse_config(raw, file), warnings), warnings


def minimal(**top: Any) -> dict[str, Any]:
    cfg = {
        "ociVersion": "1.1.0",
        "process": {"args": ["/bin/true"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "user"}, {"type": "pid"}, {"type": "mount"}]},
    }
    cfg.update(top)
    return cfg


def raw_of(cfg: Any) -> bytes:
    return json.dumps(cfg).encode()


# --- good fixtures ----------------------------------------------------------------------------

def test_fixture_sets_are_there() -> None:
    names = {p.name for p in GOOD}
    assert {"minimal.json", "gvmrt-spec.json", "runc-spec-rootless.json", "full.json"} <= names
    assert len(BAD) >= 12


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_fixture_validates_and_compiles(path: Path) -> None:
    raw = path.read_bytes()
    seccomp = json.loads(raw).get("linux", {}).get("seccomp") or {}
    if seccomp.get("architectures") and os.uname().machine != "x86_64":
        pytest.skip("fixture lists x86 seccomp architectures, which libseccomp on this machine may not mix")
    plan, _ = check(raw, str(path))
    # The plan is cached as JSON: it must survive the round trip unchanged.
    assert json.loads(json.dumps(plan)) == plan


def test_full_fixture_notices_unapplied_resources() -> None:
    _, warnings = check((FIXTURES / "good" / "full.json").read_bytes())
    assert any("linux.resources.{memory,pids} not applied" in w for w in warnings)


@pytest.mark.parametrize("rootless", [True, False])
def test_fresh_gvmrt_spec_output_validates(rootless: bool) -> None:
    # The committed fixture is one host's snapshot; this is the config `gvmrt spec` prints here.
    cfg = default_config(rootless=rootless, uid=1000, gid=1000)
    plan, warnings = check(raw_of(cfg))
    assert warnings == []
    assert plan["seccomp"]
    assert plan["process"]["caps"] == dict.fromkeys(("bounding", "effective", "inheritable", "permitted", "ambient"), 0)


# --- bad fixtures -----------------------------------------------------------------------------

def read_expect(path: Path) -> tuple[str, str]:
    lines = path.with_suffix(".expect").read_text().split("\n")
    return lines[0], lines[1]


def test_every_bad_fixture_has_an_expect_file() -> None:
    jsons = {p.stem for p in FIXTURES.glob("bad/*.json")}
    expects = {p.stem for p in FIXTURES.glob("bad/*.expect")}
    assert jsons == expects
    for path in BAD:
        pointer, message = read_expect(path)
        assert pointer == "" or pointer.startswith("/"), path.name
        assert message, f"{path.name}: line 2 of the .expect file must hold part of the message"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_fixture_fails_with_expected_pointer_and_message(path: Path) -> None:
    pointer, message = read_expect(path)
    with pytest.raises(ConfigError) as info:
        check(path.read_bytes(), str(path))
    assert (info.value.pointer, message in info.value.message) == (pointer, True), info.value.message
    # One line for the user (errors.py): never a multi-line pydantic dump.
    assert "\n" not in str(info.value)


# --- parse errors -----------------------------------------------------------------------------

def test_json_syntax_error_reports_line_and_column() -> None:
    raw = b'{\n  "ociVersion": "1.1.0",\n  "process": {"args": ["sh"]}\n  "root": {}\n}\n'
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "bundles/x/config.json")
    assert info.value.pointer == ""
    assert "line 4 column 3" in info.value.message
    assert str(info.value).startswith("bundles/x/config.json: line 4 column 3: not valid JSON")


def test_non_utf8_is_refused_with_the_byte_offset() -> None:
    with pytest.raises(ConfigError, match=r"is not UTF-8 text .* at byte 2"):
        parse_config(b'{"\xff": 1}', "config.json")


def test_message_names_file_and_pointer() -> None:
    cfg = minimal()
    cfg["process"]["cwd"] = "tmp"
    with pytest.raises(ConfigError) as info:
        parse_config(raw_of(cfg), "/srv/bundle/config.json")
    assert str(info.value) == "/srv/bundle/config.json: /process/cwd: must be an absolute path, got 'tmp'"


def test_pointer_escapes_slash_and_tilde() -> None:
    # RFC 6901: "~" is written "~0" and "/" is written "~1".
    cfg = minimal(linux={"namespaces": [{"type": "mount"}], "sysctl": {"kernel/panic~": "1"}})
    with pytest.raises(ConfigError) as info:
        parse_config(raw_of(cfg))
    assert info.value.pointer == "/linux/sysctl/kernel~1panic~0"


def test_json_types_are_strict() -> None:
    # Go's encoding/json (runc) refuses these; pydantic's lax mode would have converted them.
    for process in ({"args": ["sh"], "noNewPrivileges": "true"}, {"args": ["sh"], "oomScoreAdj": 1.0},
                    {"args": ["sh"], "user": {"uid": True}}):
        with pytest.raises(ConfigError):
            parse_config(raw_of(minimal(process=process)))


GOVERNED_NS = [{"type": "user"}, {"type": "pid"}, {"type": "mount"}, {"type": "network"}]


def governed(**gvm: Any) -> dict[str, Any]:
    return minimal(gvm=gvm, linux={"namespaces": GOVERNED_NS})


def test_unknown_top_level_keys_are_allowed_but_near_misses_are_noticed() -> None:
    cfg = minimal(**{"org.example/anything": {"x": 1}, "mount": [], "windows": {}})
    plan, warnings = check(raw_of(cfg))
    assert warnings == ["top-level property 'mount' is not one gvmrt reads and is ignored; did you mean 'mounts'?"]
    assert plan["mounts"] == []


def test_gvm_egress_is_validated_and_stored_in_the_plan_as_json() -> None:
    egress = {"rules": [{"id": "pypi", "hosts": ["PyPI.org."], "ports": [443, 8443], "methods": ["get"],
                         "decision": {"action": "allow"}},
                        {"id": "block", "hosts": ["*"], "paths": ["/admin/**"], "ports": [3128],
                         "decision": {"action": "deny", "reason": "no admin"},
                         "expires": "2030-01-01T00:00:00Z"}]}
    plan, warnings = check(raw_of(governed(egress=egress)))
    assert warnings == []
    assert json.loads(json.dumps(plan)) == plan
    gvm = plan["gvm"]
    # Canonical (host lowered, trailing dot dropped, method upper) and re-validates to the same model.
    assert gvm["egress"]["rules"][0]["hosts"] == ["pypi.org"]
    assert gvm["egress"]["rules"][0]["methods"] == ["GET"]
    assert Egress.model_validate(gvm["egress"]) == parse_config(raw_of(governed(egress=egress))).gvm.egress
    # 80 and 443 always; extra ports the rules name; never the explicit proxy's own port.
    assert gvm["capture"] == [80, 443, 8443] and gvm["proxy_port"] == 3128


def test_governed_process_gets_proxy_and_trust_variables_that_replace_its_own() -> None:
    cfg = governed()
    cfg["process"]["env"] = ["HTTPS_PROXY=http://evil:1", "KEEP=1", "SSL_CERT_FILE=/mine.pem"]
    plan, _ = check(raw_of(cfg))
    env = dict(e.split("=", 1) for e in plan["process"]["env"])
    assert env["KEEP"] == "1"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        assert env[name] == "http://127.0.0.1:3128", name
    assert env["NO_PROXY"] == env["no_proxy"]
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/etc/gvmrt/ca.pem", name
    assert len(plan["process"]["env"]) == len(env)  # no duplicates left behind


def test_gvm_sections_are_accepted_and_none_is_reported_as_not_enforced() -> None:
    plan, warnings = check(raw_of(governed(dns={"unknown_delay_ms": 50}, filesystem={}, audit={})))
    assert plan["gvm"]["egress"] == {}
    assert warnings == []
    assert plan["gvm"]["filesystem"] == {"workspaces": [], "rules": [], "default": "review"}
    assert plan["gvm"]["dns"] == {"unknown_delay_ms": 50, "tunnel_threshold": 20, "tunnel_delay_ms": 2000}
    assert plan["gvm"]["audit"] == {"key": None, "require_signed": False}


def test_gvm_audit_is_checked() -> None:
    plan, _ = check(raw_of(governed(audit={"key": "keys/audit.pem", "require_signed": True})))
    assert plan["gvm"]["audit"] == {"key": "keys/audit.pem", "require_signed": True}
    with pytest.raises(ConfigError, match="/gvm/audit/sign"):
        check(raw_of(governed(audit={"sign": True})))
    with pytest.raises(ConfigError, match="/gvm/audit/require_signed"):
        check(raw_of(governed(audit={"require_signed": "yes"})))


def test_empty_gvm_is_governed_by_the_default_policy_and_absent_gvm_is_plain() -> None:
    plan, warnings = check(raw_of(governed()))
    assert warnings == [] and plan["gvm"]["egress"] == {} and plan["gvm"]["capture"] == [80, 443]
    plan, warnings = check(raw_of(minimal()))
    assert plan["gvm"] is None and warnings == []   # the notice comes from create (test_governed.py)
    assert not any("PROXY" in e for e in plan["process"]["env"])


@pytest.mark.parametrize("gvm, pointer, message", [
    ({"egres": {}}, "/gvm/egres", "not a field gvmrt knows"),
    ([], "/gvm", "valid dictionary"),
    ({"dns": []}, "/gvm/dns", "valid dictionary"),
    ({"dns": {"unknown_delay": 5}}, "/gvm/dns/unknown_delay", "not a field"),
    ({"egress": []}, "/gvm/egress", "valid dictionary"),
])
def test_gvm_shape_is_checked(gvm: Any, pointer: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw_of(minimal(gvm=gvm)))
    assert (info.value.pointer, message in info.value.message) == (pointer, True), info.value.message


def test_a_policy_that_does_not_compile_fails_with_the_rule_pointer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation already refuses bad regexes; this stands for anything the matcher cannot build.
    from gvmrt.policy import matcher
    monkeypatch.setattr(matcher, "glob_to_regex", lambda glob: "(" if glob == "/broken" else ".*")
    egress = {"rules": [{"id": "ok", "hosts": ["a.com"], "paths": ["/fine"], "decision": {"action": "allow"}},
                        {"id": "bad", "hosts": ["a.com"], "paths": ["/broken"], "decision": {"action": "allow"}}]}
    with pytest.raises(ConfigError) as info:
        check(raw_of(governed(egress=egress)))
    assert info.value.pointer == "/gvm/egress/rules/1"
    assert "does not compile" in info.value.message


def test_sysctl_in_its_namespace_is_accepted() -> None:
    cfg = minimal(linux={"namespaces": [{"type": t} for t in ("user", "pid", "mount", "ipc", "network", "uts")],
                         "sysctl": {"kernel.shmmax": "1", "fs.mqueue.queues_max": "8",
                                    "net.ipv4.ping_group_range": "0 0", "kernel.domainname": "x"}})
    plan, _ = check(raw_of(cfg))
    assert len(plan["sysctl"]) == 4


def test_sysctl_hostname_points_at_the_hostname_field() -> None:
    cfg = minimal(linux={"namespaces": [{"type": "mount"}, {"type": "uts"}], "sysctl": {"kernel.hostname": "x"}})
    with pytest.raises(ConfigError, match="use the top-level hostname field"):
        parse_config(raw_of(cfg))


def test_empty_hostname_without_uts_is_refused() -> None:
    # Even "" would be written with sethostname(2) and rename the host.
    with pytest.raises(ConfigError) as info:
        parse_config(raw_of(minimal(hostname="")))
    assert info.value.pointer == "/hostname"


def test_first_problem_is_reported() -> None:
    cfg = minimal()
    cfg["process"] = {"args": [], "cwd": "x"}
    with pytest.raises(ConfigError) as info:
        parse_config(raw_of(cfg))
    assert info.value.pointer == "/process/args"


# --- the generated JSON Schema ----------------------------------------------------------------

def test_committed_schema_matches_the_models() -> None:
    committed = json.loads(SCHEMA.read_text())
    assert committed == json_schema(), "spec/schema/config.schema.json is stale: run scripts/gen-schema"


def test_committed_schema_is_canonical_text() -> None:
    text = SCHEMA.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_gen_schema_check_mode(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(GEN_SCHEMA), *args], capture_output=True, text=True)

    assert run("--check").returncode == 0
    out = tmp_path / "schema.json"
    assert run("--check", "--output", str(out)).returncode == 1  # missing
    assert run("--output", str(out)).returncode == 0
    assert run("--check", "--output", str(out)).returncode == 0
    out.write_text(out.read_text().replace('"title"', '"Title"', 1))
    stale = run("--check", "--output", str(out))
    assert stale.returncode == 1 and "is stale" in stale.stderr


def test_schema_refuses_unknown_keys_except_at_top_level() -> None:
    schema = json_schema()
    assert schema["additionalProperties"] is True
    # Resources are only read to say they are not applied; every other object is closed.
    open_defs = {"Resources", "DeviceCgroup"}
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is (name in open_defs), name
    assert set(schema["required"]) == {"ociVersion", "process", "root"}


def test_schema_lists_capability_and_rlimit_names() -> None:
    defs = json_schema()["$defs"]
    assert "CAP_NET_BIND_SERVICE" in defs["Capabilities"]["properties"]["bounding"]["items"]["enum"]
    assert "RLIMIT_NOFILE" in defs["Rlimit"]["properties"]["type"]["enum"]


# --- properties -------------------------------------------------------------------------------

KNOWN_WORDS = sorted(set(MOUNT_FLAGS) | set(PROPAGATION))


@given(st.lists(st.sampled_from(KNOWN_WORDS)))
def test_parse_mount_options_is_idempotent_on_known_words(options: list[str]) -> None:
    once = parse_mount_options(options)
    assert once[2] == []  # known words never become filesystem data
    assert parse_mount_options(options + options) == once


@given(st.lists(st.sampled_from(KNOWN_WORDS)), st.sampled_from(sorted(MOUNT_FLAGS)))
def test_last_mount_flag_wins(prefix: list[str], word: str) -> None:
    flags = parse_mount_options(prefix + [word])[0]
    clear, flag = MOUNT_FLAGS[word]
    assert flags & flag == (0 if clear else flag)


@given(st.lists(st.text(min_size=1).filter(lambda w: w not in MOUNT_FLAGS and w not in PROPAGATION)))
def test_unknown_words_pass_through_as_data_in_order(words: list[str]) -> None:
    assert parse_mount_options(words) == (0, 0, words, False)


U64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(U64, U64)
def test_rlimit_accepted_exactly_when_soft_is_at_most_hard(soft: int, hard: int) -> None:
    cfg = minimal()
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]
    if soft <= hard:
        parsed = parse_config(raw_of(cfg))
        assert parsed.process.rlimits == [Rlimit(type="RLIMIT_NOFILE", soft=soft, hard=hard)]
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(raw_of(cfg))
        assert info.value.pointer == "/process/rlimits/0/soft"


def test_config_model_is_frozen() -> None:
    cfg = parse_config(raw_of(minimal()))
    assert isinstance(cfg, Config)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.hostname = "renamed"  # type: ignore[misc]


def test_credentials_are_in_the_plan_without_secrets_and_their_placeholders_in_the_env() -> None:
    creds = [{"name": "gh", "inject": {"header": "Authorization", "format": "Bearer {secret}"},
              "hosts": ["API.GitHub.com"], "env": "GITHUB_TOKEN"},
             {"name": "other", "inject": {"header": "X-Api-Key"}, "hosts": ["*.example.com"], "placeholder": "ph-1234567"}]
    cfg = governed(credentials=creds)
    cfg["process"]["env"] = ["GITHUB_TOKEN=the-real-one"]
    plan, _ = check(raw_of(cfg))
    got = plan["gvm"]["credentials"]
    assert [c["name"] for c in got] == ["gh", "other"] and got[0]["hosts"] == ["api.github.com"]
    assert got[0]["placeholder"] == "gvmrt-placeholder-gh" and got[1]["placeholder"] == "ph-1234567"
    assert got[1]["inject"]["format"] == "{secret}"
    env = dict(e.split("=", 1) for e in plan["process"]["env"])
    assert env["GITHUB_TOKEN"] == "gvmrt-placeholder-gh", "the config's own value is replaced"
