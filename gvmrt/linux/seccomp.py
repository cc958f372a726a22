"""Seccomp: compile an OCI ``linux.seccomp`` profile into a classic-BPF program.

DESIGN.md §4 and STYLE.md habit 5: the parent compiles, the child only loads bytes
(``gvmrt.linux.sys.seccomp_set_filter``) after setting no_new_privs itself.

Compilation is two steps, so the checks that need no libseccomp stay pure:

1. ``_parse`` checks the profile as it appears in config.json (runtime-spec config-linux.md,
   "Seccomp") and turns it into a ``_Plan`` of frozen dataclasses.  Every mistake becomes a
   one-line ``ConfigError`` naming the file and the JSON pointer of the offending field.
2. ``_build`` feeds the plan to libseccomp (through pyseccomp, imported lazily: it costs ~30 ms
   and the runtime caches our output) and exports the BPF program.

Semantics follow runc (libcontainer/seccomp/seccomp_linux.go) where the spec is silent, except
that a system call name libseccomp does not know is an error here (runc skips it silently), so a
typo in a deny rule can never quietly disable it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gvmrt.errors import ConfigError

# --- vocabulary (names as in libseccomp's seccomp.h, which the runtime-spec adopts) ---

# OCI action name -> libseccomp action kind.  SCMP_ACT_KILL is libseccomp's old name for
# SCMP_ACT_KILL_THREAD (seccomp.h: "#define SCMP_ACT_KILL SCMP_ACT_KILL_THREAD").
_ACTIONS = {
    "SCMP_ACT_KILL": "KILL_THREAD",
    "SCMP_ACT_KILL_THREAD": "KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS": "KILL_PROCESS",
    "SCMP_ACT_TRAP": "TRAP",
    "SCMP_ACT_ERRNO": "ERRNO",
    "SCMP_ACT_TRACE": "TRACE",
    "SCMP_ACT_ALLOW": "ALLOW",
    "SCMP_ACT_LOG": "LOG",
    "SCMP_ACT_NOTIFY": "NOTIFY",
}

# The spec: errnoRet/defaultErrnoRet default to EPERM, and "when the action doesn't support an
# errno, the runtime MUST print an error and fail".  Upper bounds: the kernel caps an ERRNO return
# at MAX_ERRNO (4095) and libseccomp refuses larger ones; TRACE carries 16 bits
# (SECCOMP_RET_DATA) to the tracer as a message.
_DATA_LIMIT = {"ERRNO": 4095, "TRACE": 0xFFFF}
_EPERM = 1

# OCI operator name -> pyseccomp constant name (enum scmp_compare).
_OPS = {
    "SCMP_CMP_NE": "NE",
    "SCMP_CMP_LT": "LT",
    "SCMP_CMP_LE": "LE",
    "SCMP_CMP_EQ": "EQ",
    "SCMP_CMP_GE": "GE",
    "SCMP_CMP_GT": "GT",
    "SCMP_CMP_MASKED_EQ": "MASKED_EQ",
}

# OCI architecture name -> pyseccomp.Arch attribute (the list in config-linux.md, libseccomp 2.5).
_ARCHES = {
    "SCMP_ARCH_X86": "X86",
    "SCMP_ARCH_X86_64": "X86_64",
    "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_ARM": "ARM",
    "SCMP_ARCH_AARCH64": "AARCH64",
    "SCMP_ARCH_MIPS": "MIPS",
    "SCMP_ARCH_MIPS64": "MIPS64",
    "SCMP_ARCH_MIPS64N32": "MIPS64N32",
    "SCMP_ARCH_MIPSEL": "MIPSEL",
    "SCMP_ARCH_MIPSEL64": "MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32": "MIPSEL64N32",
    "SCMP_ARCH_PPC": "PPC",
    "SCMP_ARCH_PPC64": "PPC64",
    "SCMP_ARCH_PPC64LE": "PPC64LE",
    "SCMP_ARCH_S390": "S390",
    "SCMP_ARCH_S390X": "S390X",
    "SCMP_ARCH_PARISC": "PARISC",
    "SCMP_ARCH_PARISC64": "PARISC64",
    "SCMP_ARCH_RISCV64": "RISCV64",
}

# Filter flags are arguments of the seccomp(2) call, not part of the BPF program, and
# sys.seccomp_set_filter loads the program with flags = 0.  So a flag is accepted only when
# ignoring it changes nothing; otherwise it is refused with the reason (never silently dropped).
_FLAGS_IGNORED = {
    # "Synchronise all threads": the filter is loaded in a freshly forked, single-threaded child
    # before exec, so there are no other threads.  runc ignores it for the same reason.
    "SECCOMP_FILTER_FLAG_TSYNC",
}
_FLAGS_REFUSED = {
    "SECCOMP_FILTER_FLAG_LOG":
        "gvmrt loads the compiled program without seccomp(2) flags, so it cannot log every "
        "non-allowed action; remove it and use SCMP_ACT_LOG on the rules you want logged",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW":
        "gvmrt loads the compiled program without seccomp(2) flags, so the Speculative Store "
        "Bypass mitigation stays on; remove it",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV":
        "it only applies to SCMP_ACT_NOTIFY listeners, which gvmrt does not run; remove it",
}

# A system call has at most six arguments (struct seccomp_data.args[6]).
_MAX_ARGS = 6
# The kernel refuses longer classic-BPF programs (BPF_MAXINSNS, include/uapi/linux/bpf_common.h).
_BPF_MAXINSNS = 4096
_SOCK_FILTER_SIZE = 8  # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }


# --- the plan: what _parse extracts, with the pointer of each piece for later errors ---

@dataclass(frozen=True)
class _Action:
    kind: str             # a value of _ACTIONS
    data: int | None      # errno / trace message for ERRNO and TRACE, else None


@dataclass(frozen=True)
class _Cond:
    index: int
    op: str               # a value of _OPS
    value: int            # for MASKED_EQ, the mask (OCI order)
    value_two: int        # for MASKED_EQ, the datum compared after masking


@dataclass(frozen=True)
class _Rule:
    pointer: str                          # .../syscalls/i
    names: tuple[tuple[str, str], ...]    # (name, pointer of that name)
    action: _Action
    conds: tuple[_Cond, ...]


@dataclass(frozen=True)
class _Plan:
    default: _Action
    arches: tuple[tuple[str, str], ...]   # (pyseccomp.Arch attribute, pointer)
    rules: tuple[_Rule, ...]


# --- step 1: pure checks ---

class _Checker:
    """Small helpers that raise ConfigError naming ``file`` and a JSON pointer."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, pointer: str, message: str) -> ConfigError:
        return ConfigError(self.file, pointer, message)

    def obj(self, value: Any, pointer: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(pointer, f"must be a JSON object, not {_json_type(value)}")
        return value

    def array(self, value: Any, pointer: str) -> list:
        if not isinstance(value, list):
            raise self.fail(pointer, f"must be a JSON array, not {_json_type(value)}")
        return value

    def optional_array(self, obj: dict, key: str, pointer: str) -> list:
        """``obj[key]`` as a list; absent or null means empty (the field is OPTIONAL)."""
        value = obj.get(key)
        return [] if value is None else self.array(value, f"{pointer}/{key}")

    def string(self, value: Any, pointer: str) -> str:
        if not isinstance(value, str):
            raise self.fail(pointer, f"must be a string, not {_json_type(value)}")
        return value

    def uint(self, value: Any, pointer: str, limit: int) -> int:
        # bool is an int subclass in Python, but `true` is not a number in JSON.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(pointer, f"must be a non-negative integer, not {_json_type(value)}")
        if not 0 <= value <= limit:
            raise self.fail(pointer, f"{value} is out of range; use 0 to {limit}")
        return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a fractional number"
    return {str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(
        type(value), type(value).__name__)


def _parse_action(c: _Checker, obj: dict, action_key: str, errno_key: str, pointer: str) -> _Action:
    if action_key not in obj:
        raise c.fail(f"{pointer}/{action_key}", f"{action_key} is required; "
                                                "set it to e.g. SCMP_ACT_ERRNO or SCMP_ACT_ALLOW")
    name = c.string(obj[action_key], f"{pointer}/{action_key}")
    kind = _ACTIONS.get(name)
    if kind is None:
        raise c.fail(f"{pointer}/{action_key}",
                     f"unknown seccomp action {name!r}; use one of {', '.join(sorted(_ACTIONS))}")
    if kind == "NOTIFY":
        # SCMP_ACT_NOTIFY suspends the caller until a seccomp agent answers on the listener fd
        # (listenerPath); gvmrt runs no agent, so the container would hang on that call.
        raise c.fail(f"{pointer}/{action_key}",
                     "SCMP_ACT_NOTIFY needs a seccomp agent listening on listenerPath, which gvmrt "
                     "does not run; use SCMP_ACT_ERRNO, SCMP_ACT_LOG or SCMP_ACT_KILL_PROCESS instead")
    if kind in _DATA_LIMIT:
        data = _EPERM
        if obj.get(errno_key) is not None:
            data = c.uint(obj[errno_key], f"{pointer}/{errno_key}", _DATA_LIMIT[kind])
        return _Action(kind, data)
    if obj.get(errno_key) is not None:
        raise c.fail(f"{pointer}/{errno_key}",
                     f"{errno_key} only applies to SCMP_ACT_ERRNO and SCMP_ACT_TRACE, not {name}; "
                     "remove it")
    return _Action(kind, None)


def _parse_cond(c: _Checker, raw: Any, pointer: str) -> _Cond:
    arg = c.obj(raw, pointer)
    for key in ("index", "value", "op"):
        if key not in arg:
            raise c.fail(f"{pointer}/{key}", f"{key} is required in a syscall argument condition")
    index = c.uint(arg["index"], f"{pointer}/index", _MAX_ARGS - 1)
    value = c.uint(arg["value"], f"{pointer}/value", 2**64 - 1)
    value_two = c.uint(arg.get("valueTwo", 0), f"{pointer}/valueTwo", 2**64 - 1)
    op_name = c.string(arg["op"], f"{pointer}/op")
    op = _OPS.get(op_name)
    if op is None:
        raise c.fail(f"{pointer}/op",
                     f"unknown comparison operator {op_name!r}; use one of {', '.join(_OPS)}")
    return _Cond(index, op, value, value_two)


def _parse_rule(c: _Checker, raw: Any, pointer: str) -> _Rule:
    entry = c.obj(raw, pointer)
    if "names" not in entry:
        hint = ("the single 'name' key is the pre-1.0 format; write \"names\": [...]" if "name" in entry
                else "names is required; list the system calls this rule applies to")
        raise c.fail(f"{pointer}/names", hint)
    names_raw = c.array(entry["names"], f"{pointer}/names")
    if not names_raw:
        raise c.fail(f"{pointer}/names", "names must list at least one system call")
    names = tuple((c.string(n, f"{pointer}/names/{j}"), f"{pointer}/names/{j}")
                  for j, n in enumerate(names_raw))
    action = _parse_action(c, entry, "action", "errnoRet", pointer)
    args_raw = c.optional_array(entry, "args", pointer)
    conds = tuple(_parse_cond(c, a, f"{pointer}/args/{k}") for k, a in enumerate(args_raw))
    return _Rule(pointer, names, action, conds)


def _parse(profile: Any, file: str, pointer: str) -> _Plan:
    c = _Checker(file)
    prof = c.obj(profile, pointer)
    default = _parse_action(c, prof, "defaultAction", "defaultErrnoRet", pointer)

    arches = []
    for k, raw in enumerate(c.optional_array(prof, "architectures", pointer)):
        name = c.string(raw, f"{pointer}/architectures/{k}")
        if name not in _ARCHES:
            raise c.fail(f"{pointer}/architectures/{k}",
                         f"unknown architecture {name!r}; use one of {', '.join(_ARCHES)}")
        arches.append((_ARCHES[name], f"{pointer}/architectures/{k}"))

    for k, raw in enumerate(c.optional_array(prof, "flags", pointer)):
        flag = c.string(raw, f"{pointer}/flags/{k}")
        if flag in _FLAGS_REFUSED:
            raise c.fail(f"{pointer}/flags/{k}", f"{flag} is not supported: {_FLAGS_REFUSED[flag]}")
        if flag not in _FLAGS_IGNORED:
            known = ", ".join(sorted(_FLAGS_IGNORED | set(_FLAGS_REFUSED)))
            raise c.fail(f"{pointer}/flags/{k}", f"unknown seccomp flag {flag!r}; known flags: {known}")

    rules = tuple(_parse_rule(c, raw, f"{pointer}/syscalls/{i}")
                  for i, raw in enumerate(c.optional_array(prof, "syscalls", pointer)))
    return _Plan(default, tuple(arches), rules)


# --- step 2: libseccomp ---

def _action_value(sc: Any, action: _Action) -> int:
    if action.kind == "ERRNO":
        return sc.ERRNO(action.data)
    if action.kind == "TRACE":
        return sc.TRACE(action.data)
    return getattr(sc, action.kind)


def _native_arch_name() -> str:
    return os.uname().machine


def _build(plan: _Plan, file: str, pointer: str) -> bytes:
    import pyseccomp as sc  # lazily: ~30 ms, and the runtime caches the compiled program

    try:
        flt = sc.SyscallFilter(_action_value(sc, plan.default))
    except OSError as exc:  # e.g. a kernel without SECCOMP_RET_KILL_PROCESS / _LOG
        raise ConfigError(file, f"{pointer}/defaultAction",
                          f"libseccomp refused the default action ({exc.strerror}); "
                          "choose another action, this kernel or libseccomp lacks it") from exc

    # libseccomp sets no_new_privs in seccomp_load() unless told not to.  We never call
    # seccomp_load (export_bpf emits only the program), and the child sets no_new_privs itself,
    # but say so explicitly rather than rely on that.
    flt.set_attr(sc.Attr.CTL_NNP, 0)
    # A system call from an architecture not in the filter gets libseccomp's "bad arch" action,
    # KILL_THREAD by default; kill the whole process instead so no half-dead process lingers
    # (needs Linux 4.14; older kernels keep the default).
    try:
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    except OSError:
        pass

    # seccomp_init() already added the native architecture, so it is always filtered.
    native = sc.system_arch()
    for arch_attr, arch_ptr in plan.arches:
        token = getattr(sc.Arch, arch_attr)
        if token == native or flt.exist_arch(token):
            continue
        try:
            flt.add_arch(token)
        except OSError as exc:
            # EDOM: libseccomp cannot mix architectures with a different byte order or word
            # layout in one filter (e.g. MIPS or s390x with x86_64).
            raise ConfigError(file, arch_ptr,
                              f"libseccomp cannot add SCMP_ARCH_{arch_attr} to a filter for "
                              f"{_native_arch_name()} ({exc.strerror}); remove it") from exc

    for rule in plan.rules:
        numbers = []
        for name, name_ptr in rule.names:
            # Resolved against the native table, which lists every name libseccomp knows:
            # a name that exists only on another listed arch (socketcall on x86_64) resolves to a
            # negative pseudo-number that libseccomp maps per arch.  Only -1 (__NR_SCMP_ERROR)
            # means libseccomp has never heard of it.
            # A NUL would cut the name short in C ("mkdir\0x" would resolve as mkdir).
            nr = -1 if "\0" in name else sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr == -1:
                raise ConfigError(file, name_ptr,
                                  f"unknown system call {name!r} (not known to libseccomp on "
                                  f"{_native_arch_name()}); check the spelling, or remove it if it "
                                  "is newer than the installed libseccomp")
            numbers.append((name, nr))

        # libseccomp refuses (EACCES) a rule whose action is the filter's default action; such a
        # rule changes nothing, so skip it like runc does.
        if rule.action == plan.default:
            continue

        # Several conditions on the same argument cannot be ANDed by libseccomp (EINVAL).  Like
        # runc, add each condition as its own rule then (OR), which is what Docker-style profiles
        # that list e.g. two personality() values expect.
        indexes = [cond.index for cond in rule.conds]
        if len(set(indexes)) == len(indexes):
            cond_sets = [rule.conds]
        else:
            cond_sets = [(cond,) for cond in rule.conds]

        # When two rules name the same system call, libseccomp 2.5 keeps the first unconditional
        # action and lets an unconditional rule override conditional ones, whatever their order
        # (runc behaves the same, as it uses libseccomp too).
        action = _action_value(sc, rule.action)
        for name, nr in numbers:
            for conds in cond_sets:
                # pyseccomp.Arg(arg, op, datum_a, datum_b) is SCMP_CMP(arg, op, a, b); for
                # MASKED_EQ, libseccomp's a is the mask and b the datum, the same order as OCI's
                # value/valueTwo.
                args = [sc.Arg(cond.index, getattr(sc, cond.op), cond.value, cond.value_two)
                        for cond in conds]
                try:
                    flt.add_rule(action, nr, *args)
                except OSError as exc:
                    raise ConfigError(file, rule.pointer,
                                      f"libseccomp refused the rule for {name!r} ({exc.strerror}); "
                                      "check its action and args") from exc

    # export_bpf writes the raw struct sock_filter[] to a file descriptor.  A pipe could fill up
    # (64 KiB) before we read it, so use an anonymous memory file: no disk, no TMPDIR.
    with os.fdopen(os.memfd_create("gvmrt-seccomp-bpf", os.MFD_CLOEXEC), "r+b", buffering=0) as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()

    count = len(program) // _SOCK_FILTER_SIZE
    if not program or len(program) % _SOCK_FILTER_SIZE:
        raise AssertionError(f"libseccomp exported {len(program)} bytes, not whole sock_filters")
    if count > _BPF_MAXINSNS:
        raise ConfigError(file, pointer,
                          f"the compiled filter has {count} instructions, more than the kernel's "
                          f"limit of {_BPF_MAXINSNS}; use fewer rules or architectures")
    return program


def compile_profile(profile: dict, *, file: str = "config.json", pointer: str = "/linux/seccomp") -> bytes:
    """Compile an OCI ``linux.seccomp`` object into a classic-BPF program (struct sock_filter[]).

    ``file`` and ``pointer`` only name where ``profile`` came from, for error messages.
    Raises ConfigError for anything wrong with the profile.  The result does not set
    no_new_privs; load it with ``gvmrt.linux.sys.seccomp_set_filter`` after ``prctl(PR_SET_NO_NEW_PRIVS)``.
    """
    return _build(_parse(profile, file, pointer), file, pointer)


# --- the default profile for agents ---

# Denied with EPERM.  The agent runs without capabilities in its own user namespace, so the
# kernel would already refuse most of these; the filter is the second wall, and it also shrinks
# the kernel attack surface reachable from the container.
_DENY_EPERM = (
    # Mount table changes: an agent must not reshape its view of the filesystem (or undo masked
    # and read-only paths).  umount is i386's old umount(2); the rest are the new mount API (5.2+).
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    # Reading or writing other processes' memory.
    "ptrace", "process_vm_readv", "process_vm_writev",
    # eBPF programs and perf events: large kernel attack surface, and side channels.
    "bpf", "perf_event_open",
    # Replacing the kernel, loading modules, rebooting, swap, accounting, quotas.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    # The kernel keyring is not namespaced: keys could leak between containers and the host.
    "keyctl", "add_key", "request_key",
    # Joining another process's namespaces.
    "setns",
    # userfaultfd stalls kernel page faults at will, a classic aid for kernel exploit races.
    "userfaultfd",
    # File handles bypass path lookup, and so bind-mount boundaries (the "shocker" escape).
    "open_by_handle_at", "name_to_handle_at",
    # Host information and raw hardware access.
    "lookup_dcookie", "syslog", "iopl", "ioperm",
    # The clock is not namespaced (time namespaces only offset monotonic/boottime).
    # stime, clock_settime64 and clock_adjtime64 are the i386 variants.
    "settimeofday", "stime", "clock_settime", "clock_settime64", "adjtimex", "clock_adjtime",
    "clock_adjtime64",
)

_CLONE_NEWUSER = 0x10000000  # <linux/sched.h>
_ENOSYS = 38
# <linux/socket.h>, <linux/net.h>
_AF_INET, _AF_INET6, _AF_PACKET = 2, 10, 17
_SOCK_RAW, _SOCK_PACKET, _SOCK_TYPE_MASK = 3, 10, 0xF
# socket(2)'s arguments are C ints: the kernel uses only the low 32 bits of the register, but
# seccomp sees all 64.  EQ 17 would miss 0x1_00000011; MASKED_EQ with 0xffffffff does not.
_INT_MASK = 0xFFFFFFFF


def _masked_eq(index: int, mask: int, datum: int) -> dict:
    # OCI order for SCMP_CMP_MASKED_EQ: value is the mask, valueTwo the datum.
    return {"index": index, "value": mask, "valueTwo": datum, "op": "SCMP_CMP_MASKED_EQ"}


def _default_rules() -> list[dict]:
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}
    return [
        {"names": list(_DENY_EPERM), **eperm},
        # No new user namespaces: inside one the agent would be root again, with all
        # capabilities and the kernel code they unlock (most container escapes start here).
        # unshare's flags argument is an int; clone's flags is arg 0 on x86 and arm.
        {"names": ["unshare", "clone"], **eperm, "args": [_masked_eq(0, _CLONE_NEWUSER, _CLONE_NEWUSER)]},
        # clone3 passes its flags in a struct that seccomp cannot read, so refuse the whole call
        # with ENOSYS: glibc (fork, posix_spawn, pthread_create) then falls back to clone, which
        # the rule above checks.  Docker's default profile does the same.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
        # Terminal injection: TIOCSTI pushes input into a terminal's queue (as if typed), and
        # TIOCLINUX can do the same on a virtual console; the jail has its own session, but a
        # terminal passed in as stdio must never become a way to type into the caller's shell.
        {"names": ["ioctl"], **eperm, "args": [_masked_eq(1, 0xFFFFFFFF, 0x5412)]},
        {"names": ["ioctl"], **eperm, "args": [_masked_eq(1, 0xFFFFFFFF, 0x541C)]},
        # io_uring performs many operations (socket, openat, ...) without entering the matching
        # system calls, so it would bypass the rules here; it has also been a steady source of
        # kernel CVEs (Docker and containerd dropped it from their defaults: moby/moby#46762).
        # ENOSYS reads as "this kernel has no io_uring", so libuv, Tokio, etc. fall back to epoll.
        {"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
         "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
        # No packet sockets (sniffing and forging frames on the container's interfaces) and no raw
        # IP sockets (forged packets past the proxy).  The type argument also carries
        # SOCK_CLOEXEC/SOCK_NONBLOCK, so compare only the SOCK_TYPE_MASK bits.  The kernel turns
        # socket(AF_INET, SOCK_PACKET) into a packet socket (net/socket.c), so refuse that too.
        # On i386 libseccomp can only see socketcall(SYS_SOCKET, ptr), so it refuses every
        # socket() a 32-bit program makes through socketcall: fail closed.
        {"names": ["socket"], **eperm, "args": [_masked_eq(0, _INT_MASK, _AF_PACKET)]},
        {"names": ["socket"], **eperm, "args": [_masked_eq(0, _INT_MASK, _AF_INET),
                                                 _masked_eq(1, _SOCK_TYPE_MASK, _SOCK_RAW)]},
        {"names": ["socket"], **eperm, "args": [_masked_eq(0, _INT_MASK, _AF_INET6),
                                                 _masked_eq(1, _SOCK_TYPE_MASK, _SOCK_RAW)]},
        {"names": ["socket"], **eperm, "args": [_masked_eq(0, _INT_MASK, _AF_INET),
                                                 _masked_eq(1, _SOCK_TYPE_MASK, _SOCK_PACKET)]},
    ]


def default_profile() -> dict:
    """gvmrt's default ``linux.seccomp`` for agents, in OCI format (printed by ``gvmrt spec``).

    Allow by default, deny what an agent must never need.  Names the installed libseccomp does
    not know are left out so the profile compiles on every host; the kernel still refuses most of
    them for lack of capabilities.
    """
    import pyseccomp as sc  # lazily, as in compile_profile

    machine = _native_arch_name()
    # Every ABI the kernel will run must be listed, or its system calls would get the bad-arch
    # action; listing them also means the denials apply to 32-bit (int 0x80) and x32 callers.
    arches = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
              "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}.get(machine, [])
    rules = []
    for rule in _default_rules():
        names = [n for n in rule["names"] if sc.resolve_syscall(sc.Arch.NATIVE, n) != -1]
        if names:
            rules.append({**rule, "names": names})
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": rules}
