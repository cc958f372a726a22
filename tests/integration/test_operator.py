"""Operator controls on a real governed jail (issue 4): held requests, approve/deny, events, the socket.

The agent is Debian's Python in a jail made by gvmrt as the unprivileged test user (and as root
where it matters); the upstream is the HTTPS server of test_governed on the host's loopback. The
operator's commands run as the same user, through the container's control socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GVMRT, Gvmrt
from tests.integration.test_governed import (  # noqa: F401 - fixtures
    Agent, Upstream, _wait_file, agent_env, rootless_agent, upstream,
)

HELD = {"id": "needs-ok", "hosts": ["api.test"], "paths": ["/held/**"],
        "decision": {"action": "require_approval", "timeout_s": 3}}
ALLOW = {"id": "api", "hosts": ["api.test"], "decision": {"action": "allow"}}


def start_agent(agent: Agent, cid: str, paths: list[str]) -> None:
    """Detached: GET each path in turn through the proxy, results to /t/<n>.json, then stay up."""
    code = f"""
for n, path in enumerate({paths!r}):
    r = proxied("GET", "https://api.test:{agent.upstream.https_port}" + path, timeout=60)
    open(f"/t/{{n}}.json", "w").write(json.dumps(r))
open("/t/done", "w").close()
time.sleep(60)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    agent.gv.ok("run", "--detach", "--bundle", str(agent.bundle), cid)


def wait_pending(gv: Gvmrt, cid: str, path: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        held = gv.ok("pending", cid, "--format", "json").json()
        for h in held:
            if h["path"] == path:
                return h
        assert time.monotonic() < deadline, f"{path} never held: {held}"
        time.sleep(0.05)


def result(agent: Agent, n: int) -> dict[str, Any]:
    _wait_file(agent.shared / f"{n}.json")
    return json.loads((agent.shared / f"{n}.json").read_text())


def test_approve_deny_and_timeout_end_to_end(rootless_agent: Any) -> None:
    agent = rootless_agent([HELD, ALLOW])
    gv = agent.gv
    start_agent(agent, "ops", ["/held/a", "/held/b", "/held/c", "/held/a"])
    a = wait_pending(gv, "ops", "/held/a")
    assert (a["method"], a["host"], a["rule"], a["timeout_s"]) == ("GET", "api.test", "needs-ok", 3)
    res = gv.ok("approve", "ops", a["request_id"], "--for", "10m")
    assert "approved" in res.out and "600 s" in res.out
    assert (result(agent, 0)["status"], result(agent, 0)["decision"]) == (200, "allow")
    b = wait_pending(gv, "ops", "/held/b")
    gv.ok("deny", "ops", b["request_id"])
    denied = result(agent, 1)
    assert denied["status"] == 403 and "denied by uid" in json.loads(denied["body"])["reason"]
    wait_pending(gv, "ops", "/held/c")
    timed_out = result(agent, 2)       # nobody answers: denied at the rule's timeout
    assert timed_out["status"] == 403 and timed_out["secs"] >= 3
    # The fourth request is identical to the first: --for lets it through without holding it.
    again = result(agent, 3)
    assert (again["status"], again["decision"]) == (200, "allow") and again["secs"] < 1

    # An answer is given once; garbage is refused before it reaches the sidecar.
    twice = gv("approve", "ops", a["request_id"])
    assert twice.rc == 1 and "was approved by uid" in twice.err and "once" in twice.err
    assert gv("deny", "ops", b["request_id"]).rc == 1
    unknown = gv("approve", "ops", "0123456789abcdef")
    assert unknown.rc == 1 and "no request 0123456789abcdef is held" in unknown.err
    for bad in ("zzz", "../../etc", "0123456789ABCDEF0", ""):
        res = gv("approve", "ops", bad)
        assert res.rc == 2 and "not a request id" in res.err, (bad, res)
    bad_for = gv("approve", "ops", a["request_id"], "--for", "soon")
    assert bad_for.rc == 2 and "--for" in bad_for.err

    lines = {e["request_id"]: e for e in agent.audit("ops") if "request_id" in e}
    assert lines[a["request_id"]]["approval"]["outcome"] == "approved"
    assert lines[a["request_id"]]["approval"]["by_uid"] == gv.uid
    assert lines[b["request_id"]]["approval"]["outcome"] == "denied"
    assert [e["approval"]["outcome"] for e in lines.values()][-2:] == ["timeout", "approved earlier"]
    gv.ok("delete", "--force", "ops")


def test_concurrent_approve_and_deny_give_exactly_one_outcome(rootless_agent: Any) -> None:
    agent = rootless_agent([HELD, ALLOW])
    gv = agent.gv
    start_agent(agent, "race", ["/held/x"])
    h = wait_pending(gv, "race", "/held/x")
    pids = [gv.spawn("approve", "race", h["request_id"]), gv.spawn("deny", "race", h["request_id"])]
    outcomes = [gv.wait(pid) for pid in pids]
    assert sorted(r.rc for r in outcomes) == [0, 1], outcomes
    won = "approve" if outcomes[0].rc == 0 else "deny"
    loser = outcomes[1] if won == "approve" else outcomes[0]
    assert "already" in loser.err
    got = result(agent, 0)
    assert got["status"] == (200 if won == "approve" else 403)
    gv.ok("delete", "--force", "race")


def _as_user(gv: Gvmrt, argv: list[str], **kw: Any) -> subprocess.Popen:
    prefix = [] if gv.uid == 0 else ["setpriv", f"--reuid={gv.uid}", f"--regid={gv.uid}", "--init-groups",
                                     "--reset-env", "--"]
    return subprocess.Popen(prefix + ["env"] + [f"{k}={v}" for k, v in gv.env.items()] + argv, text=True, **kw)


def test_events_follow_shows_a_request_within_100_ms(agent_env: Any) -> None:
    agent = agent_env([ALLOW])
    gv = agent.gv
    code = f"""
while not os.path.exists("/t/go"):
    time.sleep(0.01)
for i in range(5):
    proxied("GET", "https://api.test:{agent.upstream.https_port}/live/" + str(i))
    time.sleep(0.2)
time.sleep(60)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "ev")
    follow = _as_user(gv, [GVMRT, "--root", str(gv.state_root), "events", "ev", "--follow", "--format", "json"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got: list[tuple[float, dict[str, Any]]] = []

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            got.append((time.time(), json.loads(line)))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)                     # subscribed
    (agent.shared / "go").write_text("")
    deadline = time.monotonic() + 20
    while sum(e.get("record") == "decision" for _, e in got) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    follow.terminate()
    follow.wait(5)
    reader.join(5)
    for f in (follow.stdout, follow.stderr):
        if f is not None:
            f.close()
    # Its lifecycle comes first (created, started), then the requests.
    assert [e.get("event") for _, e in got if e.get("record") == "lifecycle"] == ["created", "started"], got
    got = [(t, e) for t, e in got if e.get("record") == "decision"]
    assert [e["path"] for _, e in got] == [f"/live/{i}" for i in range(5)], got
    for seen_at, e in got:
        # The record's time is when the sidecar wrote it; the line reached us within 100 ms.
        written = time.mktime(time.strptime(e["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone \
            + int(e["time"][20:23]) / 1000
        assert seen_at - written < 0.1, (seen_at - written, e)
    # Past events are read from the log, also once the container is gone; filters work.
    gv.ok("delete", "--force", "ev")
    past = gv.ok("events", "ev").out.splitlines()
    assert "container created" in past[0] and "container started" in past[1], past
    assert "container stopped" in past[-1], past
    past = past[2:-1]
    assert len(past) == 5 and all("rule=api  allow  200" in line for line in past), past
    assert gv.ok("events", "ev", "--decision", "deny").out == ""
    bad = gv("events", "ev", "--decision", "maybe")
    assert bad.rc == 2 and "--decision" in bad.err


def test_interactive_approve(rootless_agent: Any) -> None:
    agent = rootless_agent([HELD, ALLOW])
    gv = agent.gv
    start_agent(agent, "ia", ["/held/one", "/held/two"])
    wait_pending(gv, "ia", "/held/one")
    ia = _as_user(gv, [GVMRT, "--root", str(gv.state_root), "approve", "--interactive", "ia"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert ia.stdin is not None
    ia.stdin.write("y\n")               # the one already held
    ia.stdin.flush()
    assert result(agent, 0)["status"] == 200
    wait_pending(gv, "ia", "/held/two")  # arrives while the prompt runs
    ia.stdin.write("n\n")
    ia.stdin.flush()
    assert result(agent, 1)["status"] == 403
    out, _ = ia.communicate(timeout=10)    # closing its input ends it, even with nothing held
    assert ia.returncode == 0
    assert "/held/one" in out and "/held/two" in out and "approved" in out and "denied" in out
    gv.ok("delete", "--force", "ia")


def test_another_user_cannot_reach_the_control_socket(agent_env: Any) -> None:
    agent = agent_env([HELD, ALLOW])
    gv = agent.gv
    start_agent(agent, "sock", ["/held/z"])
    h = wait_pending(gv, "sock", "/held/z")
    sock = gv.state_root / "sock" / "control.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    probe = (f"import socket; s = socket.socket(socket.AF_UNIX)\n"
             f"try:\n    s.connect({str(sock)!r}); s.sendall(b'{{\"op\": \"deny\", \"request_id\": \"{h['request_id']}\"}}\\n');"
             f" print(s.recv(200))\nexcept OSError as e:\n    print(type(e).__name__)")
    other = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                            "/usr/bin/python3.11", "-c", probe], capture_output=True, text=True, timeout=20)
    assert other.stdout.strip() == "PermissionError", other
    # Not even from inside the jail: the agent sees no such path, and its netns has no unix route out.
    agent_view = gv.ok("pending", "sock", "--format", "json").json()
    assert [p["request_id"] for p in agent_view] == [h["request_id"]], "still held: nobody else answered"
    gv.ok("delete", "--force", "sock")


def test_operator_commands_on_a_plain_or_stopped_container(env: Any, upstream: Upstream) -> None:
    gv, bundles = env
    b = bundles.make(["sleep", "30"])
    gv.ok("create", "--bundle", str(b), "plain")
    res = gv("pending", "plain")
    assert res.rc == 1 and "not governed" in res.err
    assert gv("events", "nosuch").rc == 1
    gv.ok("delete", "--force", "plain")


def test_reload_under_steady_traffic_loses_none_and_mixes_none(rootless_agent: Any) -> None:
    agent = rootless_agent([{"id": "old", "hosts": ["api.test"], "decision": {"action": "allow"}}])
    gv = agent.gv
    # The agent sends a steady stream of requests on fresh connections and notes each decision.
    code = f"""
n = 0
while not os.path.exists("/t/stop"):
    r = proxied("GET", "https://api.test:{agent.upstream.https_port}/steady/" + str(n))
    with open("/t/log", "a") as f:
        f.write(json.dumps([n, time.time(), r["status"], r.get("decision"), r.get("body", "")[:200]]) + "\\n")
    n += 1
open("/t/stopped", "w").close()
time.sleep(60)
"""
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    gv.ok("run", "--detach", "--bundle", str(agent.bundle), "rl")
    log = agent.shared / "log"
    deadline = time.monotonic() + 20
    while not (log.exists() and len(log.read_text().splitlines()) >= 20):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    new_policy = agent.shared / "new.json"
    keep = {k: v for k, v in agent.config()["gvm"]["egress"].items() if k != "rules"}   # upstream settings
    new_policy.write_text(json.dumps({**keep, "rules": [{"id": "new", "hosts": ["api.test"],
                                                         "decision": {"action": "deny", "reason": "reloaded"}}]}))
    res = gv.ok("update", "rl", "--policy", str(new_policy))
    applied = time.time()
    assert "reloaded" in res.out
    time.sleep(1)
    (agent.shared / "stop").write_text("")
    _wait_file(agent.shared / "stopped")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r[0] for r in rows] == list(range(len(rows))), "no request lost"
    kinds = [("old" if (r[2], r[3]) == (200, "allow") else "new" if (r[2], r[3]) == (403, "deny") else r)
             for r in rows]
    assert set(kinds) == {"old", "new"}, kinds
    first_new = kinds.index("new")
    assert kinds[first_new:] == ["new"] * (len(kinds) - first_new), "never a mix: old after new"
    # In effect within 100 ms of `gvmrt update` returning (requests run back to back).
    assert all(r[1] <= applied + 0.1 for r, k in zip(rows, kinds) if k == "old"), rows[first_new - 2:first_new + 1]
    # Recorded with both hashes; an invalid policy is refused with its pointer and the new one stays.
    reloads = [e for e in agent.lifecycle("rl") if e.get("event") == "reload"]
    assert len(reloads) == 1 and reloads[0]["old_sha256"] != reloads[0]["new_sha256"]
    assert reloads[0]["by_uid"] == gv.uid
    new_policy.write_text(json.dumps({**keep, "rules": [{"id": "x", "hosts": ["api.test"],
                                                         "decision": {"action": "nope"}}]}))
    bad = gv("update", "rl", "--policy", str(new_policy))
    assert bad.rc == 2 and "/rules/0/decision" in bad.err, bad
    assert len([e for e in agent.lifecycle("rl") if e.get("event") == "reload"]) == 1
    assert "policy reloaded" in gv.ok("events", "rl").out
    # Re-reading the bundle's own config puts its policy back.
    assert "reloaded" in gv.ok("update", "rl", "--from-bundle").out
    # A big policy travels in one control request (it once stopped at the 64 KiB line limit).
    big = [{"id": f"r{i}", "hosts": [f"svc{i}.example"], "decision": {"action": "allow"}} for i in range(3000)]
    new_policy.write_text(json.dumps({**keep, "rules": big}))
    assert "reloaded" in gv.ok("update", "rl", "--policy", str(new_policy)).out
    new_policy.write_text(json.dumps({"rules": []}))          # drops upstream_ca: not while running
    refused = gv("update", "rl", "--policy", str(new_policy))
    assert refused.rc == 1 and "upstream_ca cannot change" in refused.err
    usage = gv("update", "rl")
    assert usage.rc == 2 and "exactly one of" in usage.err
    gv.ok("delete", "--force", "rl")
