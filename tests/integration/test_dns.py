"""The jail's DNS, governed by its sidecar (issue 4): captured on every address, recorded, decided.

Queries are made from inside a rootless jail by Debian's Python, with the resolver the system
gives it (glibc, no resolv.conf: 127.0.0.1) and with raw packets to 8.8.8.8 / 9.9.9.9 over UDP and
TCP, which the jail's local routes deliver to the sidecar like any other address.
"""

from __future__ import annotations

import json
from typing import Any

from tests.integration.test_governed import Upstream, rootless_agent, upstream  # noqa: F401

RULES = [{"id": "api", "hosts": ["api.test"], "decision": {"action": "allow"}},
         # Known, so only the tunnelling detector slows its burst of names down.
         {"id": "exfil", "hosts": ["*.exfil.example"], "decision": {"action": "allow"}},
         {"id": "no-evil", "hosts": ["*.evil.test", "evil.test"], "decision": {"action": "deny", "reason": "no"}}]

RAW = r'''
import socket, struct
def query(name, qtype=1, server=("8.8.8.8", 53), tcp=False, raw=None, timeout=3):
    qid = 0x1234
    msg = raw if raw is not None else struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)
    start = time.monotonic()
    try:
        if tcp:
            s = socket.create_connection(server, timeout=timeout)
            s.sendall(len(msg).to_bytes(2, "big") + msg)
            size = int.from_bytes(s.recv(2), "big")
            data = b""
            while len(data) < size:
                data += s.recv(size - len(data))
            peer = server
        else:
            s = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(timeout)
            s.sendto(msg, server)
            data, peer = s.recvfrom(4096)
    except OSError as exc:
        return {"error": type(exc).__name__, "secs": time.monotonic() - start}
    flags, an = struct.unpack("!H", data[2:4])[0], struct.unpack("!H", data[6:8])[0]
    return {"rcode": flags & 0xF, "answers": an, "from": peer[0], "id": struct.unpack("!H", data[:2])[0],
            "secs": time.monotonic() - start, "data": data.hex()}
'''


def test_dns_is_governed_and_recorded(rootless_agent: Any) -> None:
    agent = rootless_agent(RULES)
    cfg = agent.config()
    cfg["gvm"]["dns"] = {"unknown_delay_ms": 400, "tunnel_threshold": 20, "tunnel_delay_ms": 300}
    (agent.bundle / "config.json").write_text(json.dumps(cfg))
    out = agent.run(RAW + r'''
t = time.monotonic(); addrs = sorted({a[4][0] for a in socket.getaddrinfo("api.test", 443, socket.AF_INET)})
emit(what="libc-known", addrs=addrs, secs=time.monotonic() - t)
emit(what="udp-known", **query("api.test"))
emit(what="udp6-known", **query("api.test", qtype=28, server=("2001:4860:4860::8888", 53)))
emit(what="tcp-known", **query("api.test", server=("9.9.9.9", 53), tcp=True))
emit(what="unknown", **query("somewhere.example"))
emit(what="denied", **query("x.evil.test"))
emit(what="txt", **query("api.test", qtype=16))
for i in range(30):
    r = query(f"c{i}-{i * 7919:x}.exfil.example")
emit(what="tunnel-last", **r)
emit(what="short", **query("", raw=b"\x12\x34\x01", timeout=1))
emit(what="no-question", **query("", raw=struct.pack("!HHHHHH", 0x1234, 0x0100, 0, 0, 0, 0)))
emit(what="compressed", **query("", raw=struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"))
emit(what="truncated", **query("", raw=struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x05ab"))
emit(what="still-up", **query("api.test"))
''', cid="dns")
    r = {o["what"]: o for o in out}
    assert r["libc-known"]["addrs"] == ["127.0.0.1"] and r["libc-known"]["secs"] < 0.5
    for k in ("udp-known", "tcp-known"):
        assert (r[k]["rcode"], r[k]["answers"]) == (0, 1), r[k]
        assert r[k]["secs"] < 0.1, "names the policy covers resolve at once"
    assert r["udp-known"]["from"] == "8.8.8.8", "the reply comes from the address asked"
    assert (r["udp6-known"]["rcode"], r["udp6-known"]["from"]) == (0, "2001:4860:4860::8888")
    assert r["unknown"]["secs"] >= 0.4, "unknown names are delayed"
    assert r["denied"]["rcode"] == 3, "NXDOMAIN for names the policy denies"
    assert (r["txt"]["rcode"], r["txt"]["answers"]) == (0, 0)
    assert r["tunnel-last"]["secs"] >= 0.3, "a burst of unique subdomains is delayed hard"
    assert r["short"].get("error") == "TimeoutError", "no header: dropped"
    for k in ("no-question", "compressed", "truncated"):
        assert r[k].get("rcode") == 1, (k, r[k])                 # FORMERR
    assert r["still-up"]["rcode"] == 0, "malformed packets did not hurt the stub"

    lines = [e for e in agent.audit("dns") if e["method"] == "DNS"]
    by = {}
    for e in lines:
        by.setdefault(e["host"], []).append(e)
    assert by["api.test"][0]["decision"] == "allow" and by["api.test"][0]["rule"] == "api"
    assert by["somewhere.example"][0]["decision"] == "delay" and by["somewhere.example"][0]["flagged"]
    assert by["x.evil.test"][0]["decision"] == "deny" and by["x.evil.test"][0]["rule"] == "no-evil"
    tunnel = [e for e in lines if e["host"].endswith("exfil.example") and "tunnelling" in e["reason"]]
    assert tunnel and all(e["flagged"] for e in tunnel)
    assert sum(1 for e in lines if "malformed DNS query" in e["reason"]) == 4
    assert {e["mode"] for e in lines} == {"dns-udp", "dns-tcp"}

    # gvmrt events shows the queries readably: "DNS <name> <type>".
    shown = agent.gv.ok("events", "dns", "--decision", "deny").out
    assert "DNS x.evil.test A  rule=no-evil  deny  3" in shown, shown
