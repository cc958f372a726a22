"""`gvmrt proxy`: the bundle's sidecar, standalone, for a process outside any jail (cooperative mode).

For hosts where a jail is impossible, and for measuring the proxy alone (issue 3). The process
must be pointed at it (proxy variables) and trust its CA; nothing forces it to, which is the
difference from a jail. The CA is made for this run and its key removed at exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Optional

import typer

from gvmrt.errors import GvmrtError, HostError, UsageError


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:3128")
    return host, int(port)


def _audit_path() -> str:
    from gvmrt.hostconf import audit_dir
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return os.path.join(audit_dir(), f"proxy-{stamp}-{os.getpid()}.jsonl")


def proxy(
    listen: str = typer.Option("127.0.0.1:3128", "--listen", help="HOST:PORT to listen on (port 0: any free port)"),
    bundle: str = typer.Option(".", "--bundle", "-b", help="the bundle whose gvm.egress policy decides"),
    audit: Optional[str] = typer.Option(None, "--audit", help="decision log, JSON lines (default under "
                                        "$XDG_STATE_HOME/gvmrt/audit/)"),
    upstream_ca: Optional[str] = typer.Option(None, "--upstream-ca", help="extra CA file for private upstreams"),
    allow_private: list[str] = typer.Option([], "--allow-private",
                                            help="host that may resolve to a loopback/private address (repeatable)"),
) -> None:
    """Run the bundle's sidecar standalone: an explicit HTTP(S) proxy that decides, and logs, every request."""
    from gvmrt.linux.cleanup import remove_tree
    from gvmrt.policy.matcher import CompiledPolicy
    from gvmrt.policy.model import Egress
    from gvmrt.audit.keys import load_private
    from gvmrt.audit.writer import MAX_SEGMENT_BYTES, AuditLog
    from gvmrt.hostconf import load as host_config
    from gvmrt.hostconf import signing_key
    from gvmrt.proxy.certs import CertificateAuthority
    from gvmrt import evloop
    from gvmrt.proxy.server import serve, tune_gc
    from gvmrt.spec import parse_config
    from gvmrt.statedir import StateRoot

    host, port = _parse_listen(listen)
    from gvmrt.runtime import read_config
    raw, cfg_path = read_config(bundle)
    if upstream_ca and not os.path.isfile(upstream_ca):
        raise UsageError(f"--upstream-ca {upstream_ca}: no such file")
    cfg = parse_config(raw, cfg_path)
    egress = cfg.gvm.egress if cfg.gvm and cfg.gvm.egress else Egress()
    policy = CompiledPolicy.compile(egress)
    # The bundle's own upstream settings, as in a jail; the flags add to them.
    if upstream_ca is None and egress.upstream_ca:
        upstream_ca = os.path.join(bundle, egress.upstream_ca)
        if not os.path.isfile(upstream_ca):
            raise UsageError(f"{cfg_path}: /gvm/egress/upstream_ca: {upstream_ca}: no such file in the bundle")
    allow_private = list(egress.allow_private) + list(allow_private)
    statics = dict(egress.resolve)

    async def resolve(host: str, port: int) -> list[str]:
        if host in statics:
            return statics[host]
        from gvmrt.proxy.upstream import default_resolve
        return await default_resolve(host, port)

    state = StateRoot(None)
    state.ensure()
    ca_dir = os.path.join(state.path, f"proxy-{os.getpid()}")
    os.mkdir(ca_dir, 0o700)
    audit_file = audit or _audit_path()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(audit_file)), mode=0o700, exist_ok=True)
        ca = CertificateAuthority.create(f"gvmrt proxy {os.path.basename(os.path.abspath(bundle))}")
        ca.save(ca_dir)
        host_conf = host_config()
        key = signing_key(cfg.gvm.audit.key if cfg.gvm and cfg.gvm.audit else None, bundle, host_conf)
        writer = AuditLog(audit_file, container=f"proxy-{os.getpid()}",
                          signer=load_private(key) if key else None,
                          max_segment_bytes=(host_conf.get("audit") or {}).get("max_segment_bytes")
                          or MAX_SEGMENT_BYTES)
        bound: list[tuple[str, int]] = []

        async def main() -> None:
            ready = asyncio.Event()
            task = asyncio.ensure_future(serve((host, port), policy, ca, writer, upstream_cafile=upstream_ca,
                                               allow_private=set(allow_private), ready=ready, bound=bound,
                                               resolve=resolve))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, task.cancel)
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                waiter.cancel()
                task.result()  # raises the bind error
            h, p = bound[0][0], bound[0][1]
            url = f"http://{h}:{p}"
            ca_pem = os.path.join(ca_dir, "ca.pem")
            print(f"gvmrt proxy: listening on {h}:{p} for {os.path.abspath(bundle)} "
                  f"({len(egress.rules)} rules, mode {egress.mode})")
            print(f"trust this CA: {ca_pem}")
            print(f"decisions are logged to: {audit_file} "
                  f"({'signed by key ' + str(writer.chain.key) if writer.signed else 'unsigned'})")
            print(f"export HTTP_PROXY={url} HTTPS_PROXY={url} ALL_PROXY={url} http_proxy={url} https_proxy={url} "
                  f"all_proxy={url} NO_PROXY= no_proxy= SSL_CERT_FILE={ca_pem} REQUESTS_CA_BUNDLE={ca_pem} "
                  f"CURL_CA_BUNDLE={ca_pem} NODE_EXTRA_CA_CERTS={ca_pem}")
            sys.stdout.flush()
            try:
                await task
            except asyncio.CancelledError:
                pass

        tune_gc()
        try:
            evloop.run(main())
        except OSError as exc:
            raise HostError(f"--listen {listen}: {exc.strerror}") from None
        finally:
            writer.close()
    finally:
        # The CA is this run's only: its key must not outlive the proxy.
        remove_tree(ca_dir, [], [])
    if not os.path.exists(audit_file):
        raise GvmrtError(f"audit log {audit_file} vanished")
