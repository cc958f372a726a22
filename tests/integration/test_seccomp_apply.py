"""Load compiled programs into the real kernel and watch what system calls do.

Each case forks a child that sets no_new_privs, loads the program exactly as the runtime will
(gvmrt.linux.sys.seccomp_set_filter), tries one thing and reports the outcome through a pipe.
The child always leaves with os._exit, so it never runs pytest's teardown.  A control case runs
the same thing without a filter, so a denial is known to come from the filter.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gvmrt.linux import sys as lsys
from gvmrt.linux.seccomp import compile_profile, default_profile


def _seccomp_filter_available() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    return "Seccomp:" in status


pytestmark = pytest.mark.skipif(not _seccomp_filter_available(),
                                reason="kernel without CONFIG_SECCOMP_FILTER (no Seccomp: in /proc/self/status)")

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
CLONE_NEWUSER = 0x10000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.personality.argtypes = [ctypes.c_ulong]
SYS_SOCKET = {"x86_64": 41, "aarch64": 198}[os.uname().machine]
SYS_CLONE3 = 435


def in_child(bpf: bytes | None, action: Callable[[], Any],
             setup: Callable[[], Any] | None = None) -> tuple[str, Any]:
    """Run ``action`` in a forked child under ``bpf`` (after ``setup``, which runs unfiltered).

    Returns ("ok", value), ("errno", n) when it raised OSError, or ("signal", n) when the
    child was killed.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and _exit, whatever happens
        code = 0
        try:
            os.close(r)
            # SIGSYS dumps core by default; a test that expects it must not litter a core file.
            lsys.prctl(PR_SET_DUMPABLE, 0)
            if setup is not None:
                setup()
            lsys.prctl(lsys.PR_SET_NO_NEW_PRIVS, 1)
            if bpf is not None:
                lsys.seccomp_set_filter(bpf)
            try:
                result: tuple[str, Any] = ("ok", action())
            except OSError as exc:
                result = ("errno", exc.errno)
            os.write(w, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001 - anything else is a test bug; show it
            code = 70
            try:
                os.write(w, json.dumps(["crash", traceback.format_exc()]).encode())
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)

    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    outcome = json.loads(b"".join(chunks) or b'["crash", "child wrote nothing"]')
    if outcome[0] == "crash":
        pytest.fail(f"child failed:\n{outcome[1]}")
    return outcome[0], outcome[1]


@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return compile_profile(default_profile())


def deny(names: list[str], **rule: Any) -> bytes:
    return compile_profile({"defaultAction": "SCMP_ACT_ALLOW",
                            "syscalls": [{"names": names, "action": "SCMP_ACT_ERRNO", **rule}]})


def require_control(action: Callable[[], Any], why: str, setup: Callable[[], Any] | None = None) -> None:
    outcome = in_child(None, action, setup)
    if outcome[0] != "ok":
        pytest.skip(f"{why} fails even without a filter here ({outcome}), so the test would prove nothing")


# --- the mechanics, with small custom profiles ---

def test_errno_ret_is_what_the_caller_sees(tmp_path: Path) -> None:
    target = tmp_path / "d"
    bpf = deny(["mkdir", "mkdirat"], errnoRet=13)
    assert in_child(bpf, lambda: os.mkdir(target)) == ("errno", 13)  # EACCES
    assert not target.exists()
    # Only the listed calls are affected.
    assert in_child(bpf, lambda: (tmp_path / "f").write_text("x")) == ("ok", 1)


def test_argument_comparator_denies_only_the_matching_call() -> None:
    bpf = deny(["personality"], args=[{"index": 0, "value": 0xFFFFFFFF, "op": "SCMP_CMP_EQ"}])

    def personality(persona: int) -> int:
        ret = _libc.personality(persona)
        if ret == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret

    assert in_child(bpf, lambda: personality(0xFFFFFFFF)) == ("errno", 1)  # the query is denied
    assert in_child(bpf, lambda: personality(0))[0] == "ok"  # PER_LINUX, a different argument


def test_kill_process_kills_with_sigsys() -> None:
    bpf = compile_profile({"defaultAction": "SCMP_ACT_ALLOW",
                           "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"}]})
    assert in_child(bpf, os.getppid) == ("signal", signal.SIGSYS)
    assert in_child(bpf, os.getpid)[0] == "ok"


def test_default_errno_applies_to_unlisted_calls() -> None:
    # An allowlist profile is the common Docker shape; allow only what the child needs to report.
    needed = ["write", "exit_group", "exit", "rt_sigprocmask", "rt_sigaction", "munmap", "brk",
              "mmap", "madvise", "futex", "close", "getpid", "gettid", "sigaltstack"]
    bpf = compile_profile({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                           "syscalls": [{"names": needed, "action": "SCMP_ACT_ALLOW"}]})
    assert in_child(bpf, lambda: os.getcwd()) == ("errno", 38)


# --- the default profile against the real kernel ---

def test_default_profile_denies_new_user_namespaces(default_bpf: bytes) -> None:
    require_control(lambda: lsys.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    assert in_child(default_bpf, lambda: lsys.unshare(CLONE_NEWUSER)) == ("errno", 1)


def test_default_profile_denies_mount(default_bpf: bytes) -> None:
    # Without the filter this fails with ENOENT (no such mount point), so nothing is mounted.
    def try_mount() -> None:
        lsys.mount("none", "/nonexistent-gvmrt-test", "tmpfs")
    assert in_child(None, try_mount) == ("errno", 2)
    assert in_child(default_bpf, try_mount) == ("errno", 1)


def own_network() -> None:
    # A user namespace owning a new network namespace grants CAP_NET_RAW there, so the raw and
    # packet socket controls succeed without host root and touch no host interface.
    lsys.unshare(CLONE_NEWUSER | lsys.CLONE_NEWNET)


def test_default_profile_denies_raw_sockets(default_bpf: bytes) -> None:
    def raw(family: int, proto: int) -> Callable[[], None]:
        return lambda: socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto).close()
    v4, v6 = raw(socket.AF_INET, socket.IPPROTO_ICMP), raw(socket.AF_INET6, socket.IPPROTO_ICMPV6)
    require_control(v4, "socket(AF_INET, SOCK_RAW) in a new user+net namespace", own_network)
    assert in_child(default_bpf, v4, own_network) == ("errno", 1)
    assert in_child(default_bpf, v6, own_network) == ("errno", 1)


def test_default_profile_denies_packet_sockets_even_with_high_bits(default_bpf: bytes) -> None:
    def packet(family: int) -> Callable[[], None]:
        def run() -> None:
            # Straight to the system call: socket(2) takes an int, so the kernel ignores bit 32,
            # but seccomp sees the whole register.
            fd = _libc.syscall(ctypes.c_long(SYS_SOCKET), ctypes.c_long(family),
                               ctypes.c_long(socket.SOCK_RAW), ctypes.c_long(0))
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            os.close(fd)
        return run
    # The control also shows the kernel really ignores bit 32.
    require_control(packet(socket.AF_PACKET | 1 << 32), "socket(AF_PACKET) in a new user+net namespace",
                    own_network)
    assert in_child(default_bpf, packet(socket.AF_PACKET), own_network) == ("errno", 1)
    assert in_child(default_bpf, packet(socket.AF_PACKET | 1 << 32), own_network) == ("errno", 1)


def test_default_profile_allows_ordinary_sockets(default_bpf: bytes) -> None:
    def tcp() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.bind(("127.0.0.1", 0))
            return "bound"
    assert in_child(default_bpf, tcp) == ("ok", "bound")


def test_default_profile_sends_clone3_to_enosys_and_libc_falls_back(default_bpf: bytes) -> None:
    def clone3() -> None:
        # clone3(NULL, 0): without the filter the kernel answers EINVAL (size too small).
        if _libc.syscall(ctypes.c_long(SYS_CLONE3), None, ctypes.c_long(0)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    assert in_child(default_bpf, clone3) == ("errno", 38)

    def spawn_and_thread() -> list[int]:
        # glibc's posix_spawn and pthread_create try clone3 first and retry with clone on ENOSYS.
        pid = os.posix_spawn("/bin/true", ["true"], {})
        _, status = os.waitpid(pid, 0)
        seen = []
        t = threading.Thread(target=lambda: seen.append(1))
        t.start()
        t.join()
        return [os.waitstatus_to_exitcode(status), len(seen)]

    assert in_child(default_bpf, spawn_and_thread) == ("ok", [0, 1])


def test_default_profile_allows_ordinary_files(default_bpf: bytes, tmp_path: Path) -> None:
    def work() -> str:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_text("hello")
        return (tmp_path / "d" / "f").read_text()
    assert in_child(default_bpf, work) == ("ok", "hello")
