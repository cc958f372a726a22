"""create / start / state / kill / delete / run / list: spec → plan → processes → state.

This is the library the CLI calls (STYLE.md habit 7); it never prints except the notices it is
asked to emit through ``notify``. Stdlib only on this path: see gvmrt.plan for the cache that
keeps pydantic and libseccomp off it.
"""

from __future__ import annotations

import _signal  # the C module: `signal` imports enum (~4 ms)
import errno
import os
import select
import time

from gvmrt import OCI_VERSION, lifecycle
from gvmrt.errors import (ContainerExists, ContainerNotFound, GvmrtError, HostError, StateCorrupt, StateError,
                          UsageError)
from gvmrt.lifecycle import CREATED, CREATING, RUNNING, STOPPED
from gvmrt.statedir import Lock, StateRoot, read_state, validate_id, write_json_atomic

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any, Callable

    Notify = Callable[[str], None]


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _starttime(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks, state letter) of ``pid``, or None if it does not exist.

    The start time (proc(5) /proc/PID/stat field 22) tells our init from a recycled pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19]), fields[0].decode()


def _alive(st: dict[str, Any]) -> bool:
    pid = st.get("pid") or 0
    if pid <= 0:
        return False
    now = _starttime(pid)
    return now is not None and now[0] == st.get("pid_start") and now[1] not in ("Z", "X")


def status_of(st: dict[str, Any], sdir: str) -> str:
    if st.get("status") == CREATING:
        # creating is real only while its `gvmrt create` holds the lock; otherwise that create died.
        lock = Lock(sdir)
        try:
            got = lock.acquire(blocking=False)
        except (OSError, ContainerNotFound):
            got = True  # no lock file at all: create died right after making the directory
        if got:
            lock.release()
            return STOPPED
        return CREATING
    if not _alive(st):
        return STOPPED
    return CREATED if os.path.exists(os.path.join(sdir, "exec.fifo")) else RUNNING


def oci_state(st: dict[str, Any], status: str, sdir: str | None = None) -> dict[str, Any]:
    out = {
        "ociVersion": OCI_VERSION,
        "id": st["id"],
        "status": status,
        "pid": st.get("pid", 0) if status in (CREATED, RUNNING) else 0,
        "bundle": st.get("bundle", ""),
        "rootfs": st.get("rootfs", ""),
        "created": st.get("created", ""),
        "owner": st.get("owner", ""),
        "annotations": st.get("annotations") or {},
    }
    if "exit_status" in st and status == STOPPED:
        out["exitStatus"] = st["exit_status"]
    side = st.get("sidecar")
    if side:
        # Not OCI (like runc's rootfs/created/owner): whether the jail's only way out is alive.
        alive = _alive({"pid": side.get("pid"), "pid_start": side.get("pid_start")})
        out["sidecar"] = {"pid": side.get("pid", 0) if alive else 0, "status": "running" if alive else "stopped",
                          "audit": side.get("audit", "")}
        if alive and sdir is not None:
            # The monitor's word on its log (gvmrt.monitor.on_status): a failing log refuses requests.
            try:
                with open(os.path.join(sdir, "sidecar.status"), "rb") as f:
                    from gvmrt import _json
                    told = _json.loads(f.read(4096))
                out["sidecar"]["audit_status"] = told.get("audit")
                if told.get("reason"):
                    out["sidecar"]["audit_error"] = told["reason"]
            except (OSError, ValueError, AttributeError):
                pass
    return out


# --- resolving what the user typed ----------------------------------------------------------

def resolve_target(arg: str, id_override: str | None = None) -> tuple[str, str | None]:
    """An id, or a path to a bundle directory (holding config.json) meaning that bundle.

    Returns (container id, bundle dir or None). The short form `gvmrt run bundles/hello` uses the
    directory's name as the id unless --id overrides it.
    """
    if ("/" in arg or arg in (".", "..")) and os.path.isfile(os.path.join(arg, "config.json")):
        bundle = os.path.realpath(arg)
        return validate_id(id_override or os.path.basename(bundle)), bundle
    if id_override:
        raise UsageError(f"--id goes with a bundle directory, but {arg!r} is not one (no config.json in it)")
    if "/" in arg:
        raise UsageError(f"{arg!r} is neither a container id nor a bundle directory with a config.json")
    return validate_id(arg), None


def read_config(bundle: str) -> tuple[bytes, str]:
    """(config.json's bytes, its path) of a bundle directory, or a one-line UsageError."""
    if not os.path.isdir(bundle):
        raise UsageError(f"bundle {bundle}: no such directory")
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            return f.read(), path
    except FileNotFoundError:
        raise UsageError(f"bundle {bundle}: no config.json (write one with `gvmrt spec > {path}`)") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def _subid_maps(config_maps: list[list[int]], own: int) -> list[list[int]]:
    # No mappings in a config with a user namespace: map the invoking user to root (as crun does),
    # so a committed bundle runs for every teammate.
    return config_maps or [[0, own, 1]]


def _check_host(plan: dict[str, Any], file: str) -> None:
    """Host facts the cached plan cannot know: rlimits above what this process may raise."""
    import resource
    from gvmrt.errors import ConfigError

    can_raise = _has_cap(24) and not any(t == "user" for t, _ in plan["namespaces"])  # CAP_SYS_RESOURCE
    for i, (res, name, soft, hard) in enumerate(plan["process"]["rlimits"]):
        cur_soft, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and hard > cur_hard and not can_raise:
            raise ConfigError(file, f"/process/rlimits/{i}",
                              f"{name} hard limit {hard} is above this host's hard limit {cur_hard}, and raising it "
                              f"needs CAP_SYS_RESOURCE in the host namespace, which gvmrt does not have here; "
                              f"use at most {cur_hard}")


def _check_mapped(proc: dict[str, Any], uid_maps: list[list[int]], gid_maps: list[list[int]], file: str) -> None:
    """The process's ids must exist in the user namespace, or setresuid fails after `start`."""
    from gvmrt.errors import ConfigError

    def mapped(maps: list[list[int]], i: int) -> bool:
        return any(c <= i < c + s for c, _, s in maps)
    checks = [("/process/user/uid", proc["uid"], uid_maps, "uid"), ("/process/user/gid", proc["gid"], gid_maps, "gid")]
    checks += [(f"/process/user/additionalGids/{n}", g, gid_maps, "gid") for n, g in enumerate(proc["groups"])]
    for pointer, ident, maps, kind in checks:
        if not mapped(maps, ident):
            covered = ", ".join(f"{c}-{c + s - 1}" for c, _, s in maps)
            raise ConfigError(file, pointer, f"{kind} {ident} is not mapped in the jail's user namespace (mapped: "
                                             f"{covered}); add a {kind}Mappings range that covers it")


def _has_cap(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


# --- create --------------------------------------------------------------------------------

class Runtime:
    def __init__(self, root: str | None = None, notify: Notify | None = None) -> None:
        self.root = StateRoot(root)
        self.notify = notify or (lambda msg: None)

    # state ------------------------------------------------------------------
    def _load(self, cid: str) -> tuple[str, dict[str, Any]]:
        sdir = self.root.dir(validate_id(cid))
        self.root.check(sdir)
        return sdir, read_state(sdir, cid)

    def state(self, cid: str) -> dict[str, Any]:
        sdir, st = self._load(cid)
        return oci_state(st, status_of(st, sdir), sdir)

    def list(self) -> list[dict[str, Any]]:
        self.root.check()
        out = []
        for cid in self.root.ids():
            try:
                out.append(self.state(cid))
            except (ContainerNotFound, GvmrtError):
                continue
        return out

    # create -----------------------------------------------------------------
    def create(self, cid: str, bundle: str, *, pid_file: str | None = None, preserve_fds: int = 0,
               console_socket: str | None = None, watch: bool = False) -> dict[str, Any]:
        from gvmrt.linux import process
        from gvmrt.linux import sys as lsys
        from gvmrt.plan import NS_FLAGS, load_plan

        validate_id(cid)
        bundle = os.path.realpath(bundle)
        raw, cfg_path = read_config(bundle)
        plan = load_plan(raw, cfg_path)
        for w in plan["warnings"]:
            self.notify(w)
        rootfs = os.path.join(bundle, plan["root"])
        if not os.path.isdir(rootfs):
            raise UsageError(f"{cfg_path}: /root/path: root filesystem {rootfs} is not a directory "
                             f"(build it, or fix root.path)")
        lowers = [rootfs] + _layer_dirs(plan.get("root_layers") or [], cfg_path)
        if plan["process"]["terminal"] and not console_socket:
            raise UsageError(f"{cfg_path}: /process/terminal: true needs --console-socket "
                             f"(or set terminal to false to keep the caller's stdio)")
        if console_socket and not plan["process"]["terminal"]:
            raise UsageError(f"--console-socket needs process.terminal true in {cfg_path} (as with runc)")
        _check_host(plan, cfg_path)

        ns_types = {t for t, _ in plan["namespaces"]}
        new_userns = "user" in ns_types and not dict(plan["namespaces"])["user"]
        uid, gid = os.getuid(), os.getgid()
        if uid != 0 and "user" not in ns_types:
            raise UsageError(f"{cfg_path}: /linux/namespaces: running as uid {uid} (rootless) needs a 'user' "
                             "namespace; add {\"type\": \"user\"}")
        uid_maps = _subid_maps(plan["uid_mappings"], uid) if new_userns else []
        gid_maps = _subid_maps(plan["gid_mappings"], gid) if new_userns else []
        setgroups_denied = new_userns and uid != 0 and len(gid_maps) == 1 and gid_maps[0][1:] == [gid, 1]
        if new_userns:
            _check_mapped(plan["process"], uid_maps, gid_maps, cfg_path)
        if plan["process"]["groups"] and setgroups_denied:
            from gvmrt.errors import ConfigError
            raise ConfigError(cfg_path, "/process/user/additionalGids",
                              "needs a gid mapping wider than your own gid (a user namespace that maps one "
                              "gid must deny setgroups); add gidMappings from /etc/subgid")
        for fd in range(3, 3 + preserve_fds):
            try:
                os.fstat(fd)
            except OSError:
                raise UsageError(f"--preserve-fds {preserve_fds}: fd {fd} is not open") from None
        gvm = plan.get("gvm")
        upstream_ca = None
        if gvm is not None and gvm["egress"].get("upstream_ca"):
            upstream_ca = os.path.join(bundle, gvm["egress"]["upstream_ca"])
            if not os.path.isfile(upstream_ca):
                from gvmrt.errors import ConfigError
                raise ConfigError(cfg_path, "/gvm/egress/upstream_ca", f"{upstream_ca}: no such file in the bundle")
        secrets = _secrets(gvm["credentials"], cfg_path) if gvm is not None and gvm["credentials"] else {}
        if watch and gvm is None:
            raise UsageError(f"--watch records what the sidecar sees, but {cfg_path} has no gvm section "
                             "(add \"gvm\": {} to govern this bundle)")
        workspaces = _workspaces(gvm, bundle, cfg_path)
        data = self.root.data_dir(cid)  # may fail (no home): before anything is made

        self.root.ensure()
        sdir = self.root.dir(cid)
        try:
            os.mkdir(sdir, 0o700)
        except FileExistsError:
            raise ContainerExists(cid) from None
        lock = Lock(sdir, cid, create=True)
        lock.acquire()
        st: dict[str, Any] = {
            "id": cid, "status": CREATING, "pid": 0, "bundle": bundle, "rootfs": rootfs,
            "created": _now(), "owner": _owner(uid), "annotations": plan["annotations"],
            "uid_mappings": uid_maps, "gid_mappings": gid_maps,
        }
        parent = child = mon = None
        init_pid = mon_pid = 0
        ca_pem: str | None = None
        fds: list[int] = []
        try:
            write_json_atomic(os.path.join(sdir, "state.json"), st)
            fifo = os.path.join(sdir, "exec.fifo")
            os.mkfifo(fifo, 0o600)
            if os.path.lexists(data):
                # Left by an earlier container of this id whose state vanished (a reboot clears
                # /run): its writes must not show up in this one.
                from gvmrt.linux.cleanup import remove_tree
                remove_tree(data, uid_maps, gid_maps)
                self.notify(f"removed the stale overlay upper dir of an earlier container {cid!r}: {data}")
            _make_data_dirs(data, rootfs, uid_maps, gid_maps)
            for i, ws in enumerate(workspaces):
                _make_workspace_dirs(data, i, ws, uid_maps, gid_maps)
            if workspaces:
                st["workspaces"] = [{"source": w["source"], "destination": w["destination"], "upper": w["upper"]}
                                    for w in workspaces]
                fs = gvm["filesystem"] if gvm is not None else {}
                st["fs_policy"] = {"rules": fs.get("rules") or [], "default": fs.get("default") or "review"}
            if uid == 0:
                # The init reopens the FIFO through /proc/self/fd as the jail's root (runc chowns it too).
                os.chown(fifo, _host_id(uid_maps, 0, 0), _host_id(gid_maps, 0, 0))
            ctx = {
                "bundle": bundle, "lowers": lowers, "upper": os.path.join(data, "upper"),
                "work": os.path.join(data, "work"), "merged": os.path.join(data, "merged"), "fifo": fifo,
                "ns_flags": NS_FLAGS, "new_userns": new_userns, "new_netns": "network" in ns_types
                and not dict(plan["namespaces"])["network"], "gid_mappings": gid_maps,
                "setgroups_denied": setgroups_denied, "preserve_fds": preserve_fds, "workspaces": workspaces,
                # read here, not in the jail: after pivot_root /proc is the container's to fake
                "last_cap": lsys.last_cap(),
            }
            if gvm is not None:
                # Forked before the init, so its imports and the CA overlap the jail's setup.
                from gvmrt import monitor
                from gvmrt import capool
                ca_dir = os.path.join(data, "ca")
                ca_pem = capool.claim(ca_dir)      # a ready CA: the init need not wait for one
                if ca_pem is None:
                    os.mkdir(ca_dir, 0o700)
                audit = self.root.audit_path(cid)
                _private_dirs(os.path.dirname(audit))
                _set_aside(audit)
                audit_key, audit_max = _audit_settings(gvm["audit"], bundle, cfg_path)
                from _sha256 import sha256
                mon_pid, mon = monitor.spawn({
                    "audit_key": audit_key, "audit_max_bytes": audit_max, "bundle": bundle,
                    "config_sha256": sha256(raw).hexdigest(),
                    "id": cid, "egress": gvm["egress"], "watch": watch, "ca_dir": ca_dir, "audit": audit,
                    "log": os.path.join(sdir, "sidecar.log"), "upstream_ca": upstream_ca,
                    "state_dir": sdir, "owner": uid, "capture": gvm["capture"],
                    "credentials": gvm["credentials"], "secrets": secrets, "dns": gvm["dns"],
                    "ca_pooled": ca_pem is not None})
                secrets = {}
                ctx["gvm"] = gvm
                st["sidecar"] = {"pid": mon_pid, "audit": audit, "audit_key": audit_key}
                mon_start = _starttime(mon_pid)
                st["sidecar"]["pid_start"] = mon_start[0] if mon_start else 0
                # On record at once: if this create is killed from here on, delete --force finds
                # the monitor and stops it before removing the dirs it may still be writing.
                write_json_atomic(os.path.join(sdir, "state.json"), st)
            ctx["fifo_fd"] = fifo_fd = os.open(fifo, os.O_PATH | os.O_CLOEXEC)
            console = _connect_console(console_socket) if console_socket else None
            ctx["console_fd"] = console.fileno() if console else -1
            parent, child = process.sync_pair()
            try:
                mid = process.spawn(ctx, plan, child, parent)
            finally:
                os.close(fifo_fd)
                if console:
                    console.close()
            child.close()
            child = None
            init_pid, ready = self._handshake(parent, mid, new_userns, uid_maps, gid_maps, uid, mon, ca_pem)
            fds = ready.get("fds", [])
            if mon is not None:
                # The listeners go on to the monitor; ours are closed so that it holds the only copies.
                process.send(mon, fds=fds, listeners=ready.get("listeners", []), init=init_pid)
                for fd in fds:
                    os.close(fd)
                fds = []
                msg = _recv_sidecar(mon)
                if not msg.get("serving"):
                    raise GvmrtError(f"sidecar: unexpected answer {msg!r}")
                mon.close()
                mon = None
            start = _starttime(init_pid)
            st.update(status=CREATED, pid=init_pid, pid_start=start[0] if start else 0)
            write_json_atomic(os.path.join(sdir, "state.json"), st)
            if pid_file:
                _write_pid_file(pid_file, init_pid)
            process.send(parent, ack=True)
        except BaseException:
            for fd in fds:
                os.close(fd)
            for pid in (init_pid, mon_pid):
                if pid:
                    try:
                        os.kill(pid, _signal.SIGKILL)
                    except OSError:
                        pass
            if mon_pid:
                try:
                    os.waitpid(mon_pid, 0)  # our child until we exit
                except ChildProcessError:
                    pass
            for s in (parent, child, mon):
                if s is not None:
                    s.close()
            lock.release()
            _remove_container(sdir, data, uid_maps, gid_maps)
            raise
        parent.close()
        lock.release()
        if gvm is None:
            from gvmrt.plan import NOT_GOVERNED
            self.notify(NOT_GOVERNED.format(file=cfg_path))
        return oci_state(st, CREATED)

    def _handshake(self, sock: Any, mid: int, new_userns: bool, uid_maps: list[list[int]],
                   gid_maps: list[list[int]], uid: int, mon: Any, ca_pem: str | None = None
                   ) -> tuple[int, dict[str, Any]]:
        """Drive the intermediate and the init to "ready"; returns (init pid, the ready message)."""
        from gvmrt.linux import process
        init_pid = 0
        try:
            msg = process.recv(sock, timeout=30)
            if "error" in msg:
                raise GvmrtError(msg["error"])
            if new_userns:
                process.write_id_maps(mid, uid_maps, gid_maps, deny_setgroups=uid != 0)
                process.send(sock, mapped=True)
            if mon is not None:
                # The init waits for the CA before it mounts the overlay: a pooled one at once, else
                # the one the monitor is making meanwhile.
                process.send(sock, ca=ca_pem if ca_pem is not None else _recv_sidecar(mon)["ca"])
            ready: dict[str, Any] | None = None
            # Two senders share the socket (the intermediate says which pid the init got, the init
            # says it is ready), so the two messages may come in either order.
            while not (ready and init_pid):
                msg = process.recv(sock, timeout=60)
                if "error" in msg:
                    for fd in msg.get("fds", []):
                        os.close(fd)
                    raise GvmrtError(f"container init: {msg['error']}")
                if "init" in msg:
                    init_pid = msg["init"]
                    os.waitpid(mid, 0)
                    mid = 0
                elif msg.get("ready"):
                    ready = msg
            return init_pid, ready
        except EOFError:
            raise GvmrtError("container init exited during setup without saying why") from None
        except process.ChildError as exc:
            raise GvmrtError(str(exc)) from None
        finally:
            if mid:
                try:
                    os.kill(mid, _signal.SIGKILL)
                    os.waitpid(mid, 0)
                except OSError:
                    pass

    # start ------------------------------------------------------------------
    def start(self, cid: str) -> None:
        sdir, st = self._load(cid)
        with Lock(sdir, cid):
            status = status_of(st, sdir)
            lifecycle.check(cid, "start", status)
            if st.get("sidecar"):
                _record_start(sdir, cid)
            fifo = os.path.join(sdir, "exec.fifo")
            try:
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise StateError(f"cannot start container {cid!r}: it was started already") from None
            try:
                _wait_fifo(fd, st["pid"], cid)
            finally:
                os.close(fd)
            os.unlink(fifo)

    # kill -------------------------------------------------------------------
    def kill(self, cid: str, sig: int = _signal.SIGTERM, all_procs: bool = False) -> None:
        sdir, st = self._load(cid)
        status = status_of(st, sdir)
        lifecycle.check(cid, "kill", status)
        pids = _container_pids(st["pid"]) if all_procs else [st["pid"]]
        for pid in pids:
            _send_signal(pid, sig, st["pid_start"] if pid == st["pid"] else None)

    # delete -----------------------------------------------------------------
    def delete(self, cid: str, force: bool = False, discard_changes: bool = False) -> None:
        sdir = self.root.dir(validate_id(cid))
        if not os.path.isdir(sdir):
            raise ContainerNotFound(cid)
        self.root.check(sdir)
        lock = Lock(sdir, cid)
        try:
            if force:
                # flock dies with its holder, so only a live command holds it: wait briefly for that
                # one, then go ahead regardless, because --force must always be able to clean up.
                deadline = time.monotonic() + 5
                while not lock.acquire(blocking=False):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            else:
                lock.acquire()
        except ContainerNotFound:
            if not (force and os.path.isdir(sdir) and not os.path.exists(lock.path)):
                raise
            # A husk: `create` died between making the directory and its lock file.
        try:
            try:
                st = read_state(sdir, cid)
            except StateCorrupt:
                if not force:
                    raise
                st = {"id": cid, "status": STOPPED, "pid": 0}  # nothing to signal: just remove it
            status = status_of(st, sdir) if lock.fd >= 0 else CREATING
            lifecycle.check(cid, "delete --force" if force else "delete", status)
            if st.get("pid") and status != STOPPED:
                _send_signal(st["pid"], _signal.SIGKILL, st.get("pid_start"))
                _wait_gone(st, cid)
            elif force and st.get("pid"):
                _wait_gone(st, cid)
            if st.get("sidecar"):
                _stop_sidecar(st["sidecar"], cid)
            # Derived, never read from state.json: a state file must not be able to aim rm -rf.
            try:
                data: str | None = self.root.data_dir(cid)
            except HostError as exc:
                if not force:
                    raise
                data = None
                self.notify(f"{exc}; removing only the state of {cid!r}")
            if st.get("workspaces") and data is not None and os.path.isdir(data):
                # What the agent wrote: auto-committed or discarded by gvm.filesystem, and what
                # waits for review keeps the container unless the caller drops it (recorded).
                from gvmrt.review import settle
                try:
                    settle(sdir, data, st, force or discard_changes, self.notify)
                except StateError:
                    raise
                except Exception as exc:  # noqa: BLE001 - --force must always clean up
                    if not force:
                        raise
                    self.notify(f"workspace review at delete: {exc}")
            _remove_container(sdir, data, st.get("uid_mappings") or [], st.get("gid_mappings") or [])
        finally:
            lock.release()

    # run --------------------------------------------------------------------
    def run(self, cid: str, bundle: str, *, detach: bool = False, keep: bool = False, pid_file: str | None = None,
            preserve_fds: int = 0, console_socket: str | None = None, watch: bool = False) -> int:
        """create + start (+ wait and delete): the exit status, or 128+N for signal N."""
        from gvmrt.linux import sys as lsys
        if not detach:
            # The init is orphaned when the intermediate child exits; as a subreaper we inherit it,
            # so we can wait for it and return its status (prctl(2) PR_SET_CHILD_SUBREAPER).
            lsys.prctl(lsys.PR_SET_CHILD_SUBREAPER, 1)
        st = self.create(cid, bundle, pid_file=pid_file, preserve_fds=preserve_fds, console_socket=console_socket,
                         watch=watch)
        pid = st["pid"]
        forwarded = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1,
                     _signal.SIGUSR2, _signal.SIGWINCH)
        if not detach:
            def forward(signum: int, _frame: Any) -> None:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            for s in forwarded:
                _signal.signal(s, forward)
        try:
            self.start(cid)
        except BaseException:
            self.delete(cid, force=True)
            raise
        if detach:
            return 0
        code = _wait_child(pid, (st.get("sidecar") or {}).get("pid"))
        for s in forwarded:
            _signal.signal(s, _signal.SIG_DFL)
        sdir = self.root.dir(cid)
        try:
            full = read_state(sdir, cid) if not keep else {}
        except GvmrtError:
            full = {}
        if full.get("workspaces"):
            # Changes held for review outlive `run`: the container stays until they are committed
            # or dropped (gvmrt diff / commit / delete --discard-changes).
            from gvmrt.review import workspaces
            held = sum(1 for ws in workspaces(full, self.root.data_dir(cid))
                       for _c, action, _g in ws.changes() if action == "review")
            if held:
                keep = True
                self.notify(f"container {cid!r} kept: {held} change(s) in its workspaces wait for review "
                            f"(gvmrt diff {cid}; gvmrt commit {cid} --all; gvmrt delete --discard-changes {cid})")
        if keep:
            try:
                st_full = read_state(sdir, cid)
                st_full["exit_status"] = code
                write_json_atomic(os.path.join(sdir, "state.json"), st_full)
            except GvmrtError:
                pass
        else:
            self.delete(cid, force=True)
        return code


# --- helpers --------------------------------------------------------------------------------

def _owner(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _connect_console(path: str) -> Any:
    """Connect to the caller's --console-socket here, on the host: the init cannot reach its path."""
    import _socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--console-socket {path}: {exc.strerror}") from None
    return sock


def _write_pid_file(path: str, pid: int) -> None:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise HostError(f"--pid-file {path}: {exc.strerror}") from exc


def secrets_file() -> str:
    """Where a user keeps the secrets of credentials: 0600, outside every bundle."""
    if os.environ.get("GVMRT_SECRETS"):
        return os.environ["GVMRT_SECRETS"]
    from gvmrt.hostconf import config_dir
    return os.path.join(config_dir(), "secrets.json")


def secret_env(name: str) -> str:
    return "GVMRT_SECRET_" + "".join(c if c.isalnum() else "_" for c in name.upper())


def _secrets(credentials: list[dict[str, Any]], cfg_path: str) -> dict[str, str]:
    """The value of each declared credential: GVMRT_SECRET_<NAME> in our environment, else the
    secrets file (a JSON object, 0600 and ours). Taken out of our environment once read, so no
    helper we spawn (newuidmap) inherits it."""
    from gvmrt.errors import ConfigError
    out: dict[str, str] = {}
    table: dict[str, Any] | None = None
    path = secrets_file()
    for i, cred in enumerate(credentials):
        name = cred["name"]
        env = secret_env(name)
        if env in os.environ:
            out[name] = os.environ.pop(env)
            continue
        if table is None:
            table = _read_secrets(path)
        value = table.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(cfg_path, f"/gvm/credentials/{i}/name",
                              f"no secret for credential {name!r}: set {env} in gvmrt's environment, or add "
                              f"\"{name}\": \"...\" to {path} (mode 0600)")
        out[name] = value
    for name, value in out.items():
        # An HTTP field value: visible ASCII, space and tab (RFC 9110 §5.5). Checked here, where
        # the user can be told, not in the sidecar after create has said yes.
        if not all(" " <= c <= "~" or c == "\t" for c in value):
            raise ConfigError(cfg_path, "/gvm/credentials", f"the secret of credential {name!r} has characters "
                                                            "a header cannot carry (only visible ASCII, space, tab)")
    return out


def _read_secrets(path: str) -> dict[str, Any]:
    from gvmrt.hostconf import read_private_json
    table = read_private_json(path, "secrets file", lambda st: (
        f"must be yours and mode 0600 (it is {st.st_mode & 0o777:o}, uid {st.st_uid}); fix with chmod 600"
        if st.st_uid != os.getuid() or st.st_mode & 0o077 else None))
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise HostError(f"secrets file {path}: must be a JSON object of name: secret")
    return table


def _private_dirs(path: str) -> None:
    """makedirs with every directory it creates 0700 (not the umask's 0755): audit logs are the
    owner's alone."""
    old = os.umask(0o077)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    finally:
        os.umask(old)


def _layer_dirs(layers: list[str], cfg_path: str) -> list[str]:
    """The store's directories of root.layers, top first (OverlayFS lists lowerdirs top down)."""
    if not layers:
        return []
    from gvmrt.errors import ConfigError
    from gvmrt.layers import Store
    store = Store()
    out = []
    for i, digest in enumerate(layers):
        if not store.has(digest):
            raise ConfigError(cfg_path, f"/root/layers/{i}", f"layer {digest} is not in the local layer store "
                                                             f"({store.dir}): `gvmrt layer add DIR`, or `gvmrt "
                                                             "unpack` a bundle that carries it")
        out.append(store.path(digest))
    return out[::-1]


def monitor_alive(side: dict[str, Any]) -> bool:
    """Whether a container's monitor process (from its state's "sidecar") still runs."""
    return bool(side.get("pid")) and _alive({"pid": side.get("pid"), "pid_start": side.get("pid_start")})


def _record_start(sdir: str, cid: str) -> None:
    """Tell the monitor the container starts. Not waited for: the monitor serves the agent's
    listeners only once it has recorded this (gvmrt.monitor), so the record precedes every request
    of the agent either way. A monitor that cannot be reached would not govern it: refused."""
    import _socket  # not gvmrt.control: `socket` and `json` cost start ~10 ms
    fd = os.open(sdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5)
        sock.connect(f"/proc/self/fd/{fd}/control.sock")     # gvmrt.control's path, kept short
        sock.sendall(b'{"op": "lifecycle", "event": "started"}\n')
    except OSError as exc:
        raise StateError(f"cannot start container {cid!r}: its sidecar is not there to record the start "
                         f"({exc.strerror or exc}); it stays created: see `gvmrt state`, then delete it") from None
    finally:
        sock.close()
        os.close(fd)


def _set_aside(audit: str) -> None:
    """An earlier container of this id left its log: keep it (and its rotated segments), under the
    time of its last change, so this container's log holds only this container's records."""
    try:
        mtime = os.stat(audit).st_mtime
    except FileNotFoundError:
        return
    from gvmrt.audit.read import segments
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(mtime))
    base = audit[:-len(".jsonl")]
    n = 0
    while True:
        dest = f"{base}.{stamp}{f'.{n}' if n else ''}.jsonl"
        if not os.path.exists(dest):
            parts = segments(audit)
            for part in parts[1:]:
                os.rename(part, dest + part[len(audit):])
            os.rename(audit, dest)
            return
        n += 1


def _audit_settings(audit: dict[str, Any], bundle: str, cfg_path: str) -> tuple[str | None, int | None]:
    """(the private key that signs the log or None, the rotation size) for a governed container."""
    from gvmrt.errors import ConfigError
    from gvmrt.hostconf import load, signing_key
    host = load()
    key = signing_key(audit.get("key"), bundle, host)
    if key is not None and not os.path.isfile(key):
        where = "/gvm/audit/key" if audit.get("key") else None
        msg = f"audit signing key {key}: no such file (`gvmrt audit keygen -o {key}` makes one)"
        if where:
            raise ConfigError(cfg_path, where, msg)
        raise HostError(msg)
    if key is None and audit.get("require_signed"):
        raise ConfigError(cfg_path, "/gvm/audit/require_signed",
                          "no audit signing key: run `gvmrt audit keygen`, or name one in gvm.audit.key")
    return key, (host.get("audit") or {}).get("max_segment_bytes")


def _recv_sidecar(mon: Any) -> dict[str, Any]:
    from gvmrt.linux import process
    try:
        msg = process.recv(mon, timeout=30, what="the sidecar")
    except EOFError:
        raise GvmrtError("the sidecar exited during setup; see sidecar.log in the container's state dir") from None
    except process.ChildError as exc:
        raise GvmrtError(str(exc)) from None
    if "error" in msg:
        raise GvmrtError(msg["error"])
    return msg


def _wait_fifo(fd: int, pid: int, cid: str) -> None:
    """Wait until the init has written its byte into the exec FIFO, or died."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise StateError(f"cannot start container {cid!r}: its init process has exited") from None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + 30
        while True:
            try:
                if os.read(fd, 1):
                    return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise GvmrtError(f"container {cid!r} did not start within 30 s")
            events = dict(poller.poll(left * 1000))
            if pidfd in events and fd not in events:
                raise StateError(f"cannot start container {cid!r}: its init process has exited")
    finally:
        os.close(pidfd)


def _send_signal(pid: int, sig: int, start: int | None) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return
        raise
    try:
        # The pidfd pins the process; check it is still ours (not a recycled pid) before signalling.
        if start is not None:
            now = _starttime(pid)
            if now is None or now[0] != start:
                return
        try:
            _signal.pidfd_send_signal(pidfd, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise GvmrtError(f"signal {sig} to pid {pid}: {exc.strerror}") from exc
    finally:
        os.close(pidfd)


def _container_pids(init_pid: int) -> list[int]:
    """Every process in the init's pid namespace (for kill --all), init last."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return [init_pid]
    if target == os.readlink("/proc/self/ns/pid"):
        # Without its own pid namespace (and without a delegated cgroup) the container's processes
        # cannot be told from the host's: signalling "all" would hit everything we may signal.
        raise UsageError("kill --all needs a container with its own pid namespace "
                         "(add {\"type\": \"pid\"} to linux.namespaces); signal the init without --all")
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != init_pid:
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == target:
                    pids.append(int(name))
            except OSError:
                continue
    return pids + [init_pid]


def _wait_gone(st: dict[str, Any], cid: str, timeout: float = 10) -> None:
    """Wait until the init has exited (a pidfd polls readable then, zombie or not: pidfd_open(2))."""
    try:
        pidfd = os.pidfd_open(st["pid"])
    except OSError:
        return
    try:
        if _alive(st) and not select.select([pidfd], [], [], timeout)[0]:
            raise GvmrtError(f"container {cid!r}: init pid {st['pid']} still alive {timeout:.0f} s after SIGKILL")
    finally:
        os.close(pidfd)


def _stop_sidecar(side: dict[str, Any], cid: str) -> None:
    """Stop the monitor once the container is gone: SIGTERM (it closes its listeners and log;
    every record is already written, each before its answer), then SIGKILL if it lingers. Not
    waiting for it to notice the init's exit by itself: it may still be starting up."""
    st = {"pid": side.get("pid"), "pid_start": side.get("pid_start")}
    if st["pid"] and _alive(st):
        _send_signal(st["pid"], _signal.SIGTERM, st["pid_start"])
        try:
            _wait_gone(st, cid, timeout=3)
        except GvmrtError:
            _send_signal(st["pid"], _signal.SIGKILL, st["pid_start"])
            _wait_gone(st, cid)
    _reap(st["pid"])


def _reap(pid: int | None) -> None:
    """Collect the monitor if it is our child (`gvmrt run` forked it), so no zombie outlives us."""
    if pid:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _wait_child(pid: int, monitor: int | None = None) -> int:
    """Reap children until `pid` is among them; its exit status. A governed container's init is
    left a zombie until its monitor (our child too) has read its status for the audit log and
    exited, or for 3 s: a monitor cannot wait for a process that is not its child."""
    while True:
        if monitor:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except InterruptedError:
                continue
            except ChildProcessError:
                return 255
            if info is not None and info.si_pid == pid:
                _wait_exit(monitor, 3.0)
                monitor = None
        try:
            wpid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 255
        if wpid == monitor:
            monitor = None
        if wpid == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait up to `timeout` for our child `pid` to exit (not reaping it)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


def _host_id(maps: list[list[int]], cid: int, default: int) -> int:
    for c, h, size in maps:
        if c <= cid < c + size:
            return h + cid - c
    return default


def _workspaces(gvm: dict[str, Any] | None, bundle: str, cfg_path: str) -> list[dict[str, Any]]:
    """The host directories gvm.filesystem.workspaces names, checked (absolute, existing)."""
    out: list[dict[str, Any]] = []
    for i, w in enumerate(((gvm or {}).get("filesystem") or {}).get("workspaces") or ()):
        src = os.path.realpath(os.path.join(bundle, os.path.expanduser(w["source"])))
        if not os.path.isdir(src):
            from gvmrt.errors import ConfigError
            raise ConfigError(cfg_path, f"/gvm/filesystem/workspaces/{i}/source", f"{src} is not a directory")
        out.append({"source": src, "destination": w["destination"]})
    return out


def _make_workspace_dirs(data: str, i: int, ws: dict[str, Any], uid_maps: list[list[int]],
                         gid_maps: list[list[int]]) -> None:
    """A workspace's upper and work dirs (owned like the root's upper) and its baseline: the host
    directory's state now, which `gvmrt commit` checks for conflicts."""
    from gvmrt.workspace import baseline, save_baseline
    wdir = os.path.join(data, "workspaces", str(i))
    os.makedirs(wdir, mode=0o700)
    owner = (_host_id(uid_maps, 0, os.getuid()), _host_id(gid_maps, 0, os.getgid()))
    ws["upper"], ws["work"] = os.path.join(wdir, "upper"), os.path.join(wdir, "work")
    for path in (ws["upper"], ws["work"]):
        os.mkdir(path, 0o700)
    os.chmod(ws["upper"], os.stat(ws["source"]).st_mode & 0o7777)
    save_baseline(os.path.join(wdir, "baseline.json"), baseline(ws["source"]))
    if os.getuid() == 0 and owner != (0, 0):
        for path in (os.path.join(data, "workspaces"), wdir, ws["upper"], ws["work"]):
            os.chown(path, *owner)


def _make_data_dirs(data: str, rootfs: str, uid_maps: list[list[int]], gid_maps: list[list[int]]) -> None:
    """upper/work/merged on disk. The data dir itself stays 0700 (the agent's writes are private);
    the upper dir is the overlay's root inode, so it gets the lower root's mode, and it must belong to
    whoever is root in the jail (a host root mapped to e.g. 200000 is not root over host-root files)."""
    os.makedirs(data, mode=0o700, exist_ok=True)
    mode = os.stat(rootfs).st_mode & 0o7777
    owner = (_host_id(uid_maps, 0, os.getuid()), _host_id(gid_maps, 0, os.getgid()))
    for sub in ("upper", "work", "merged"):
        path = os.path.join(data, sub)
        os.makedirs(path, mode=0o700, exist_ok=True)
        if sub == "upper":
            os.chmod(path, mode)
        if os.getuid() == 0 and owner != (0, 0):
            os.chown(path, *owner)
    if os.getuid() == 0 and owner != (0, 0):
        os.chown(data, *owner)


def _remove_container(sdir: str, data: str | None, uid_maps: list[list[int]], gid_maps: list[list[int]]) -> None:
    from gvmrt.linux.cleanup import remove_tree
    if data is not None:
        if os.path.isdir(data):
            remove_tree(data, uid_maps, gid_maps)
        try:
            os.rmdir(os.path.dirname(data))  # the per-root dir, when it became empty
        except OSError:
            pass
    remove_tree(sdir, [], [])
