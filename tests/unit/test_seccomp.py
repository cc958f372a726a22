"""Unit tests for gvmrt.linux.seccomp: profile checks, and the compiled program's decisions.

No kernel filter is loaded here.  To check what the program decides (including for i386 and
x32 callers, which a test cannot easily produce for real), a tiny classic-BPF interpreter runs
it over a struct seccomp_data built in Python.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys

import pytest

from gvmrt.errors import ConfigError
from gvmrt.linux.seccomp import compile_profile, default_profile

MACHINE = os.uname().machine
x86_64_only = pytest.mark.skipif(MACHINE != "x86_64", reason="needs x86_64 system call numbers")

# SECCOMP_RET_* (<linux/seccomp.h>)
RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ALLOW = 0x7FFF0000
RET_LOG = 0x7FFC0000


def RET_ERRNO(n: int) -> int:
    return 0x00050000 | n


def RET_TRACE(n: int) -> int:
    return 0x7FF00000 | n


# AUDIT_ARCH_* (<linux/audit.h>); x32 shares x86_64's token and sets bit 30 of the number.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
X32_SYSCALL_BIT = 0x40000000
NATIVE_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}[MACHINE]

# Numbers the tests use directly.  x86_64: arch/x86/entry/syscalls/syscall_64.tbl;
# i386: syscall_32.tbl; aarch64: include/uapi/asm-generic/unistd.h.
NR = {
    "x86_64": {"mount": 165, "getpid": 39, "unshare": 272, "clone": 56, "clone3": 435, "socket": 41,
               "personality": 135, "mkdirat": 258, "io_uring_setup": 425},
    "aarch64": {"mount": 40, "getpid": 172, "unshare": 97, "clone": 220, "clone3": 435, "socket": 198,
                "personality": 92, "mkdirat": 34, "io_uring_setup": 425},
}[MACHINE]
I386_NR = {"mount": 21, "getpid": 20, "socketcall": 102, "socket": 359, "umount": 22}

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
SIGCHLD = 17
AF_UNIX, AF_INET, AF_INET6, AF_PACKET = 1, 2, 10, 17
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET = 1, 2, 3, 10
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
SYS_SOCKET, SYS_CONNECT = 1, 3  # socketcall(2) call numbers


# --- a classic-BPF interpreter for the instructions libseccomp emits ---

def run_bpf(program: bytes, nr: int, arch: int = NATIVE_ARCH, args: tuple[int, ...] = ()) -> int:
    """Return the SECCOMP_RET_* value ``program`` gives for one system call."""
    args = tuple(args) + (0,) * (6 - len(args))
    # struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
    data = struct.pack("=iIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack_from("=HBBI", program, off) for off in range(0, len(program), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns)):  # classic BPF only jumps forward, so this bounds the run
        code, jt, jf, k = insns[pc]
        if code == 0x20:            # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x54:          # BPF_ALU | BPF_AND | BPF_K
            acc &= k
            pc += 1
        elif code == 0x05:          # BPF_JMP | BPF_JA
            pc += 1 + k
        elif code in (0x15, 0x25, 0x35, 0x45):  # BPF_JMP | JEQ/JGT/JGE/JSET | BPF_K
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:          # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"instruction {pc}: opcode {code:#x} not interpreted by this test")
    raise AssertionError("program ran off its end")


def profile(*syscalls: dict, default: str = "SCMP_ACT_ALLOW", **extra: object) -> dict:
    return {"defaultAction": default, "syscalls": list(syscalls), **extra}


def errors_of(prof: object, **kwargs: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compile_profile(prof, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message, "a user error must be one line"
    return info.value


# --- the default profile ---

@pytest.fixture(scope="module")
def default_bpf() -> bytes:
    return compile_profile(default_profile())


def test_default_profile_compiles_to_whole_instructions(default_bpf: bytes) -> None:
    assert default_bpf
    assert len(default_bpf) % 8 == 0
    assert len(default_bpf) // 8 <= 4096


def test_default_profile_is_plain_oci_json() -> None:
    prof = default_profile()
    assert prof["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "defaultErrnoRet" not in prof  # the spec forbids an errno with SCMP_ACT_ALLOW
    expected = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}[MACHINE]
    assert prof["architectures"] == expected
    # What `gvmrt spec` prints must survive a JSON round trip and compile to the same program.
    assert compile_profile(json.loads(json.dumps(prof))) == compile_profile(prof)


def test_default_profile_lists_what_an_agent_must_never_do() -> None:
    names = {n for rule in default_profile()["syscalls"] for n in rule["names"]}
    for name in ("mount", "umount2", "pivot_root", "move_mount", "ptrace", "bpf", "kexec_load",
                 "keyctl", "init_module", "finit_module", "setns", "userfaultfd",
                 "open_by_handle_at", "unshare", "clone", "clone3", "socket", "io_uring_setup"):
        assert name in names


def test_compile_is_deterministic() -> None:
    # The runtime caches the compiled program, so equal input must give equal bytes.
    assert compile_profile(default_profile()) == compile_profile(default_profile())


@pytest.mark.parametrize("name", ["mount", "pivot_root", "ptrace", "bpf", "keyctl", "setns",
                                  "init_module", "open_by_handle_at", "process_vm_writev"])
def test_default_denies_with_eperm(default_bpf: bytes, name: str) -> None:
    import pyseccomp
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert run_bpf(default_bpf, nr) == RET_ERRNO(1)


def test_default_allows_ordinary_calls(default_bpf: bytes) -> None:
    assert run_bpf(default_bpf, NR["getpid"]) == RET_ALLOW
    assert run_bpf(default_bpf, NR["mkdirat"], args=(0, 0, 0o755)) == RET_ALLOW


def test_default_denies_new_user_namespaces_only(default_bpf: bytes) -> None:
    assert run_bpf(default_bpf, NR["unshare"], args=(CLONE_NEWUSER,)) == RET_ERRNO(1)
    assert run_bpf(default_bpf, NR["unshare"], args=(CLONE_NEWUSER | CLONE_NEWNS,)) == RET_ERRNO(1)
    assert run_bpf(default_bpf, NR["unshare"], args=(CLONE_NEWNS,)) == RET_ALLOW
    assert run_bpf(default_bpf, NR["clone"], args=(SIGCHLD,)) == RET_ALLOW
    assert run_bpf(default_bpf, NR["clone"], args=(CLONE_NEWUSER | SIGCHLD,)) == RET_ERRNO(1)


def test_default_sends_clone3_and_io_uring_to_enosys(default_bpf: bytes) -> None:
    assert run_bpf(default_bpf, NR["clone3"]) == RET_ERRNO(38)
    assert run_bpf(default_bpf, NR["io_uring_setup"]) == RET_ERRNO(38)


@pytest.mark.parametrize(("family", "type_", "expected"), [
    (AF_PACKET, SOCK_RAW, RET_ERRNO(1)),
    (AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, RET_ERRNO(1)),
    (AF_PACKET | 1 << 32, SOCK_RAW, RET_ERRNO(1)),       # high bits the kernel ignores
    (AF_INET, SOCK_RAW, RET_ERRNO(1)),
    (AF_INET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, RET_ERRNO(1)),
    (AF_INET | 1 << 32, SOCK_RAW | 1 << 40, RET_ERRNO(1)),
    (AF_INET6, SOCK_RAW | SOCK_NONBLOCK, RET_ERRNO(1)),
    (AF_INET, SOCK_PACKET, RET_ERRNO(1)),                 # the kernel makes this AF_PACKET
    (AF_INET, SOCK_STREAM | SOCK_CLOEXEC, RET_ALLOW),
    (AF_INET6, SOCK_DGRAM, RET_ALLOW),
    (AF_UNIX, SOCK_STREAM, RET_ALLOW),
])
def test_default_socket_rules(default_bpf: bytes, family: int, type_: int, expected: int) -> None:
    assert run_bpf(default_bpf, NR["socket"], args=(family, type_, 0)) == expected


@x86_64_only
def test_default_covers_i386_and_x32_callers(default_bpf: bytes) -> None:
    i386 = AUDIT_ARCH_I386
    assert run_bpf(default_bpf, I386_NR["mount"], arch=i386) == RET_ERRNO(1)
    assert run_bpf(default_bpf, I386_NR["umount"], arch=i386) == RET_ERRNO(1)
    assert run_bpf(default_bpf, I386_NR["getpid"], arch=i386) == RET_ALLOW
    assert run_bpf(default_bpf, I386_NR["socket"], arch=i386, args=(AF_PACKET, SOCK_RAW)) == RET_ERRNO(1)
    # socketcall hides socket()'s arguments behind a pointer: libseccomp refuses every
    # socketcall(SYS_SOCKET, ...) when socket() has argument rules (fail closed), but not others.
    assert run_bpf(default_bpf, I386_NR["socketcall"], arch=i386, args=(SYS_SOCKET,)) == RET_ERRNO(1)
    assert run_bpf(default_bpf, I386_NR["socketcall"], arch=i386, args=(SYS_CONNECT,)) == RET_ALLOW
    assert run_bpf(default_bpf, X32_SYSCALL_BIT | NR["mount"], arch=AUDIT_ARCH_X86_64) == RET_ERRNO(1)
    assert run_bpf(default_bpf, X32_SYSCALL_BIT | NR["getpid"], arch=AUDIT_ARCH_X86_64) == RET_ALLOW


def test_unlisted_architecture_kills_the_process(default_bpf: bytes) -> None:
    foreign = AUDIT_ARCH_ARM if MACHINE == "x86_64" else AUDIT_ARCH_I386
    assert run_bpf(default_bpf, 20, arch=foreign) == RET_KILL_PROCESS


def test_native_arch_is_always_filtered() -> None:
    # The spec's own example lists only foreign architectures.
    bpf = compile_profile(profile({"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO"},
                                  architectures=["SCMP_ARCH_X86" if MACHINE == "x86_64" else "SCMP_ARCH_ARM"]))
    assert run_bpf(bpf, NR["mkdirat"]) == RET_ERRNO(1)


# --- actions, errno values, operators ---

@pytest.mark.parametrize(("action", "errno_ret", "expected"), [
    ("SCMP_ACT_ERRNO", None, RET_ERRNO(1)),        # errnoRet defaults to EPERM
    ("SCMP_ACT_ERRNO", 13, RET_ERRNO(13)),
    ("SCMP_ACT_TRACE", None, RET_TRACE(1)),
    ("SCMP_ACT_TRACE", 7, RET_TRACE(7)),
    ("SCMP_ACT_KILL", None, RET_KILL_THREAD),
    ("SCMP_ACT_KILL_THREAD", None, RET_KILL_THREAD),
    ("SCMP_ACT_KILL_PROCESS", None, RET_KILL_PROCESS),
    ("SCMP_ACT_TRAP", None, RET_TRAP),
    ("SCMP_ACT_LOG", None, RET_LOG),
])
def test_actions(action: str, errno_ret: int | None, expected: int) -> None:
    rule: dict = {"names": ["mkdirat"], "action": action}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    bpf = compile_profile(profile(rule))
    assert run_bpf(bpf, NR["mkdirat"]) == expected
    assert run_bpf(bpf, NR["getpid"]) == RET_ALLOW


def test_default_errno_ret() -> None:
    bpf = compile_profile(profile({"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},
                                  default="SCMP_ACT_ERRNO", defaultErrnoRet=38))
    assert run_bpf(bpf, NR["mkdirat"]) == RET_ERRNO(38)
    assert run_bpf(bpf, NR["getpid"]) == RET_ALLOW


def test_rule_equal_to_default_action_is_skipped_not_failed() -> None:
    base = profile({"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}, default="SCMP_ACT_ERRNO")
    redundant = copy.deepcopy(base)
    # errnoRet unset means EPERM, the same as the default: libseccomp would refuse this rule.
    redundant["syscalls"].append({"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO"})
    assert compile_profile(redundant) == compile_profile(base)
    # A different errno is a different action and must be kept.
    different = copy.deepcopy(base)
    different["syscalls"].append({"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13})
    assert run_bpf(compile_profile(different), NR["mkdirat"]) == RET_ERRNO(13)


@pytest.mark.parametrize(("op", "value", "value_two", "denied", "allowed"), [
    ("SCMP_CMP_EQ", 8, 0, [8], [0, 9]),
    ("SCMP_CMP_NE", 8, 0, [0, 9], [8]),
    ("SCMP_CMP_LT", 8, 0, [0, 7], [8, 9]),
    ("SCMP_CMP_LE", 8, 0, [7, 8], [9]),
    ("SCMP_CMP_GE", 8, 0, [8, 2**40], [7]),
    ("SCMP_CMP_GT", 8, 0, [9], [8]),
    # OCI order for MASKED_EQ: value is the mask, valueTwo the datum.
    ("SCMP_CMP_MASKED_EQ", 0xFF, 0x08, [0x08, 0x108], [0x09, 0x80]),
])
def test_operators(op: str, value: int, value_two: int, denied: list[int], allowed: list[int]) -> None:
    bpf = compile_profile(profile({"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                                   "args": [{"index": 0, "value": value, "valueTwo": value_two, "op": op}]}))
    for arg in denied:
        assert run_bpf(bpf, NR["personality"], args=(arg,)) == RET_ERRNO(1), hex(arg)
    for arg in allowed:
        assert run_bpf(bpf, NR["personality"], args=(arg,)) == RET_ALLOW, hex(arg)


def test_conditions_on_different_arguments_are_anded() -> None:
    bpf = compile_profile(profile({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "args": [
        {"index": 0, "value": AF_INET, "op": "SCMP_CMP_EQ"},
        {"index": 1, "value": SOCK_DGRAM, "op": "SCMP_CMP_EQ"}]}))
    assert run_bpf(bpf, NR["socket"], args=(AF_INET, SOCK_DGRAM)) == RET_ERRNO(1)
    assert run_bpf(bpf, NR["socket"], args=(AF_INET, SOCK_STREAM)) == RET_ALLOW
    assert run_bpf(bpf, NR["socket"], args=(AF_INET6, SOCK_DGRAM)) == RET_ALLOW


def test_conditions_on_the_same_argument_are_ored_like_runc() -> None:
    bpf = compile_profile(profile({"names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [
        {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
        {"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]}))
    assert run_bpf(bpf, NR["personality"], args=(1,)) == RET_ERRNO(1)
    assert run_bpf(bpf, NR["personality"], args=(2,)) == RET_ERRNO(1)
    assert run_bpf(bpf, NR["personality"], args=(3,)) == RET_ALLOW


def test_optional_fields_may_be_null() -> None:
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": None, "flags": None,
            "syscalls": [{"names": ["mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": None, "args": None}]}
    assert run_bpf(compile_profile(prof), NR["mkdirat"]) == RET_ERRNO(1)
    assert run_bpf(compile_profile({"defaultAction": "SCMP_ACT_LOG"}), NR["getpid"]) == RET_LOG


def test_tsync_flag_is_accepted() -> None:
    assert compile_profile(profile(flags=["SECCOMP_FILTER_FLAG_TSYNC"]))


def test_pyseccomp_is_imported_lazily() -> None:
    code = "import sys, gvmrt.linux.seccomp; print('pyseccomp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- mistakes: each names the file, the exact JSON pointer, and what to do ---

P = "/linux/seccomp"


def test_unknown_syscall_name_points_at_the_name() -> None:
    err = errors_of(profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO"},
                            {"names": ["mkdirat", "getpid", "foo"], "action": "SCMP_ACT_ERRNO"}))
    assert err.file == "config.json"
    assert err.pointer == f"{P}/syscalls/1/names/2"
    assert f"unknown system call 'foo' (not known to libseccomp on {MACHINE})" in err.message
    assert str(err).startswith(f"config.json: {P}/syscalls/1/names/2: ")


def test_a_name_cut_short_by_nul_is_unknown() -> None:
    err = errors_of(profile({"names": ["mkdirat\0x"], "action": "SCMP_ACT_ERRNO"}))
    assert err.pointer == f"{P}/syscalls/0/names/0"
    assert "unknown system call" in err.message


def test_unknown_syscall_name_in_a_redundant_rule_is_still_reported() -> None:
    err = errors_of(profile({"names": ["mkdri"], "action": "SCMP_ACT_ALLOW"}))
    assert err.pointer == f"{P}/syscalls/0/names/0"


def test_file_and_pointer_are_the_callers() -> None:
    err = errors_of(profile({"names": ["foo"], "action": "SCMP_ACT_ERRNO"}),
                    file="bundle/config.json", pointer="/process/seccomp")
    assert str(err).startswith("bundle/config.json: /process/seccomp/syscalls/0/names/0: ")


@pytest.mark.parametrize(("prof", "pointer", "words"), [
    (profile(default="SCMP_ACT_DENY"), f"{P}/defaultAction", "unknown seccomp action 'SCMP_ACT_DENY'"),
    ({"syscalls": []}, f"{P}/defaultAction", "defaultAction is required"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_BLOCK"}), f"{P}/syscalls/0/action",
     "unknown seccomp action 'SCMP_ACT_BLOCK'"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_NOTIFY"}), f"{P}/syscalls/0/action",
     "SCMP_ACT_NOTIFY needs a seccomp agent"),
    (profile(default="SCMP_ACT_NOTIFY"), f"{P}/defaultAction", "SCMP_ACT_NOTIFY needs a seccomp agent"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO",
              "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"}]}),
     f"{P}/syscalls/0/args/0/op", "unknown comparison operator 'SCMP_CMP_LIKE'"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}),
     f"{P}/syscalls/0/args/0/index", "out of range"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": -1, "op": "SCMP_CMP_EQ"}]}),
     f"{P}/syscalls/0/args/0/value", "out of range"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": True, "op": "SCMP_CMP_EQ"}]}),
     f"{P}/syscalls/0/args/0/value", "not a boolean"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "op": "SCMP_CMP_EQ"}]}),
     f"{P}/syscalls/0/args/0/value", "value is required"),
    (profile(architectures=["SCMP_ARCH_Z80"]), f"{P}/architectures/0", "unknown architecture 'SCMP_ARCH_Z80'"),
    # s390x is big-endian: libseccomp cannot put it in one filter with x86_64 or aarch64.
    (profile(architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_S390X"]), f"{P}/architectures/1", "remove it"),
    (profile(flags=["SECCOMP_FILTER_FLAG_LOG"]), f"{P}/flags/0", "SECCOMP_FILTER_FLAG_LOG is not supported"),
    (profile(flags=["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]), f"{P}/flags/1",
     "SECCOMP_FILTER_FLAG_SPEC_ALLOW is not supported"),
    (profile(flags=["SECCOMP_FILTER_FLAG_FAST"]), f"{P}/flags/0", "unknown seccomp flag"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}, default="SCMP_ACT_ERRNO"),
     f"{P}/syscalls/0/errnoRet", "only applies to SCMP_ACT_ERRNO and SCMP_ACT_TRACE"),
    (profile(defaultErrnoRet=1), f"{P}/defaultErrnoRet", "only applies to SCMP_ACT_ERRNO"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 5000}),
     f"{P}/syscalls/0/errnoRet", "out of range; use 0 to 4095"),
    (profile({"names": [], "action": "SCMP_ACT_ERRNO"}), f"{P}/syscalls/0/names", "at least one"),
    (profile({"names": "getpid", "action": "SCMP_ACT_ERRNO"}), f"{P}/syscalls/0/names", "must be a JSON array"),
    (profile({"names": ["getpid", 7], "action": "SCMP_ACT_ERRNO"}), f"{P}/syscalls/0/names/1", "must be a string"),
    (profile({"name": "getpid", "action": "SCMP_ACT_ERRNO"}), f"{P}/syscalls/0/names", "pre-1.0 format"),
    (profile({"names": ["getpid"]}), f"{P}/syscalls/0/action", "action is required"),
    (profile("getpid"), f"{P}/syscalls/0", "must be a JSON object"),
    (profile(architectures=""), f"{P}/architectures", "must be a JSON array, not a string"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "args": {}}), f"{P}/syscalls/0/args",
     "must be a JSON array"),
    (profile({"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1.5}), f"{P}/syscalls/0/errnoRet",
     "not a fractional number"),
    ([], P, "must be a JSON object"),
])
def test_bad_profiles(prof: object, pointer: str, words: str) -> None:
    err = errors_of(prof)
    assert err.pointer == pointer
    assert words in err.message
    assert str(err).startswith(f"config.json: {pointer}: ")
