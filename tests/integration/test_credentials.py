"""Credentials the agent never holds, end to end in a jail (issue 4).

The upstream (test_governed's, on the host's loopback) echoes the headers it received, so the test
sees exactly what left the sidecar. The secret comes from gvmrt's environment or a 0600 file;
afterwards no file gvmrt wrote (state, data, audit) may contain it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.conftest import Gvmrt
from tests.integration.test_governed import Agent, Upstream, rootless_agent, upstream  # noqa: F401

SECRET = "s3cr3t-" + os.urandom(8).hex()
CRED = {"name": "api", "inject": {"header": "Authorization", "format": "Bearer {secret}"},
        "hosts": ["api.test"], "paths": ["/v1/**"], "env": "API_TOKEN"}
ALLOW = {"id": "all", "hosts": ["api.test", "loop.test"], "decision": {"action": "allow"}}


def governed_with(agent: Agent, creds: list[dict[str, Any]]) -> None:
    cfg = agent.config()
    cfg["gvm"]["credentials"] = creds
    (agent.bundle / "config.json").write_text(json.dumps(cfg))


def run(agent: Agent, cid: str, code: str, env: dict[str, str]) -> list[dict[str, Any]]:
    agent._with_args(["python3", "-c", "from agentlib import *\n" + code])
    res = agent.gv("run", "--bundle", str(agent.bundle), cid, env=env)
    assert res.rc == 0, res.err
    return [json.loads(line) for line in res.out.splitlines() if line.startswith("{")]


def files_containing(roots: list[Path], needle: bytes) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                try:
                    with open(p, "rb") as f:
                        if needle in f.read():
                            hits.append(p)
                except OSError:
                    continue
    return hits


def test_injected_in_scope_stripped_everywhere_on_the_host_never_recorded(rootless_agent: Any,
                                                                         upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW])
    governed_with(agent, [CRED])
    base = f"https://api.test:{upstream.https_port}"
    out = run(agent, "cr", f"""
own = {{"Authorization": "Bearer agent-own", "X-Api-Key": "agent-key"}}
emit(what="in", **proxied("GET", "{base}/v1/echo", headers=own))
emit(what="out", **proxied("GET", "{base}/other/echo", headers=own))
emit(what="encoded", **proxied("GET", "{base}/v1/%2e%2e/other/echo", headers=own))
ph = os.environ["API_TOKEN"]
emit(what="env", value=ph)
emit(what="ph-in", **proxied("GET", "{base}/v1/echo", headers={{"Authorization": "Bearer " + ph}}))
emit(what="ph-out", **proxied("GET", "{base}/other/echo", headers={{"Authorization": "Bearer " + ph}}))
emit(what="ph-host", **proxied("GET", "https://loop.test:{upstream.https_port}/v1/echo", headers={{"X-Token": ph}}))
""", env={"GVMRT_SECRET_API": SECRET})
    r = {o["what"]: o for o in out}
    seen = {k: json.loads(r[k]["body"])["headers"] for k in ("in", "out", "ph-in")}
    assert seen["in"].get("Authorization") == f"Bearer {SECRET}", "injected in scope"
    assert "X-Api-Key" not in seen["in"], "the agent's own credential headers never reach the host"
    assert "Authorization" not in seen["out"] and "X-Api-Key" not in seen["out"], "stripped out of scope"
    # An encoded path that reads as out of scope in any form gets no secret.
    assert r["encoded"]["status"] == 200 and "Authorization" not in json.loads(r["encoded"]["body"])["headers"]
    assert r["env"]["value"] == "gvmrt-placeholder-api", "the agent holds a placeholder, not the secret"
    assert seen["ph-in"].get("Authorization") == f"Bearer {SECRET}", "the placeholder in scope is replaced"
    for k in ("ph-out", "ph-host"):
        assert r[k]["status"] == 403 and "placeholder of credential 'api'" in json.loads(r[k]["body"])["reason"]
    lines = agent.audit("cr")
    assert [e.get("credential") for e in lines if e["path"] == "/v1/echo" and e["status"] == 200] == ["api", "api"]
    assert all(e["flagged"] for e in lines if e["status"] == 403)
    gv: Gvmrt = agent.gv
    roots = [gv.state_root, gv.data_root]
    assert files_containing(roots, SECRET.encode()) == [], "the secret is in no file gvmrt wrote"


def test_secret_from_a_0600_file_and_the_errors(rootless_agent: Any, upstream: Upstream) -> None:
    agent = rootless_agent([ALLOW])
    governed_with(agent, [CRED])
    gv: Gvmrt = agent.gv
    missing = gv("create", "--bundle", str(agent.bundle), "nos", env={"GVMRT_SECRETS": "/nonexistent/secrets.json"})
    assert missing.rc == 2 and "/gvm/credentials/0/name" in missing.err and "GVMRT_SECRET_API" in missing.err
    assert gv.ok("list", "--quiet").out == ""
    secrets = agent.shared / "secrets.json"
    secrets.write_text(json.dumps({"api": SECRET}))
    os.chown(secrets, gv.uid, gv.uid)
    secrets.chmod(0o644)
    loose = gv("create", "--bundle", str(agent.bundle), "nos", env={"GVMRT_SECRETS": str(secrets)})
    assert loose.rc == 1 and "mode 0600" in loose.err
    secrets.chmod(0o600)
    out = run(agent, "file", f'emit(**proxied("GET", "https://api.test:{upstream.https_port}/v1/echo"))',
              env={"GVMRT_SECRETS": str(secrets)})
    assert json.loads(out[0]["body"])["headers"].get("Authorization") == f"Bearer {SECRET}"
