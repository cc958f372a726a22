"""fork/unshare/exec of the container init, and the small typed messages between the processes.

Process shape (DESIGN.md §3, runc's nsexec): `gvmrt create` forks an intermediate child, which
joins/creates the namespaces (user first), waits for its id maps to be written from outside, and
forks the container init (pid 1 of the new pid namespace), then exits. The init is thus an
orphan when `create` returns: the kernel hands it to the nearest child subreaper among its
ancestors (conmon, containerd-shim, `gvmrt run`), exactly as with runc.

The init sets up the jail, says "ready", waits for the parent's "ack" (state.json is written),
then blocks opening the exec FIFO until `gvmrt start` opens the other end; then drops privileges,
loads seccomp and execs. Until "ack" every wait is a read on the sync socket, so if `create` dies
half-way the init sees EOF and exits: nothing is left running.
"""

from __future__ import annotations

import _signal  # C modules: `signal` and `socket` import enum (~4 and ~7 ms)
import _socket
import _struct
import os
import stat

from gvmrt import _json
from gvmrt.linux import rootfs
from gvmrt.linux import sys as lsys

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any


class ChildError(Exception):
    """The container init reported a failure (message is already one line for the user)."""


def sync_pair() -> tuple[Any, Any]:
    # SOCK_SEQPACKET keeps message boundaries, so each send() is one whole JSON message.
    parent, child = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    return parent, child


def send(sock: Any, fds: list[int] | None = None, **msg: Any) -> None:
    """One JSON message; `fds` travel with it as SCM_RIGHTS (the receiver finds them in msg["fds"])."""
    data = _json.dumps(msg).encode()
    if fds:
        # struct, not array: array imports collections.abc, which is gone once the init has pivoted
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.send(data)


MAX_FDS = 64


def recv(sock: Any, timeout: float | None = None, what: str = "the container init") -> dict[str, Any]:
    sock.settimeout(timeout)
    try:
        data, anc, flags, _ = sock.recvmsg(65536, _socket.CMSG_SPACE(4 * MAX_FDS), _socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise ChildError(f"{what} did not answer within {timeout:.0f} s") from None
    fds = []
    for level, kind, payload in anc:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(_struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
    if flags & _socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ChildError(f"{what} sent more file descriptors than expected")
    if not data:
        for fd in fds:
            os.close(fd)
        raise EOFError
    msg = _json.loads(data)
    if fds:
        msg["fds"] = fds
    return msg


def _run_helper(argv: list[str]) -> tuple[int, str]:
    """Run a setuid helper and return (exit status, stderr). posix_spawn, not subprocess, which
    imports selectors, locale and re (~6 ms) for a call most containers never make."""
    r, w = os.pipe()
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, w, 2), (os.POSIX_SPAWN_CLOSE, r)])
    finally:
        os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


# --- id maps ---------------------------------------------------------------------------------

def _ranges(mappings: list[list[int]]) -> str:
    return "".join(f"{c} {h} {s}\n" for c, h, s in mappings)


def write_id_maps(pid: int, uid_maps: list[list[int]], gid_maps: list[list[int]], deny_setgroups: bool) -> None:
    """Write /proc/PID/{uid,gid}_map from outside the new user namespace.

    An unprivileged user may map only its own ids, once, and only after writing "deny" to
    setgroups (user_namespaces(7)); wider maps from /etc/subuid go through the setuid helpers
    newuidmap/newgidmap (shadow-utils), as podman does.
    """
    for kind, maps in (("uid", uid_maps), ("gid", gid_maps)):
        own = os.getuid() if kind == "uid" else os.getgid()
        simple = os.getuid() == 0 or (len(maps) == 1 and maps[0][1] == own and maps[0][2] == 1)
        if simple:
            if kind == "gid" and deny_setgroups:
                with open(f"/proc/{pid}/setgroups", "w") as f:
                    f.write("deny")
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write(_ranges(maps))
            continue
        tool = f"new{kind}map"
        argv = [tool, str(pid)] + [str(x) for m in maps for x in m]
        try:
            code, err = _run_helper(argv)
        except FileNotFoundError:
            raise ChildError(f"{kind} mappings beyond your own id need {tool} (apt-get install uidmap)") from None
        if code:
            msg = (err.strip().splitlines() or ["failed"])[-1]
            raise ChildError(f"{tool} {' '.join(argv[2:])}: {msg} (check /etc/sub{kind} for user "
                             f"{os.getuid() if kind == 'uid' else os.getgid()})")


# --- the intermediate child and the init ----------------------------------------------------------

def spawn(ctx: dict[str, Any], plan: dict[str, Any], child_sock: Any, parent_sock: Any) -> int:
    """Fork the intermediate child; return its pid. The child never returns."""
    pid = os.fork()
    if pid:
        return pid
    # Child: from here on only os._exit, never return into the caller's stack.
    code = 1
    try:
        parent_sock.close()
        # Keep only stdio, the fds the caller asked to pass (--preserve-fds) and our sync socket:
        # anything else inherited (e.g. the container's flock'd lock file) must not live on in
        # the jail, where it would block `gvmrt start` or leak host files into the container.
        _close_fds_except(3 + ctx["preserve_fds"], {child_sock.fileno(), ctx["fifo_fd"], ctx["console_fd"]})
        code = _intermediate(ctx, plan, child_sock)
    except BaseException as exc:  # noqa: BLE001 - anything must be reported, not raised
        _report(child_sock, exc)
    finally:
        os._exit(code)


def _close_fds_except(first: int, keep: set[int]) -> None:
    for fd in sorted(k for k in keep if k >= first):
        if fd > first:
            lsys.close_range(first, fd - 1)
        first = fd + 1
    lsys.close_range(first)


def _report(sock: Any, exc: BaseException) -> None:
    msg = str(exc) if isinstance(exc, (ChildError, rootfs.RootfsError)) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.filename and not isinstance(exc, rootfs.RootfsError):
        msg = f"{exc.strerror}: {exc.filename}"
    try:
        send(sock, error=msg)
    except OSError:
        pass


def _intermediate(ctx: dict[str, Any], plan: dict[str, Any], sock: Any) -> int:
    # Join the namespaces the config names by path; the user namespace first, because it owns
    # the others (setns(2): joining them needs CAP_SYS_ADMIN in their owning user namespace).
    flags = 0
    join: list[tuple[str, str]] = []
    for ns_type, path in plan["namespaces"]:
        if path:
            join.append((ns_type, path))
        else:
            flags |= ctx["ns_flags"][ns_type]
    join.sort(key=lambda j: j[0] != "user")
    for ns_type, path in join:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ChildError(f"linux.namespaces: {ns_type} path {path}: {exc.strerror}") from exc
        try:
            lsys.setns(fd, ctx["ns_flags"][ns_type])
        except OSError as exc:
            raise ChildError(f"linux.namespaces: join {ns_type} namespace {path}: {exc.strerror}") from exc
        os.close(fd)
    try:
        lsys.unshare(flags)
    except OSError as exc:
        raise ChildError(_unshare_hint(exc)) from exc
    send(sock, unshared=True)
    if ctx["new_userns"]:
        if recv(sock).get("mapped") is not True:
            return 1
    init = os.fork()
    if init == 0:
        code = 1
        try:
            _init(ctx, plan, sock)
        except BaseException as exc:  # noqa: BLE001
            _report(sock, exc)
        finally:
            os._exit(code)
    send(sock, init=init)
    return 0


def _unshare_hint(exc: OSError) -> str:
    import errno
    if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EINVAL):
        try:
            with open("/proc/sys/user/max_user_namespaces") as f:
                if int(f.read()) == 0:
                    return "cannot create a user namespace: sysctl user.max_user_namespaces is 0 (raise it)"
        except OSError:
            pass
        try:
            with open("/proc/sys/kernel/unprivileged_userns_clone") as f:
                if f.read().strip() == "0":
                    return "cannot create a user namespace: sysctl kernel.unprivileged_userns_clone is 0 (set it to 1)"
        except OSError:
            pass
    return f"cannot create the container's namespaces: unshare: {exc.strerror}"


def _init(ctx: dict[str, Any], plan: dict[str, Any], sock: Any) -> None:
    """pid 1 of the container: build the jail, wait for start, exec."""
    proc = plan["process"]
    # Not dumpable until exec (which resets it): nobody may ptrace or read /proc/PID/mem of an init
    # that still holds all capabilities in the namespace and no seccomp filter.
    lsys.prctl(lsys.PR_SET_DUMPABLE, 0)
    if ctx["new_userns"]:
        # Become the mapped root: a host root mapped to e.g. 100000 is "nobody" until it does.
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    os.chdir(ctx["bundle"])  # relative bind sources are relative to the bundle (config.md "mounts")
    if plan["hostname"] is not None:
        lsys.sethostname(plan["hostname"])
    if plan["domainname"]:
        with open("/proc/sys/kernel/domainname", "w") as f:
            f.write(plan["domainname"])
    gid_mapped = _mapped(ctx["gid_mappings"]) if ctx["new_userns"] else (lambda gid: True)
    if ctx.get("gvm"):
        _install_ca(ctx, sock)
    rootfs.setup(plan, ctx["lowers"], ctx["upper"], ctx["work"], ctx["merged"], ctx["new_userns"], gid_mapped,
                 ctx.get("workspaces") or [])
    if ctx["new_netns"]:
        lsys.loopback_up()
    listening = _sidecar_side(ctx) if ctx.get("gvm") else []
    # The parent opened the FIFO O_PATH (runc's _LIBCONTAINER_FIFOFD): a jail root mapped to another
    # host id could not even look up the 0700 state dir. The fd survives pivot_root.
    fifo = ctx["fifo_fd"]
    rootfs.pivot(ctx["merged"], plan["root_readonly"])
    # Everything below reads /proc (the exec FIFO reopen, the console): it must be the kernel's.
    try:
        is_proc = lsys.fs_type("/proc") == lsys.PROC_SUPER_MAGIC
    except OSError:
        is_proc = False
    if not is_proc:
        raise ChildError("mounts: /proc in the container is not a procfs; mount proc on /proc "
                         "({\"destination\": \"/proc\", \"type\": \"proc\", \"source\": \"proc\"})")
    tty = _setup_console(ctx["console_fd"], proc["console_size"]) if ctx["console_fd"] >= 0 else -1

    if proc["oom_score_adj"] is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(proc["oom_score_adj"]))
    import resource
    for res, name, soft, hard in proc["rlimits"]:
        try:
            resource.setrlimit(res, (soft, hard))
        except (OSError, ValueError) as exc:
            raise ChildError(f"process.rlimits {name} soft={soft} hard={hard}: {exc}") from exc

    env = dict(e.split("=", 1) for e in proc["env"])
    path = _lookup(proc["args"][0], env)
    try:
        os.chdir(proc["cwd"])
    except OSError as exc:
        raise ChildError(f"process.cwd {proc['cwd']}: {exc.strerror} in the container") from exc
    if proc["groups"] and ctx["setgroups_denied"]:
        raise ChildError("process.user.additionalGids need a gid mapping with more than your own gid "
                         "(setgroups is denied in a user namespace that maps one gid)")
    bpf = _b64(plan["seccomp"]) if plan["seccomp"] else None

    if listening:
        # The listeners go to `create`, which hands them to the monitor; the jail keeps no copy,
        # so when the monitor dies its ports are closed: fail closed (DESIGN.md §3).
        send(sock, fds=[s.fileno() for _, _, s in listening], ready=True,
             listeners=[[kind, port] for kind, port, _ in listening])
        for _, _, s in listening:
            s.close()
    else:
        send(sock, ready=True)
    if recv(sock).get("ack") is not True:
        os._exit(1)
    sock.close()

    # Block until `gvmrt start` opens the read end (runc's exec FIFO): open() of a FIFO for
    # writing sleeps until there is a reader (fifo(7)). The O_PATH fd survives pivot_root.
    try:
        wfd = os.open(f"/proc/self/fd/{fifo}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        _die(f"open exec fifo: {exc.strerror} (does the config mount /proc?)")
    os.write(wfd, b"0")
    os.close(wfd)
    os.close(fifo)
    try:
        _finalize(proc, bpf, ctx, tty)
        os.execve(path, proc["args"], env)
    except OSError as exc:
        _die(f"exec {proc['args'][0]}: {exc.strerror}")
    except BaseException as exc:  # noqa: BLE001 - the sync socket is gone: stderr is all we have
        _die(f"{type(exc).__name__}: {exc}")


def _install_ca(ctx: dict[str, Any], sock: Any) -> None:
    """The sidecar's CA (made by the monitor meanwhile) into the overlay's upper dir."""
    ca_pem = recv(sock).get("ca")
    if not ca_pem:
        raise ChildError("gvm: no CA from the sidecar")
    try:
        rootfs.install_ca(ctx["lowers"], ctx["upper"], ca_pem.encode(), ctx["gvm"]["ca_path"])
    except OSError as exc:
        raise ChildError(f"gvm: cannot put the sidecar's CA in the container's trust store: {exc.strerror}"
                         + (f": {exc.filename}" if exc.filename else "")) from exc


def _sidecar_side(ctx: dict[str, Any]) -> list[Any]:
    """The jail's end of the sidecar: local routes for every address, and the listeners."""
    from gvmrt.linux import netns
    gvm = ctx["gvm"]
    try:
        ipv6 = netns.add_local_routes()
        return netns.listeners(gvm["capture"], gvm["proxy_port"], ipv6)
    except OSError as exc:
        raise ChildError(f"gvm: setting up the jail's network for the sidecar: {exc.strerror or exc}") from exc


def _die(msg: str) -> None:
    os.write(2, f"gvmrt: container init: {msg}\n".encode())
    os._exit(127)


def _b64(data: str) -> bytes:
    import binascii  # base64 imports re
    return binascii.a2b_base64(data)


def _mapped(gid_mappings: list[list[int]]) -> Any:
    return lambda gid: any(c <= gid < c + s for c, _, s in gid_mappings)


def _lookup(prog: str, env: dict[str, str]) -> str:
    """execvp's PATH search, done in the container before "ready" so a typo fails `create`."""
    if "/" in prog:
        candidates = [prog]
    else:
        path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        candidates = [os.path.join(d or ".", prog) for d in path.split(":")]
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(c, os.X_OK):
            return c
    raise ChildError(f"process.args[0] {prog!r}: executable file not found in the container"
                     + ("" if "/" in prog else " $PATH"))


# <asm-generic/ioctls.h>
TIOCGPTN, TIOCSPTLCK, TIOCSCTTY, TIOCSWINSZ, TIOCGPTPEER = 0x80045430, 0x40045431, 0x540E, 0x5414, 0x5441


def _setup_console(console_fd: int, size: list[int] | None) -> int:
    """process.terminal: a pty from the jail's own devpts; the master goes to the caller's
    --console-socket in one SCM_RIGHTS message (runc's protocol, what conmon and recvtty read),
    the slave is bound on /dev/console and becomes the process's controlling terminal."""
    import fcntl
    import struct
    try:
        master = os.open("/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ChildError(f"process.terminal: cannot open /dev/pts/ptmx ({exc.strerror}); mount devpts on "
                         "/dev/pts with newinstance") from exc
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    n = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    slave_path = f"/dev/pts/{n}"
    # TIOCGPTPEER opens the peer of *this* master, not whatever a path names (runc CVE-2025-52565).
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if size:
        fcntl.ioctl(slave, TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, console_fd)
    try:
        sock.sendmsg([slave_path.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", master))])
    except OSError as exc:
        raise ChildError(f"--console-socket: sending the pty master: {exc.strerror}") from exc
    finally:
        sock.close()
        os.close(master)
    if os.path.islink("/dev/console"):
        os.unlink("/dev/console")
    if not os.path.exists("/dev/console"):
        os.close(os.open("/dev/console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    lsys.mount(f"/proc/self/fd/{slave}", "/dev/console", None, lsys.MS_BIND)
    return slave


def _finalize(proc: dict[str, Any], bpf: bytes | None, ctx: dict[str, Any], tty: int = -1) -> None:
    """Drop to the configured user and capabilities, then seccomp (runc's finalizeNamespace order)."""
    # Signals ignored by Python (SIGPIPE, SIGXFSZ) stay ignored across execve: restore defaults.
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    nnp = proc["nnp"]
    if bpf and not nnp:
        # Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: do it while we still have it.
        lsys.seccomp_set_filter(bpf)
    caps = proc["caps"]
    if caps is not None:
        for cap in range(ctx["last_cap"] + 1):
            if not caps["bounding"] >> cap & 1:
                try:
                    lsys.prctl(lsys.PR_CAPBSET_DROP, cap)
                except OSError:
                    pass  # unknown to this kernel
    lsys.prctl(lsys.PR_SET_KEEPCAPS, 1)
    if not ctx["setgroups_denied"]:
        os.setgroups(proc["groups"])
    os.setresgid(proc["gid"], proc["gid"], proc["gid"])
    os.setresuid(proc["uid"], proc["uid"], proc["uid"])
    lsys.prctl(lsys.PR_SET_KEEPCAPS, 0)
    if caps is not None:
        lsys.capset(caps["effective"], caps["permitted"], caps["inheritable"])
        lsys.prctl(lsys.PR_CAP_AMBIENT, lsys.PR_CAP_AMBIENT_CLEAR_ALL)
        # The kernel raises an ambient capability only if it is permitted and inheritable
        # (capabilities(7)); gvmrt.plan already warned about the others, which runc skips too.
        ambient = caps["ambient"] & caps["permitted"] & caps["inheritable"]
        for cap in range(ctx["last_cap"] + 1):
            if ambient >> cap & 1:
                lsys.prctl(lsys.PR_CAP_AMBIENT, lsys.PR_CAP_AMBIENT_RAISE, cap)
    os.umask(proc["umask"])
    if nnp:
        lsys.prctl(lsys.PR_SET_NO_NEW_PRIVS, 1)
    # A session of its own, always (runc does too): otherwise the agent shares the caller's
    # session and process group, can signal it (kill 0) and, through the caller's controlling
    # terminal, push keystrokes into the caller's shell with TIOCSTI.
    os.setsid()
    if tty >= 0:
        import fcntl
        fcntl.ioctl(tty, TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(tty, fd)
    lsys.close_range(3 + ctx["preserve_fds"])
    if bpf and nnp:
        # As close to execve as possible, so the profile constrains the agent, not gvmrt's setup.
        lsys.seccomp_set_filter(bpf)
