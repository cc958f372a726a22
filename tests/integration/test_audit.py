"""The audit log of a real governed container (issue 5): signed and verifiable offline, its
lifecycle on record, durable denials across a kill -9 of the monitor, rotation under a monitor that
dropped root, failing closed on a full disk, and watch -> suggest -> enforce."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gvmrt.audit.read import records, segments
from gvmrt.audit.verify import verify_log
from tests.conftest import GVMRT, Bundles, Gvmrt
from tests.integration.test_governed import (ALLOW_API, Agent, Upstream, _wait_file, _wait_gone,  # noqa: F401
                                             agent_env, rootless_agent, upstream)

DENY_ADMIN = {"id": "no-admin", "hosts": ["api.test"], "paths": ["/admin/**"],
              "decision": {"action": "deny", "reason": "not for agents"}}
SLOW = {"id": "slow", "hosts": ["api.test"], "paths": ["/slow/**"], "decision": {"action": "delay", "ms": 1}}


def _set_audit(agent: Agent, audit: dict[str, Any]) -> None:
    cfg = agent.config()
    cfg["gvm"]["audit"] = audit
    (agent.bundle / "config.json").write_text(json.dumps(cfg))


def _keygen(gv: Gvmrt, where: Path) -> tuple[Path, Path]:
    out = gv.ok("audit", "keygen", "-o", str(where / "audit-key.pem")).out
    assert "public key:" in out
    return where / "audit-key.pem", where / "audit-key.pub.pem"


def test_a_signed_log_verifies_offline_proves_an_entry_and_names_a_tampered_line(
        agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([DENY_ADMIN, ALLOW_API])
    gv = agent.gv
    key, pub = _keygen(gv, agent.shared)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    _set_audit(agent, {"key": str(key), "require_signed": True})
    out = agent.run(f"""
emit(**proxied("GET", "https://api.test:{upstream.https_port}/ok"))
emit(**proxied("GET", "https://api.test:{upstream.https_port}/admin/users"))
""", cid="sig")
    assert [o["status"] for o in out] == [200, 403]
    log = gv.audit_log("sig")
    # Lifecycle: created (with the config's and the policy's hashes), started, stopped (exit 0).
    life = agent.lifecycle("sig")
    assert [e["event"] for e in life] == ["created", "started", "stopped"]
    assert life[0]["config_sha256"] == hashlib.sha256((agent.bundle / "config.json").read_bytes()).hexdigest()
    assert len(life[0]["policy_sha256"]) == 64 and life[2]["exit_status"] == 0
    # Offline, on a copy, with the public key only.
    copy = agent.shared / "copy.jsonl"
    shutil.copy(log, copy)
    os.chmod(copy, 0o644)
    res = gv.ok("audit", "verify", str(copy), "--pubkey", str(pub))
    assert "closed cleanly" in res.out and "verified" in res.out and "pinned by --pubkey" in res.out, res.out
    report = gv.ok("audit", "verify", "sig", "--format", "json").json()
    assert report["ok"] and report["signed_batches"] >= 1 and report["key"] and report["entries"] >= 9
    # One entry's proof, checked alone.
    denied = out[1]["request_id"]
    proof = agent.shared / "proof.json"
    gv.ok("audit", "proof", "sig", denied, "-o", str(proof))
    res = gv.ok("audit", "verify-proof", str(proof), "--pubkey", str(pub))
    assert f"request {denied}" in res.out
    # The readable view.
    shown = gv.ok("audit", "show", "sig", "--decision", "deny", "--format", "json").out.splitlines()
    assert [json.loads(line)["request_id"] for line in shown] == [denied]
    # Deny turned into allow: exit status 1, the line named.
    lines = copy.read_bytes().splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if denied.encode() in line and b'"record":"decision"' in line)
    lines[n] = lines[n].replace(b'"decision":"deny"', b'"decision":"allow"')
    copy.write_bytes(b"".join(lines))
    os.chmod(copy, 0o644)
    res = gv("audit", "verify", str(copy), "--pubkey", str(pub))
    assert res.rc == 1 and f"copy.jsonl:{n + 1}: hash:" in res.out and "FAILED" in res.err, (res.out, res.err)
    other = agent.shared / "other"
    other.mkdir()
    if gv.uid:
        os.chown(other, gv.uid, gv.uid)
    _other_key, other_pub = _keygen(gv, other)
    res = gv("audit", "verify-proof", str(proof), "--pubkey", str(other_pub))
    assert res.rc == 1 and "not by the --pubkey key" in res.err, res.err


def test_no_key_means_an_unsigned_log_that_says_so_and_require_signed_refuses(
        agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    gv = agent.gv
    agent.run(f'emit(**proxied("GET", "https://api.test:{upstream.https_port}/ok"))', cid="uns")
    res = gv.ok("audit", "verify", "uns")
    assert "signed:   no" in res.out and "verified" in res.out
    _set_audit(agent, {"require_signed": True})
    res = gv("create", "--bundle", str(agent.bundle), "nokey")
    assert res.rc != 0 and "/gvm/audit/require_signed" in res.err and "gvmrt audit keygen" in res.err


def test_denials_the_agent_saw_survive_a_kill_9_of_the_monitor(agent_env: Any, upstream: Upstream) -> None:
    # The agent loops over deny, delay and allow; each answer it gets is noted in /t. The monitor
    # is killed mid-loop. Every deny or delay the agent saw must be in the log, which verifies up
    # to its (open or torn) tail.
    agent = agent_env([DENY_ADMIN, SLOW, ALLOW_API])
    code = f"""
seen = open("/t/seen.jsonl", "a")
i = 0
while not os.path.exists("/t/stop"):
    path = ("/admin/x", "/slow/x", "/ok")[i % 3] + "/" + str(i)
    r = proxied("GET", "https://api.test:{upstream.https_port}" + path, timeout=5)
    seen.write(json.dumps({{"path": path, "status": r["status"], "decision": r.get("decision"),
                           "request_id": r.get("request_id")}}) + "\\n")
    seen.flush()
    i += 1
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    gv = agent.gv
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "crash")
    mon = gv.ok("state", "crash").json()["sidecar"]["pid"]
    seen_file = agent.shared / "seen.jsonl"
    deadline = time.monotonic() + 60
    while not seen_file.exists() or len(seen_file.read_text().splitlines()) < 60:
        assert time.monotonic() < deadline, "the agent made too few requests"
        time.sleep(0.05)
    os.kill(mon, signal.SIGKILL)
    _wait_gone(mon)
    time.sleep(0.3)
    (agent.shared / "stop").write_text("")
    gv.ok("delete", "--force", "crash")
    seen = [json.loads(line) for line in seen_file.read_text().splitlines() if line.endswith("}")]
    gated = {s["request_id"]: s["decision"] for s in seen if s["decision"] in ("deny", "delay")}
    assert len(gated) >= 30
    logged = {r.get("request_id"): r.get("decision") for r in records(segments(str(gv.audit_log("crash"))))
              if r.get("record") == "decision"}
    missing = {rid: d for rid, d in gated.items() if logged.get(rid) != d}
    assert not missing, f"answers the agent saw that the log lacks: {missing}"
    assert any(s["status"] is None for s in seen), "the agent's later requests found no sidecar"
    report = verify_log(segments(str(gv.audit_log("crash"))), use_host_pin=False)
    assert report.ok and not report.closed, report.problems


def test_rotation_under_a_monitor_that_dropped_root_keeps_one_verifiable_chain(
        agent_env: Any, upstream: Upstream) -> None:
    agent = agent_env([ALLOW_API])
    gv = agent.gv
    conf = agent.shared / "host.json"
    conf.write_text(json.dumps({"audit": {"max_segment_bytes": 4096}}))
    conf.chmod(0o644)
    agent.n += 1
    agent._with_args(["python3", "-c", "from agentlib import *\n" + f"""
for i in range(40):
    proxied("GET", "https://api.test:{upstream.https_port}/r/" + str(i))
"""])
    res = gv("run", "--bundle", str(agent.bundle), "rot", env={"GVMRT_CONFIG": str(conf)}, timeout=120)
    assert res.rc == 0, res.err
    files = segments(str(gv.audit_log("rot")))
    assert len(files) >= 4, files
    report = gv.ok("audit", "verify", "rot", "--format", "json").json()
    assert report["ok"] and report["closed"] and len(report["files"]) == len(files), report
    assert len([r for r in agent.audit("rot")]) == 40
    # Each segment is owned by whoever ran gvmrt (root's monitor ran as nobody: its helper made them).
    assert {os.stat(f).st_uid for f in files} == {gv.uid}
    assert {os.stat(f).st_mode & 0o777 for f in files} == {0o600}


@pytest.fixture
def root_agent(as_root: tuple[Gvmrt, Bundles], python_rootfs: dict[str, Path], upstream: Upstream) -> Any:
    gv, bundles = as_root

    def make(rules: list[dict[str, Any]], **egress: Any) -> Agent:
        return Agent(gv, bundles, python_rootfs["root"], upstream, rules, **egress)
    return make


def test_a_full_disk_refuses_requests_shows_in_state_and_recovers(
        root_agent: Any, upstream: Upstream, tmp_path: Path) -> None:
    agent = root_agent([ALLOW_API])
    gv = agent.gv
    mnt = tmp_path / "audit"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        conf = tmp_path / "host.json"
        conf.write_text(json.dumps({"audit": {"dir": str(mnt)}}))
        code = f"""
i = 0
while not os.path.exists("/t/stop"):
    if os.path.exists("/t/go" + str(i)):
        r = proxied("GET", "https://api.test:{upstream.https_port}/d/" + str(i), timeout=10)
        open("/t/r" + str(i) + ".tmp", "w").write(json.dumps(r)); os.rename("/t/r" + str(i) + ".tmp", "/t/r" + str(i))
        i += 1
    time.sleep(0.02)
"""
        agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
        env = {"GVMRT_CONFIG": str(conf)}
        gv.ok("run", "--detach", "--bundle", str(agent.bundle), "full", env=env)

        def ask(i: int) -> dict[str, Any]:
            (agent.shared / f"go{i}").write_text("")
            _wait_file(agent.shared / f"r{i}")
            return json.loads((agent.shared / f"r{i}").read_text())
        assert ask(0)["status"] == 200
        assert gv.ok("state", "full").json()["sidecar"]["audit_status"] == "ok"
        follow = subprocess.Popen([GVMRT, "--root", str(gv.state_root), "events", "full", "--follow", "--format",
                                   "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **gv.env, **env})
        time.sleep(0.5)
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
        os.close(fd)
        # The log's last page may still take a few records; then the disk says no: refused (503),
        # not forwarded, and state says why. The next try too.
        i = 1
        while (r := ask(i))["status"] == 200 and i < 20:
            i += 1
        assert r["status"] == 503 and "cannot record" in r["body"], r
        i += 1
        r = ask(i)
        assert r["status"] == 503, r
        side = gv.ok("state", "full").json()["sidecar"]
        assert side["audit_status"] == "failing" and ("No space" in side["audit_error"]
                                                      or "short write" in side["audit_error"]), side
        filler.unlink()
        assert ask(i + 1)["status"] == 200
        assert gv.ok("state", "full").json()["sidecar"]["audit_status"] == "ok"
        # Operators following the events heard it fail and recover.
        time.sleep(0.3)
        follow.terminate()
        out, _ = follow.communicate(timeout=10)
        heard = [json.loads(line).get("audit") for line in out.splitlines() if '"event": "audit"' in line]
        assert heard[:1] == ["failing"] and heard[-1] == "ok", out[-2000:]
        (agent.shared / "stop").write_text("")
        gv.ok("delete", "--force", "full")
        log = str(mnt / gv.container_dir("full").parent.name / "full.jsonl")
        recovered = [r for r in records(segments(log)) if r.get("event") == "audit_recovered"]
        assert len(recovered) == 1 and recovered[0]["refused"] >= 2
        report = verify_log(segments(log), use_host_pin=False)
        assert report.ok, report.problems
    finally:
        gv("delete", "--force", "full")
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_watch_then_suggest_then_enforce(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([])
    gv = agent.gv
    base = f"https://api.test:{upstream.https_port}"
    agent.run(f"""
for path in ("/v1/items/123", "/v1/items/456", "/v1/users/9f8e7d6c-0000-4000-8000-123456789abc/profile"):
    emit(**proxied("GET", "{base}" + path))
emit(**proxied("POST", "{base}/v1/orders", body=b"{{}}"))
""", cid="watched", watch=True)
    watched = agent.audit("watched")
    assert all(e["decision"] == "allow" and e["would"] == "delay" for e in watched), watched
    res = gv.ok("policy", "suggest", "watched")
    rules = json.loads(res.out)
    assert {(r["hosts"][0], r["methods"][0]) for r in rules} == {("api.test", "GET"), ("api.test", "POST")}
    get_rule = next(r for r in rules if r["methods"] == ["GET"])
    assert "/v1/items/*" in get_rule["paths"] and "/v1/users/*/profile" in get_rule["paths"], get_rule
    # The recording against the new policy: every watched request would change (delay -> allow).
    cfg = agent.config()
    cfg["gvm"]["egress"]["rules"] = rules
    (agent.bundle / "config.json").write_text(json.dumps(cfg))
    res = gv("policy", "test", str(agent.bundle), str(gv.audit_log("watched")))
    assert res.rc == 1 and "4 requests" in res.out + res.err, (res.out, res.err)
    # Enforced: calls like the watched ones are allowed by the suggested rules; a new one is caution.
    out = agent.run(f"""
emit(**proxied("GET", "{base}/v1/items/789"))
emit(**proxied("POST", "{base}/v1/orders", body=b"{{}}"))
emit(**proxied("GET", "{base}/v2/other"))
""", cid="enforced")
    lines = agent.audit("enforced")
    assert [(e["path"], e["decision"]) for e in lines] == [
        ("/v1/items/789", "allow"), ("/v1/orders", "allow"), ("/v2/other", "delay")], lines
    assert lines[0]["rule"] == get_rule["id"] and lines[2]["rule"] is None and lines[2]["flagged"]
    assert [o["status"] for o in out] == [200, 200, 200]


REPO = Path(__file__).resolve().parents[2]


def test_watch_suggest_enforce_on_the_python_agent_bundle(as_root: tuple[Gvmrt, Bundles], tmp_path: Path) -> None:
    # The shipped example agent, unchanged, against the demo's own upstream (scripts/demo's).
    gv, _ = as_root
    src = REPO / "bundles" / "python-agent"
    if not (src / "rootfs" / "usr" / "bin" / "python3").exists():
        pytest.skip("bundles/python-agent/rootfs is not built (scripts/setup builds it)")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundle = tmp_path / "python-agent"
    bundle.mkdir()
    text = (src / "config.json").read_text().replace("8443", str(port))
    cfg = json.loads(text)
    cfg["root"]["path"] = str(src / "rootfs")
    for rule in cfg["gvm"]["egress"]["rules"]:
        if rule["decision"]["action"] == "require_approval":
            rule["decision"]["timeout_s"] = 1           # nobody answers here: denied after 1 s
    (bundle / "config.json").write_text(json.dumps(cfg))
    key = "k-" + os.urandom(8).hex()
    up = subprocess.Popen([str(Path(GVMRT).parent / "python"), str(src / "upstream.py"), str(bundle), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "DEMO_API_KEY": key})
    try:
        assert up.stdout is not None and "ready" in up.stdout.readline()
        env = {"GVMRT_SECRET_DEMO_API": key}
        res = gv("run", "--watch", "--bundle", str(bundle), "pa-watch", env=env, timeout=120)
        assert res.rc == 0, res.err
        from gvmrt.audit.read import merge
        watched = [r for r in merge(records(segments(str(gv.audit_log("pa-watch")))))
                   if r.get("record") == "decision" and r.get("mode") != "dns" and r.get("method") not in ("-", "DNS")]
        cautioned = [r for r in watched if r.get("would") == "delay"]
        assert cautioned and all(r["decision"] == "allow" for r in watched), watched
        rules = json.loads(gv.ok("policy", "suggest", "pa-watch").out)
        cfg["gvm"]["egress"]["rules"] += rules
        (bundle / "config.json").write_text(json.dumps(cfg))
        res = gv("run", "--bundle", str(bundle), "pa-enforce", env=env, timeout=120)
        assert res.rc == 0, res.err
        enforced = {(r["method"], r["host"], r["path"]): r for r in merge(records(segments(str(gv.audit_log("pa-enforce")))))
                    if r.get("record") == "decision"}
        for r in cautioned:
            now = enforced[(r["method"], r["host"], r["path"])]
            assert now["decision"] == "allow" and now["rule"].startswith("suggested-"), (r, now)
        # A call the recording never saw still gets the default caution.
        cfg["process"]["args"] = ["python3", "-c", "import urllib.request as u\n"
                                  f"print(u.urlopen('https://api.demo.test:{port}/v2/never-seen', timeout=20).status)"]
        (bundle / "config.json").write_text(json.dumps(cfg))
        res = gv("run", "--bundle", str(bundle), "pa-new", env=env, timeout=60)
        new = [r for r in records(segments(str(gv.audit_log("pa-new")))) if r.get("record") == "decision"]
        assert [(r["path"], r["decision"], r["rule"], r["flagged"]) for r in new] == [
            ("/v2/never-seen", "delay", None, True)], (new, res.err)
    finally:
        up.terminate()
        up.wait(10)
        if up.stdout is not None:
            up.stdout.close()
