"""Resolving a tunnel's upstream name during the client's TLS handshake (gvmrt.proxy.upstream.Pool.prefetch)
and which names the sidecar prefetches at all. Real sockets on loopback; the resolver is a recorder."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from gvmrt.audit.writer import AuditLog
from gvmrt.policy import CompiledPolicy, parse_egress
from gvmrt.proxy import upstream
from gvmrt.proxy.certs import CertificateAuthority
from gvmrt.proxy.server import Sidecar
from gvmrt.proxy.upstream import Pool, UpstreamError


class Recorder:
    """A resolver that answers 127.0.0.1 (or fails) and remembers each call."""

    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, name: str, port: int) -> list[str]:
        self.calls.append(name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise OSError(f"{name}: no such name")
        return ["127.0.0.1"]


async def _listener() -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_prefetched_name_is_resolved_once_and_used_by_the_first_connect() -> None:
    async def main() -> None:
        server, port = await _listener()
        rec = Recorder(delay=0.05)
        pool = Pool(resolve=rec, allow_private={"api.example"})
        key = ("http", "api.example", port)
        pool.prefetch(key)
        pool.prefetch(key)                      # a second tunnel to the same name: no second lookup
        await asyncio.sleep(0)
        assert rec.calls == ["api.example"]    # started at once, not at the first request
        up = await pool.connect(key)
        assert rec.calls == ["api.example"]    # the connect took the prefetched answer
        up.close()
        up2 = await pool.connect(key)           # used up: the next connect resolves again
        assert rec.calls == ["api.example", "api.example"]
        up2.close()
        server.close()
        await server.wait_closed()
    asyncio.run(main())


def test_a_stale_prefetch_is_not_used_and_does_not_block_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "PREFETCH_TTL", 0.05)

    async def main() -> None:
        server, port = await _listener()
        rec = Recorder()
        pool = Pool(resolve=rec, allow_private={"api.example"})
        key = ("http", "api.example", port)
        pool.prefetch(key)
        await asyncio.sleep(0.1)
        (await pool.connect(key)).close()
        assert rec.calls == ["api.example", "api.example"]
        pool.prefetch(key)
        await asyncio.sleep(0.1)
        pool.prefetch(key)                      # the stale one is replaced, not kept
        await asyncio.sleep(0)
        assert rec.calls == ["api.example"] * 4
        server.close()
        await server.wait_closed()
    asyncio.run(main())


def test_a_failed_prefetch_gets_a_fresh_lookup_and_is_never_unretrieved() -> None:
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        rec = Recorder(fail=True)
        pool = Pool(resolve=rec)
        pool.prefetch(("https", "gone.example", 443))
        with pytest.raises(UpstreamError, match="cannot resolve gone.example"):
            await pool.connect(("https", "gone.example", 443))
        assert rec.calls == ["gone.example", "gone.example"]    # the failure ahead got a fresh try
        pool.prefetch(("https", "never-asked.example", 443))   # the tunnel closes before a request
        await asyncio.sleep(0.01)
        pool.close()
    asyncio.run(main())
    gc.collect()
    assert not errors, errors


def test_the_guard_still_applies_to_a_prefetched_answer() -> None:
    async def main() -> None:
        pool = Pool(resolve=Recorder())        # 127.0.0.1, and api.example not allowed private
        pool.prefetch(("https", "api.example", 443))
        with pytest.raises(UpstreamError) as info:
            await pool.connect(("https", "api.example", 443))
        assert info.value.status == 403 and "loopback" in info.value.reason
    asyncio.run(main())


def test_the_sidecar_prefetches_only_names_its_policy_names(tmp_path: Any) -> None:
    policy = CompiledPolicy.compile(parse_egress({
        "default": {"action": "deny", "reason": "not listed"},
        "rules": [{"id": "api", "hosts": ["api.example", "*.cdn.example"], "decision": {"action": "allow"}},
                  {"id": "no", "hosts": ["blocked.example"], "decision": {"action": "deny", "reason": "no"}}],
    }))
    rec = Recorder()

    async def main() -> None:
        audit = AuditLog(tmp_path / "audit.jsonl", container="t")
        sidecar = Sidecar(policy, CertificateAuthority.create("t"), audit, resolve=rec)
        for host in ("api.example", "img.cdn.example", "blocked.example", "other.example"):
            sidecar._prefetch(host, 443)
        await asyncio.sleep(0)
        sidecar.pool.close()
        audit.close()
    asyncio.run(main())
    assert sorted(rec.calls) == ["api.example", "img.cdn.example"]
