"""Pydantic models of the config.json gvmrt reads (OCI runtime-spec 1.x plus the `gvm` extension).

Only the cold path imports this module: `gvmrt.plan` validates a config once per content and caches
the compiled plan, so create/start/state/kill/delete never pay for pydantic (DESIGN.md §3).

Policy on fields (DESIGN.md §2): a standard field gvmrt honours is modelled; a standard field gvmrt
cannot honour is modelled only to be refused with a reason (`_refuse_if_set`); inside every object
unknown keys are refused (a typo such as "readOnly" must not silently drop a security setting); only
the top level allows unknown properties, as the runtime-spec requires. The `gvm` extension is the
`Gvm` model: its `egress` policy is `gvmrt.policy.model.Egress` (spec/policy.md), the other groups
are reserved. Errors are reported by `gvmrt.validation.errors_of`, shared with the policy models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gvmrt import OCI_VERSION
from gvmrt.errors import ConfigError
from gvmrt.policy.model import Credential, Egress, credential_names_unique
from gvmrt.validation import At, Strict, errors_of

ID_MAX = 2**32 - 1

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")

# rlimit names from <sys/resource.h>, as the runtime-spec spells them.
RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}

# <linux/capability.h>
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]
CAP_NUMBERS = {name: i for i, name in enumerate(CAPABILITIES)}


# The shared strict base and located error (gvmrt.validation), under this module's old names.
_Strict = Strict
_At = At


def _refuse_if_set(value: Any, what: str, why: str) -> Any:
    if value:
        raise ValueError(f"{what} is not supported by gvmrt: {why}; remove it")
    return value


_Id = Annotated[int, Field(ge=0, le=ID_MAX)]


class User(_Strict):
    uid: int = Field(0, ge=0, le=ID_MAX)
    gid: int = Field(0, ge=0, le=ID_MAX)
    umask: int | None = Field(None, ge=0, le=0o777)
    additionalGids: list[_Id] = Field(default_factory=list)
    username: str | None = None  # Windows only; ignored on Linux by the spec


# The names are checked by a validator (for a message that points at the bad entry); the enum is
# for the JSON Schema only, so editors can complete and flag capability and rlimit names.
_CapNames = Annotated[list[str], Field(default_factory=list,
                                       json_schema_extra={"items": {"enum": CAPABILITIES, "type": "string"}})]


class Capabilities(_Strict):
    bounding: _CapNames
    effective: _CapNames
    inheritable: _CapNames
    permitted: _CapNames
    ambient: _CapNames

    @field_validator("*")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if name not in CAP_NUMBERS:
                raise _At((i,), f"unknown capability {name!r} (names look like CAP_NET_BIND_SERVICE)")
        return names


class Rlimit(_Strict):
    type: str = Field(json_schema_extra={"enum": list(RLIMITS)})
    soft: int = Field(ge=0, le=2**64 - 1)
    hard: int = Field(ge=0, le=2**64 - 1)

    @field_validator("type")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in RLIMITS:
            raise ValueError(f"unknown rlimit {name!r} (one of {', '.join(RLIMITS)})")
        return name

    @model_validator(mode="after")
    def _order(self) -> Rlimit:
        if self.soft > self.hard:
            raise _At(("soft",), f"{self.type}: soft limit {self.soft} is above hard limit {self.hard}")
        return self


class ConsoleSize(_Strict):
    height: int = Field(ge=0)
    width: int = Field(ge=0)


class Process(_Strict):
    terminal: bool = False
    consoleSize: ConsoleSize | None = None
    user: User = Field(default_factory=User)
    args: list[str] = Field(min_length=1)
    env: list[str] = Field(default_factory=list)
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = Field(default_factory=list)
    noNewPrivileges: bool = False
    oomScoreAdj: int | None = Field(None, ge=-1000, le=1000)
    apparmorProfile: str | None = None
    selinuxLabel: str | None = None

    @field_validator("args")
    @classmethod
    def _args(cls, args: list[str]) -> list[str]:
        if not args[0]:
            raise _At((0,), "args[0] (the program) must not be empty")
        return args

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, cwd: str) -> str:
        if not cwd.startswith("/"):
            raise ValueError(f"must be an absolute path, got {cwd!r}")
        return cwd

    @field_validator("env")
    @classmethod
    def _env(cls, env: list[str]) -> list[str]:
        for i, item in enumerate(env):
            if "=" not in item or item.startswith("="):
                raise _At((i,), f"entry {item!r} must look like NAME=value")
        return env

    @field_validator("apparmorProfile")
    @classmethod
    def _apparmor(cls, v: str | None) -> str | None:
        return _refuse_if_set(v, "apparmorProfile", "this host has no AppArmor integration")

    @field_validator("selinuxLabel")
    @classmethod
    def _selinux(cls, v: str | None) -> str | None:
        return _refuse_if_set(v, "selinuxLabel", "this host has no SELinux integration")

    @model_validator(mode="after")
    def _unique_rlimits(self) -> Process:
        seen = set()
        for i, rl in enumerate(self.rlimits):
            if rl.type in seen:
                raise _At(("rlimits", i, "type"), f"{rl.type} is given twice")
            seen.add(rl.type)
        return self


class Root(_Strict):
    path: str
    readonly: bool = False
    # A gvmrt extension (runc ignores it): read-only base layers from the local layer store,
    # bottom first, stacked under `path` (the bundle's own top layer) as OverlayFS lowerdirs.
    layers: list[Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]] = Field(
        default_factory=list, description="base layers from the local layer store (`gvmrt layer add`), bottom "
                                          "first, under root.path (spec/pack.md, Layers)")

    @field_validator("path")
    @classmethod
    def _path(cls, p: str) -> str:
        if not p:
            raise ValueError("must name the root filesystem directory (e.g. \"rootfs\")")
        return p


class Mount(_Strict):
    destination: str
    type: str | None = None
    source: str | None = None
    options: list[str] = Field(default_factory=list)
    uidMappings: list[Any] | None = None
    gidMappings: list[Any] | None = None

    @field_validator("destination")
    @classmethod
    def _dest(cls, d: str) -> str:
        if not d.startswith("/"):
            raise ValueError(f"must be an absolute path inside the container, got {d!r}")
        return d

    @field_validator("uidMappings", "gidMappings")
    @classmethod
    def _idmapped(cls, v: Any) -> Any:
        return _refuse_if_set(v, "id-mapped mounts", "not implemented yet")


class IDMapping(_Strict):
    containerID: int = Field(ge=0, le=ID_MAX)
    hostID: int = Field(ge=0, le=ID_MAX)
    size: int = Field(ge=1, le=ID_MAX)


class Namespace(_Strict):
    type: Literal["pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"]
    path: str | None = None


class SeccompArg(_Strict):
    index: int = Field(ge=0, le=5)
    value: int = Field(ge=0, le=2**64 - 1)
    valueTwo: int = Field(0, ge=0, le=2**64 - 1)
    op: str


class SeccompSyscall(_Strict):
    names: list[str] = Field(min_length=1)
    action: str
    errnoRet: int | None = None
    args: list[SeccompArg] = Field(default_factory=list)


class Seccomp(_Strict):
    defaultAction: str
    defaultErrnoRet: int | None = None
    architectures: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)
    listenerPath: str | None = None
    listenerMetadata: str | None = None
    syscalls: list[SeccompSyscall] = Field(default_factory=list)

    @field_validator("listenerPath")
    @classmethod
    def _listener(cls, v: str | None) -> str | None:
        return _refuse_if_set(v, "listenerPath", "seccomp user notification needs a listener gvmrt does not run")


class DeviceCgroup(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    allow: bool
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    access: str | None = None


class Resources(BaseModel):
    # Resource limits need a delegated cgroup, which this class of host does not give unprivileged
    # users (DESIGN.md §4): gvmrt reads them only to say on stderr that they are not applied.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    devices: list[DeviceCgroup] = Field(default_factory=list)


class Linux(_Strict):
    namespaces: list[Namespace] = Field(default_factory=list)
    uidMappings: list[IDMapping] = Field(default_factory=list)
    gidMappings: list[IDMapping] = Field(default_factory=list)
    devices: list[dict[str, Any]] = Field(default_factory=list)
    cgroupsPath: str | None = None
    resources: Resources | None = None
    sysctl: dict[str, str] = Field(default_factory=dict)
    seccomp: Seccomp | None = None
    rootfsPropagation: Literal["private", "rprivate", "slave", "rslave", "shared", "rshared",
                               "unbindable", "runbindable"] | None = None
    maskedPaths: list[str] = Field(default_factory=list)
    readonlyPaths: list[str] = Field(default_factory=list)
    mountLabel: str | None = None
    intelRdt: dict[str, Any] | None = None
    personality: dict[str, Any] | None = None
    timeOffsets: dict[str, Any] | None = None

    @field_validator("namespaces")
    @classmethod
    def _unique(cls, nss: list[Namespace]) -> list[Namespace]:
        seen = set()
        for i, ns in enumerate(nss):
            if ns.type in seen:
                raise _At((i, "type"), f"namespace {ns.type!r} is listed twice")
            seen.add(ns.type)
        return nss

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _refuse_if_set(v, "linux.devices", "a rootless jail cannot create device nodes; "
                              "gvmrt provides null, zero, full, random, urandom, tty and pts")

    @field_validator("mountLabel")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        return _refuse_if_set(v, "mountLabel", "this host has no SELinux integration")

    @field_validator("intelRdt", "personality", "timeOffsets")
    @classmethod
    def _unsupported(cls, v: Any, info: Any) -> Any:
        return _refuse_if_set(v, info.field_name, "not implemented")

    @field_validator("maskedPaths", "readonlyPaths")
    @classmethod
    def _abs(cls, paths: list[str]) -> list[str]:
        for i, p in enumerate(paths):
            if not p.startswith("/"):
                raise _At((i,), f"{p!r} must be an absolute path inside the container")
        return paths


class Hooks(_Strict):
    prestart: list[Any] = Field(default_factory=list)
    createRuntime: list[Any] = Field(default_factory=list)
    createContainer: list[Any] = Field(default_factory=list)
    startContainer: list[Any] = Field(default_factory=list)
    poststart: list[Any] = Field(default_factory=list)
    poststop: list[Any] = Field(default_factory=list)

    @model_validator(mode="after")
    def _none(self) -> Hooks:
        for name in type(self).model_fields:
            if getattr(self, name):
                raise _At((name,), "OCI hooks are not supported yet; remove them")
        return self


class Dns(_Strict):
    """gvm.dns: how the jail's DNS stub treats names (spec/policy.md, DNS)."""

    unknown_delay_ms: int = Field(300, ge=0, le=60_000)
    tunnel_threshold: int = Field(20, ge=2, le=100_000)
    tunnel_delay_ms: int = Field(2000, ge=0, le=60_000)


class FsRule(_Strict):
    """A class of changed paths and what happens to them (spec/filesystem.md)."""

    paths: list[str] = Field(min_length=1, description="globs relative to the workspace: * one segment, ** any depth")
    action: Literal["commit", "review", "discard"]


class Workspace(_Strict):
    source: str = Field(min_length=1, description="host directory (relative to the bundle, or absolute); never "
                                                  "written by the container")
    destination: str = Field(min_length=2, pattern=r"^/", description="where the jail sees it")


class Filesystem(_Strict):
    """gvm.filesystem: workspaces the agent may propose changes to (spec/filesystem.md)."""

    workspaces: list[Workspace] = Field(default_factory=list)
    rules: list[FsRule] = Field(default_factory=list)
    default: Literal["commit", "review", "discard"] = "review"


class Audit(_Strict):
    """gvm.audit: how the container's audit log is signed (spec/audit.md)."""

    key: str | None = Field(None, min_length=1, description="Ed25519 private key file (PEM, mode 0600) that "
                            "signs the log's seals; relative to the bundle directory, or absolute. Default: the "
                            "host config's audit.key, else the host's key from `gvmrt audit keygen`")
    require_signed: bool = Field(False, description="refuse to create the container when no signing key is "
                                 "configured, rather than keep an unsigned log")


class Gvm(_Strict):
    """The `gvm` extension: governance settings (spec/bundle.md, spec/policy.md).

    Its presence makes a bundle governed: its own network namespace whose only way out is the
    sidecar (spec/policy.md). ``egress``, ``credentials``, ``dns`` and ``audit`` are specified and enforced; the other
    groups are reserved for later issues and accepted as any JSON object, not enforced yet (create
    says so).
    Any other key is refused like a typo.
    """

    egress: Egress | None = None
    credentials: list[Credential] | None = None
    dns: Dns | None = None
    filesystem: Filesystem | None = None
    audit: Audit | None = None

    @field_validator("credentials")
    @classmethod
    def _unique(cls, creds: list[Credential] | None) -> list[Credential] | None:
        return None if creds is None else credential_names_unique(creds)


class Config(BaseModel):
    """The whole config.json. Unknown top-level properties are allowed (runtime-spec config.md)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    ociVersion: str
    process: Process
    root: Root
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] = Field(default_factory=list)
    hooks: Hooks | None = None
    annotations: dict[str, str] = Field(default_factory=dict)
    linux: Linux = Field(default_factory=Linux)
    gvm: Gvm | None = None

    @field_validator("ociVersion")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.startswith("1."):
            raise ValueError(f"gvmrt implements runtime-spec 1.x, this config says {v!r}")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and len(v.encode()) > 64:
            raise ValueError("must be at most 64 bytes (HOST_NAME_MAX)")
        return v

    @model_validator(mode="after")
    def _needs_namespaces(self) -> Config:
        # runtime-spec config.md: hostname/domainname can only be set with a new UTS namespace.
        # Without one (gvmrt run as root, no user namespace) they would rename the host, so even
        # an empty string is refused.
        types = {ns.type for ns in self.linux.namespaces}
        for name in ("hostname", "domainname"):
            if getattr(self, name) is not None and "uts" not in types:
                raise _At((name,), f"{name} needs a 'uts' entry in linux.namespaces "
                                   "(otherwise it would rename the host)")
        for key in self.linux.sysctl:
            why = _sysctl_refusal(key, types)
            if why:
                raise _At(("linux", "sysctl", key), why)
        return self


# Namespaced sysctls (runc libcontainer/configs/validate/validator.go, sysctl()): only these can be
# set without changing the host; any other key is refused before anything runs.
_IPC_SYSCTLS = {"kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall",
                "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced"}


def _sysctl_refusal(key: str, ns_types: set[str]) -> str | None:
    """Why sysctl ``key`` cannot be set in a container with namespaces ``ns_types``, or None."""
    name = key.replace("/", ".")
    if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
        return None if "ipc" in ns_types else f"{key} belongs to the IPC namespace; add an 'ipc' namespace"
    if name.startswith("net."):
        return None if "network" in ns_types else f"{key} belongs to the network namespace; add a 'network' namespace"
    if name == "kernel.domainname":
        return None if "uts" in ns_types else f"{key} belongs to the UTS namespace; add a 'uts' namespace"
    if name == "kernel.hostname":
        return f"{key} cannot be set here; use the top-level hostname field"
    return f"{key} is not namespaced (setting it would change the host); only kernel.msg*, kernel.sem, " \
           "kernel.shm*, fs.mqueue.*, net.* and kernel.domainname can be set"


# --- parsing with errors a person can act on -----------------------------------------------------

def load_json(raw: bytes, file: str) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(file, "", f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}") from exc


def parse_config(raw: bytes, file: str = "config.json") -> Config:
    """Validate config.json bytes; raise ConfigError naming the first problem's JSON pointer."""
    data = load_json(raw, file)
    if not isinstance(data, dict):
        raise ConfigError(file, "", "must be a JSON object")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        pointer, message = errors_of(exc, data)[0]
        raise ConfigError(file, pointer, message) from None


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://gvmrt.dev/schema/config.schema.json"
    schema["title"] = "gvmrt bundle config.json (OCI runtime-spec 1.x + gvm extension)"
    return schema


# --- `gvmrt spec` -------------------------------------------------------------------------------

def default_config(*, rootless: bool, uid: int, gid: int, args: list[str] | None = None) -> dict[str, Any]:
    """A starting config.json: runc's `spec --rootless` shape, no capabilities, the agent seccomp profile.

    uid/gid mappings are left out on purpose: gvmrt (like crun) maps the invoking user to root
    when a user namespace has none, so the same committed bundle runs for every teammate.
    """
    from gvmrt.linux.seccomp import default_profile

    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup")]
    if rootless:
        namespaces.insert(0, {"type": "user"})
    cfg: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args or ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "agent",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            # A fresh sysfs shows only the jail's own network devices; where the kernel refuses it
            # (no private network namespace) gvmrt falls back to a read-only bind of the host's.
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                            "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            "seccomp": default_profile(),
        },
    }
    if not rootless:
        cfg["mounts"][1]["options"] = ["nosuid", "strictatime", "mode=755", "size=65536k"]
    # Governed from the first run: the sidecar with the default policy (caution: unmatched
    # requests are delayed and flagged). spec/policy.md shows rules to add.
    cfg["gvm"] = {"egress": {"default": {"action": "delay", "ms": 300}, "rules": []}}
    return cfg
