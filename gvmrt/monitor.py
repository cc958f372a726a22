"""The per-container monitor: the sidecar proxy in the host namespace, beside the container.

`gvmrt create` forks it before the container init (DESIGN.md §3), so its imports and the CA
overlap the jail's setup; it is never the container's parent, and when `create` exits it is
re-parented to the caller's subreaper like the init. It lives until the init exits (watched
through a pidfd) or `gvmrt delete` stops it.

    create ──fork──► monitor: setsid, stdio to /dev/null and its log; CA → {"ca": pem}
    create ◄── init: {"ready", listeners} + fds (SCM_RIGHTS)
    create ──────► monitor: {"listeners", "init"} + the same fds; create closes its copies
    monitor ─────► create: {"serving": true}

The monitor holds the only copies of the jail's listening sockets, so if it dies the jail's
ports 80, 443, 3128 and 53 refuse connections (UDP 53 goes unanswered): no network at all
(fail closed). It also serves the container's control socket (gvmrt.control: events, approvals,
reload) and, for root's containers, runs as nobody once its files are open.
"""

from __future__ import annotations

import os

from gvmrt.linux import process
from gvmrt.linux import sys as lsys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

READY_TIMEOUT = 30


def spawn(conf: dict[str, Any]) -> tuple[int, Any]:
    """Fork the monitor; returns (pid, create's end of its socket). The child never returns.

    conf: id, egress (the plan's JSON), watch, ca_dir, audit, log, upstream_ca (absolute or None),
    state_dir, owner, capture, credentials, secrets (only ever in memory), dns, audit_key (a private
    key file or None), audit_max_bytes, bundle, config_sha256.
    """
    parent, child = process.sync_pair()
    pid = os.fork()
    if pid:
        child.close()
        return pid, parent
    code = 1
    try:
        parent.close()
        os.setsid()  # not in the caller's process group: a ^C meant for `gvmrt run` is forwarded, not fatal
        devnull = os.open("/dev/null", os.O_RDWR)
        log = os.open(conf["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(log, 2)
        # Nothing of the caller's lives on here: not its stdout (a `$(gvmrt create)` would wait
        # for our EOF), not the container's lock file, not the sync socket of the init.
        keep = child.fileno()
        lsys.close_range(3, keep - 1)
        lsys.close_range(keep + 1)
        code = _main(conf, child)
    except BaseException as exc:  # noqa: BLE001 - reported to create, or to the log
        try:
            process.send(child, error=f"sidecar: {type(exc).__name__}: {exc}")
        except OSError:
            pass
        try:
            os.write(2, f"gvmrt monitor {conf['id']}: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _main(conf: dict[str, Any], sock: Any) -> int:
    # In the order the jail needs things: the init waits for the CA, so cryptography first; the
    # rest is imported while the init sets up, and asyncio only once `create` has been answered
    # (the listeners queue connections meanwhile).
    ca = None
    if not conf.get("ca_pooled"):
        from gvmrt.proxy.certs import CertificateAuthority
        ca = CertificateAuthority.create(f"gvmrt {conf['id']}")
        ca.save(conf["ca_dir"])
        process.send(sock, ca=ca.cert_pem.decode())

    import resource
    import socket

    from gvmrt import evloop
    from gvmrt.audit.writer import AuditError, AuditLog, open_segment, record_time
    from gvmrt.policy.matcher import CompiledPolicy
    # Two sockets per proxied connection: take the whole hard limit we were given.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The plan's policy was validated by `create` (gvmrt.plan): compiled from its JSON, no pydantic.
    egress = conf["egress"]
    policy = CompiledPolicy.from_json(egress, watch=True if conf.get("watch") else None)

    try:
        msg = process.recv(sock, timeout=None, what="gvmrt create")
    except EOFError:
        return 0  # create failed or died before the jail was ready: nothing to serve
    if "listeners" not in msg:
        return 0
    fds = msg.get("fds", [])
    listeners = [(kind, port, socket.socket(fileno=fd)) for (kind, port), fd in zip(msg["listeners"], fds)]
    try:
        pidfd = os.pidfd_open(msg["init"])
    except OSError:
        return 0  # the init is already gone
    # Everything that can fail for a reason the user should hear from `create` is done by now.
    signer = None
    if conf.get("audit_key"):
        from gvmrt.audit.keys import load_private
        signer = load_private(conf["audit_key"])
    status_fd = os.open(os.path.join(conf["state_dir"], STATUS_FILE),
                        os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    live: dict[str, Any] = {}      # the sidecar's event fan-out, once there is one

    def on_status(status: dict[str, Any]) -> None:
        # What `gvmrt state` shows of the log (gvmrt.runtime.oci_state); pwrite, as the file was
        # opened before the privileges went.
        import json
        # One pwrite of a fixed size (the JSON padded with spaces): a reader never sees half of
        # one status and half of another, as it could across a write and a truncate.
        data = json.dumps({**status, "reason": str(status.get("reason") or "")[:2000]}).encode()
        try:
            os.pwrite(status_fd, data.ljust(STATUS_SIZE), 0)
        except OSError:
            pass
        if status.get("audit") in ("failing", "failed"):
            os.write(2, f"gvmrt monitor {conf['id']}: {status.get('reason')}\n".encode())
        events = live.get("events")
        if events is not None and status.get("audit") != "closed":
            events.publish({"event": "audit", "time": record_time(), **status})    # `gvmrt events -f`

    # A root monitor runs as nobody, who may not create files in root's audit directory: the next
    # segment file of a rotation comes from a helper that keeps root and does nothing else.
    opener = _segment_keeper(conf["audit"]) if os.geteuid() == 0 else open_segment
    audit = AuditLog(conf["audit"], container=conf["id"], signer=signer, opener=opener, on_status=on_status,
                     max_segment_bytes=conf.get("audit_max_bytes") or MAX_SEGMENT_BYTES)
    audit.append({"record": "lifecycle", "event": "created", "time": record_time(), "container": conf["id"],
                  "bundle": conf.get("bundle"), "config_sha256": conf.get("config_sha256"),
                  "policy_sha256": policy_hash(egress), "owner_uid": conf["owner"],
                  "watch": bool(conf.get("watch"))})
    on_status({"audit": "ok"})
    from gvmrt import control
    control_sock = control.bind(conf["state_dir"])
    process.send(sock, serving=True)
    sock.close()

    import asyncio
    import signal

    from gvmrt.errors import GvmrtError
    from gvmrt.proxy.credentials import Credentials
    from gvmrt.linux import netns
    from gvmrt.proxy.server import Sidecar, tune_gc

    statics = {host: list(addrs) for host, addrs in (egress.get("resolve") or {}).items()}

    async def resolve(host: str, port: int) -> list[str]:
        if host in statics:
            return statics[host]
        from gvmrt.proxy.upstream import default_resolve
        return await default_resolve(host, port)

    if ca is None:
        from gvmrt.proxy.certs import CertificateAuthority
        ca = CertificateAuthority.load(conf["ca_dir"])    # create claimed it from the pool
    creds = Credentials(conf.get("credentials") or [], conf.get("secrets") or {})
    conf.pop("secrets", None)
    sidecar = Sidecar(policy, ca, audit, upstream_cafile=conf.get("upstream_ca"),
                      allow_private=egress.get("allow_private") or (), resolve=resolve, container=conf["id"],
                      credentials=creds, dns_conf=conf.get("dns"))
    sidecar.pool.read_ca()       # now, with our rights; the context is built in a thread once serving
    live["events"] = sidecar.events
    try:
        from gvmrt import capool
        capool.refill()           # the next governed create will not wait for a CA
    except Exception as exc:  # noqa: BLE001 - an optimisation: never a reason not to serve
        os.write(2, f"gvmrt monitor: CA pool: {exc}\n".encode())
    _drop_privileges()
    tune_gc()

    current = {"sha256": policy_hash(egress)}
    captured = set(conf.get("capture") or ())

    async def lifecycle(event: str, uid: int) -> dict[str, Any]:
        """A lifecycle step another gvmrt command reports: `gvmrt start`. The agent's listeners are
        served only once its start is on record (serve() waits for `started`), so the record
        precedes every request of the agent without `start` having to wait for us; a log that
        cannot take it is retried, and the agent has no network meanwhile (fail closed)."""
        if event != "started":
            return {"ok": False, "error": f"unknown lifecycle event {event!r}"}
        if started.is_set() or starting:
            return {"ok": True, "message": "already started"}
        starting.append(uid)
        entry = {"record": "lifecycle", "event": event, "time": record_time(), "container": conf["id"],
                 "by_uid": uid}
        seq = None
        while True:
            try:
                if seq is None:
                    seq = audit.append(entry)
                await audit.durable(seq)
                break
            except AuditError:
                if audit.failed is not None:
                    # For good: the agent never gets a network from this monitor.
                    return {"ok": False, "error": f"cannot record the start: {audit.failed}"}
                await asyncio.sleep(1)
        started.set()
        sidecar.events.publish(dict(entry))
        return {"ok": True}

    async def record(entries: Any, uid: int) -> dict[str, Any]:
        """Filesystem commits and discards `gvmrt commit` made (gvmrt.review): into the log, durably."""
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("record") == "filesystem"
                                                    for e in entries):
            return {"ok": False, "error": "record takes a list of filesystem records"}
        try:
            seq = -1
            for e in entries:
                seq = audit.append({**e, "by_uid": uid})
            await audit.durable(seq)
        except AuditError as exc:
            return {"ok": False, "error": f"cannot record: {exc}"}
        for e in entries:
            sidecar.events.publish({"event": "filesystem", **e})
        return {"ok": True}

    async def reload(text: Any, uid: int) -> dict[str, Any]:
        """Swap in a policy `gvmrt update` validated; recorded in the log with both hashes (of the
        canonical JSON text applied)."""
        import hashlib
        import json
        try:
            new = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            new = None
        if not isinstance(new, dict):
            return {"ok": False, "error": "reload needs the egress policy as JSON text of an object"}
        if new.get("upstream_ca") != egress.get("upstream_ca"):
            return {"ok": False, "error": "upstream_ca cannot change while the container runs (its trust is "
                                          "built at start); recreate the container"}
        try:
            compiled = CompiledPolicy.from_json(new, watch=True if conf.get("watch") else None)
        except (KeyError, TypeError, ValueError) as exc:   # validated by the CLI; belt and braces
            return {"ok": False, "error": f"the policy does not compile: {exc}; the old one stays"}
        old_sha, new_sha = current["sha256"], hashlib.sha256(text.encode()).hexdigest()
        entry = {"record": "lifecycle", "time": record_time(), "container": conf["id"], "event": "reload",
                 "old_sha256": old_sha, "new_sha256": new_sha, "by_uid": uid, "rules": len(new.get("rules") or ())}
        try:
            await audit.durable(audit.append(entry))    # a reload nobody can see did not happen
        except AuditError as exc:
            return {"ok": False, "error": f"cannot record the reload: {exc}; the old policy stays"}
        sidecar.reload(compiled, new.get("allow_private") or ())
        statics.clear()
        statics.update({h: list(a) for h, a in (new.get("resolve") or {}).items()})
        current["sha256"] = new_sha
        sidecar.events.publish(entry)
        ports = sorted({p for r in new.get("rules") or () for p in r.get("ports") or ()} - captured - {3128})
        warnings = [f"port {p} is not captured in this jail (ports are fixed at create: "
                    f"{', '.join(map(str, sorted(captured)))}); rules for it apply to the explicit proxy only"
                    for p in ports]
        return {"ok": True, "old": old_sha, "new": new_sha, "warnings": warnings}

    async def accept_loop(listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                os.write(2, f"gvmrt monitor: accept on {listener.getsockname()}: {exc}\n".encode())
                await asyncio.sleep(0.1)
                continue
            asyncio.ensure_future(sidecar.captured(conn))

    ended: dict[str, Any] = {}
    started = asyncio.Event()
    starting: list[int] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def init_exited() -> None:
            # Read its status now, while it is a zombie (gvmrt run waits for us before reaping).
            ended.update(_exit_of(msg["init"]))
            loop.remove_reader(pidfd)
            stop.set()
        loop.add_reader(pidfd, init_exited)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        servers = []
        tasks = []
        sidecar.start()
        servers.append(await control.serve(control_sock, sidecar, conf["owner"], reload, lifecycle, record))
        loop.run_in_executor(None, sidecar.pool.tls_context)     # ~20 ms, off the loop
        # The agent cannot connect before `start` (its init waits on the exec FIFO); its first
        # connections queue in the listeners' backlog until the start is on record.
        go = asyncio.ensure_future(started.wait())
        await asyncio.wait({go, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        # A server made on a passed socket listens on it again, with a backlog of 100 unless told:
        # keep the init's. (At 100, 64 clients dialling at once overflowed the proxy port's queue.)
        for kind, port, listener in listeners if started.is_set() else ():
            if kind == "proxy":
                servers.append(await loop.create_server(sidecar.protocol, sock=listener, backlog=netns.BACKLOG))
            elif kind == "dns-tcp" or (kind == "capture" and port == 53):
                servers.append(await asyncio.start_server(sidecar.dns_tcp, sock=listener, limit=64 * 1024,
                                                          backlog=netns.BACKLOG))
            elif kind == "dns-udp":
                _serve_udp(loop, listener, sidecar)
            else:
                tasks.append(asyncio.ensure_future(accept_loop(listener)))
        await stop.wait()
        for t in tasks:
            t.cancel()
        for srv in servers:
            srv.close()
        await sidecar.shutdown()
        # The last word: how the container ended, if it has (else `delete` stopped us first).
        if not ended:
            ended.update(_exit_of(msg["init"]))
        entry = {"record": "lifecycle", "event": "stopped", "time": record_time(), "container": conf["id"], **ended}
        try:
            audit.append(entry)
        except AuditError:
            pass

    try:
        evloop.run(serve())
    except GvmrtError as exc:
        os.write(2, f"gvmrt monitor {conf['id']}: {exc}\n".encode())
        return 1
    finally:
        audit.close()
        on_status({"audit": "closed"})
        for _, _, listener in listeners:
            listener.close()
    return 0


NOBODY = 65534
STATUS_FILE = "sidecar.status"
STATUS_SIZE = 4096
MAX_SEGMENT_BYTES = 64 * 1024 * 1024


def _segment_keeper(path: str) -> Any:
    """Fork a helper that keeps our (root's) rights for one thing: creating the next segment file
    of the log `path` and handing back its descriptor. It takes a segment number and nothing else,
    and ends when we do (EOF). Returns opener(path, n) -> fd for gvmrt.audit.writer.AuditLog."""
    import socket
    import struct

    from gvmrt.audit.writer import open_segment
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            keep = theirs.fileno()
            lsys.close_range(3, keep - 1)
            lsys.close_range(keep + 1)
            expected = 2            # only ever the next segment, in order: nothing else can be asked
            while True:
                data = theirs.recv(32)
                if not data:
                    break
                try:
                    if data != str(expected).encode():
                        raise ValueError(data)
                    fd = open_segment(path, expected)
                    expected += 1
                except (ValueError, OSError) as exc:
                    theirs.send(f"error {getattr(exc, 'errno', 0) or 22}".encode())
                    continue
                theirs.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
                os.close(fd)
        except BaseException:  # noqa: BLE001 - nothing to report to: the log says the rest
            code = 1
        finally:
            os._exit(code)
    theirs.close()

    def opener(_path: str, n: int) -> int:
        ours.send(str(n).encode())
        data, anc, _flags, _addr = ours.recvmsg(64, socket.CMSG_SPACE(4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                return struct.unpack("i", payload[:4])[0]
        errno_ = int(data.split()[1]) if data.startswith(b"error ") else 5
        raise OSError(errno_, os.strerror(errno_))
    return opener


def _exit_of(pid: int) -> dict[str, Any]:
    """How the init ended, read from its zombie (/proc/PID/stat field 52, exit_code, as waitpid
    encodes it): a monitor is not the init's parent and cannot wait for it. Gone already (its
    parent reaped it first) or still running: said so."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return {"exit_status": None, "note": "the container was reaped before its monitor could read its status"}
    if fields[0] != b"Z":
        return {"exit_status": None, "note": "the monitor was stopped while the container ran"}
    status = int(fields[49])        # field 52; fields[0] is field 3 (state)
    if os.WIFSIGNALED(status):
        return {"exit_status": 128 + os.WTERMSIG(status), "signal": os.WTERMSIG(status)}
    return {"exit_status": os.WEXITSTATUS(status)}


def _drop_privileges() -> None:
    """The sidecar parses whatever the agent sends: it runs with as little as it needs.

    Everything that needs the invoking user's rights (the CA files, the audit log, the upstream
    CA, the listeners) is open by now. A monitor of root's container becomes nobody, so a bug in
    the proxy is not a root shell on the host; every monitor sets no_new_privs.
    """
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    lsys.prctl(lsys.PR_SET_NO_NEW_PRIVS, 1)


def policy_hash(egress: dict[str, Any]) -> str:
    """SHA-256 of the policy's canonical JSON text (gvmrt.control.policy_text): what a reload records."""
    import hashlib

    from gvmrt.control import policy_text
    return hashlib.sha256(policy_text(egress).encode()).hexdigest()


def _serve_udp(loop: Any, sock: Any, sidecar: Any) -> None:
    """The jail's UDP DNS: each query answered from the address it was sent to (PKTINFO)."""
    import asyncio
    import socket
    import struct

    v6 = sock.family == socket.AF_INET6
    level, kind = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO) if v6 else (socket.IPPROTO_IP, 8)  # IP_PKTINFO
    sock.setblocking(False)

    async def one(data: bytes, peer: Any, dst: bytes) -> None:
        if v6:
            where = socket.inet_ntop(socket.AF_INET6, dst[:16])
            anc = [(level, kind, dst[:16] + struct.pack("I", 0))]
        else:
            where = socket.inet_ntoa(dst[8:12])
            anc = [(level, kind, struct.pack("i4s4s", 0, dst[8:12], b"\0" * 4))]
        reply = await sidecar.dns_query(data, where, "udp")
        if reply is not None:
            try:
                sock.sendmsg([reply], anc, 0, peer)
            except OSError:
                pass

    def readable() -> None:
        while True:
            try:
                data, ancdata, _flags, peer = sock.recvmsg(4096, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            dst = next((d for lvl, t, d in ancdata if lvl == level and t == kind), None)
            if dst is None:
                continue
            task = asyncio.ensure_future(one(data, peer, dst))
            sidecar.tasks.add(task)
            task.add_done_callback(sidecar.tasks.discard)

    loop.add_reader(sock.fileno(), readable)
