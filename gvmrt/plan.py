"""config.json → plan: everything the container init needs, as plain JSON-able data.

"Compile in the parent, apply in the child" (DESIGN.md §3): validation (pydantic), mount-option
parsing and seccomp compilation (libseccomp) happen here, once per config content. The plan is
cached by the SHA-256 of config.json, the gvmrt version and the machine, so the hot lifecycle
commands only read a small JSON file (they never import pydantic or pyseccomp).

The plan never holds host facts (the invoking uid, /etc/subuid, rlimit hard limits, the bundle's
location): those are checked at create time by gvmrt.runtime, because they differ between runs.
"""

from __future__ import annotations

import os

from gvmrt import __version__
from gvmrt import _json
from gvmrt.linux import sys as lsys

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any

# Part of the cache key: bump it whenever validation or the plan's shape changes, so a plan cached
# under older, laxer rules is never used (2: stricter JSON types, sysctl and bind-option checks;
# 4: gvm is a validated model, the plan carries the compiled-checked egress policy, not raw gvm;
# 5: "gvm" replaces "egress": the sidecar's listeners, CA path and the governed environment;
# 6: the not-governed notice moved out of the plan's warnings; 7: gvm.credentials; 8: gvm.dns;
# 9: gvm.audit; 10: root.layers; 11: gvm.filesystem).
PLAN_VERSION = 11

# runc's libcontainer/specconv mountFlags table: option → (clear?, flag).
MOUNT_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, lsys.MS_SYNCHRONOUS), "atime": (True, lsys.MS_NOATIME),
    "bind": (False, lsys.MS_BIND), "defaults": (False, 0), "dev": (True, lsys.MS_NODEV),
    "diratime": (True, lsys.MS_NODIRATIME), "dirsync": (False, lsys.MS_DIRSYNC),
    "exec": (True, lsys.MS_NOEXEC), "mand": (False, lsys.MS_MANDLOCK), "noatime": (False, lsys.MS_NOATIME),
    "nodev": (False, lsys.MS_NODEV), "nodiratime": (False, lsys.MS_NODIRATIME),
    "noexec": (False, lsys.MS_NOEXEC), "nomand": (True, lsys.MS_MANDLOCK), "norelatime": (True, lsys.MS_RELATIME),
    "nostrictatime": (True, lsys.MS_STRICTATIME), "nosuid": (False, lsys.MS_NOSUID),
    "nosymfollow": (False, lsys.MS_NOSYMFOLLOW),
    "rbind": (False, lsys.MS_BIND | lsys.MS_REC), "relatime": (False, lsys.MS_RELATIME),
    "remount": (False, lsys.MS_REMOUNT), "ro": (False, lsys.MS_RDONLY), "rw": (True, lsys.MS_RDONLY),
    "strictatime": (False, lsys.MS_STRICTATIME), "suid": (True, lsys.MS_NOSUID), "sync": (False, lsys.MS_SYNCHRONOUS),
}
PROPAGATION = {
    "private": lsys.MS_PRIVATE, "rprivate": lsys.MS_PRIVATE | lsys.MS_REC,
    "shared": lsys.MS_SHARED, "rshared": lsys.MS_SHARED | lsys.MS_REC,
    "slave": lsys.MS_SLAVE, "rslave": lsys.MS_SLAVE | lsys.MS_REC,
    "unbindable": lsys.MS_UNBINDABLE, "runbindable": lsys.MS_UNBINDABLE | lsys.MS_REC,
}
# Filesystem types a jail may mount itself. Anything else (ext4 on a block device, nfs, fuse...)
# needs host privilege or a device node the jail does not have, so it is refused at compile time.
MOUNT_TYPES = {"proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2", "bind", "none", None}

# Top-level properties of the runtime-spec for other platforms: ignored without a notice.
OTHER_PLATFORMS = {"windows", "solaris", "vm", "zos", "freebsd"}

NS_FLAGS = {
    "user": lsys.CLONE_NEWUSER, "mount": lsys.CLONE_NEWNS, "pid": lsys.CLONE_NEWPID,
    "network": lsys.CLONE_NEWNET, "ipc": lsys.CLONE_NEWIPC, "uts": lsys.CLONE_NEWUTS,
    "cgroup": lsys.CLONE_NEWCGROUP, "time": lsys.CLONE_NEWTIME,
}


def cache_key(raw: bytes) -> str:
    from _sha256 import sha256  # hashlib would load OpenSSL (~3 ms)
    return sha256(b"gvmrt-plan\0%d\0%s\0%s\0" % (PLAN_VERSION, __version__.encode(), lsys.MACHINE.encode())
                  + raw).hexdigest()


def parse_mount_options(options: list[str]) -> tuple[int, int, list[str], bool]:
    """(flags, propagation flags, data options, is-bind) from an OCI mount's options."""
    flags, prop, data, bind = 0, 0, [], False
    for opt in options:
        if opt in PROPAGATION:
            prop |= PROPAGATION[opt]
        elif opt in MOUNT_FLAGS:
            clear, flag = MOUNT_FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
            if flag & lsys.MS_BIND:
                bind = True
        else:
            data.append(opt)
    return flags, prop, data, bind


def compile_config(cfg: Any, warnings: list[str]) -> dict[str, Any]:
    """A validated gvmrt.spec.Config → plan dict. Appends notices for the user to ``warnings``."""
    from gvmrt.errors import ConfigError
    from gvmrt.spec import CAP_NUMBERS, RLIMITS

    p = cfg.process
    # The runtime-spec makes runtimes ignore unknown top-level properties, so a misspelt one
    # ("mount" for "mounts") would silently drop a setting: point out near-misses on stderr.
    import difflib
    known = list(type(cfg).model_fields)
    for key in sorted(set(cfg.model_extra or {}) - OTHER_PLATFORMS):
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            warnings.append(f"top-level property {key!r} is not one gvmrt reads and is ignored; "
                            f"did you mean {close[0]!r}?")
    ns_types = [ns.type for ns in cfg.linux.namespaces]
    if "mount" not in ns_types:
        raise ConfigError("config.json", "/linux/namespaces",
                          "gvmrt needs a 'mount' namespace (it mounts the overlay root filesystem there)")
    i = ns_types.index("mount")
    if cfg.linux.namespaces[i].path:
        # The overlay root, the config's mounts and pivot_root would land in that namespace,
        # under the feet of whatever already lives there.
        raise ConfigError("config.json", f"/linux/namespaces/{i}/path",
                          "gvmrt builds the root filesystem in a new mount namespace and cannot join one; "
                          "remove the path")

    mounts = []
    for i, m in enumerate(cfg.mounts):
        flags, prop, data, bind = parse_mount_options(m.options)
        mtype = m.type
        if mtype == "bind":
            bind = True
        if mtype not in MOUNT_TYPES:
            raise ConfigError("config.json", f"/mounts/{i}/type",
                              f"mount type {mtype!r} cannot be mounted by a rootless jail "
                              f"(use a bind mount of a host directory, or one of proc, tmpfs, devpts, mqueue, sysfs, cgroup)")
        if bind and not m.source:
            raise ConfigError("config.json", f"/mounts/{i}/source", "a bind mount needs a source path on the host")
        if not bind and mtype in (None, "none", "bind"):
            raise ConfigError("config.json", f"/mounts/{i}/options",
                              "a mount without a filesystem type must have the \"bind\" or \"rbind\" option")
        if bind and data:
            # A bind mount has no filesystem to pass data options to, so the kernel ignores them:
            # a misspelt flag ("nosiud") or one gvmrt does not implement (crun's "rro", "idmap")
            # would silently leave the mount more permissive than the config says.
            j = m.options.index(data[0])
            raise ConfigError("config.json", f"/mounts/{i}/options/{j}",
                              f"{data[0]!r} is not a mount flag gvmrt knows, and a bind mount takes no "
                              f"filesystem options; check the spelling or remove it")
        mounts.append({"dest": m.destination, "type": "bind" if bind else mtype, "source": m.source or mtype,
                       "flags": flags & ~(lsys.MS_BIND | lsys.MS_REC) if bind else flags,
                       "rec": bool(flags & lsys.MS_REC), "prop": prop, "data": data})

    # No "capabilities" object means none at all (runc): never "keep whatever the init has".
    caps = {k: 0 for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    if p.capabilities is not None:
        caps = {k: sum(1 << CAP_NUMBERS[n] for n in getattr(p.capabilities, k))
                for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        stuck = [n for n in p.capabilities.ambient
                 if n not in p.capabilities.permitted or n not in p.capabilities.inheritable]
        if stuck:
            warnings.append(f"process.capabilities.ambient {', '.join(stuck)} not raised: the kernel only "
                            "raises ambient capabilities that are also permitted and inheritable")

    seccomp = None
    if cfg.linux.seccomp is not None:
        from gvmrt.linux.seccomp import compile_profile
        bpf = compile_profile(cfg.linux.seccomp.model_dump(exclude_none=True))
        import binascii
        seccomp = binascii.b2a_base64(bpf, newline=False).decode()

    res = cfg.linux.resources
    if res is not None:
        ignored = sorted(k for k, v in res.model_dump(exclude_none=True).items() if v and k != "devices")
        if ignored:
            warnings.append(f"linux.resources.{{{','.join(ignored)}}} not applied: this host does not delegate a "
                            "cgroup to gvmrt (use process.rlimits)")
        if any(d.allow for d in res.devices):
            warnings.append("linux.resources.devices allow rules are moot: every jail mount is nodev except the "
                            "default devices and devpts")
    gvm = _gvm(cfg, ns_types, warnings)
    if cfg.linux.cgroupsPath:
        warnings.append(f"linux.cgroupsPath {cfg.linux.cgroupsPath!r} ignored: no cgroup delegation on this host")

    if "pid" not in ns_types:
        raise ConfigError("config.json", "/linux/namespaces",
                          "gvmrt needs a 'pid' namespace: without a delegated cgroup it is how gvmrt finds, and "
                          "kill and delete stop, every process of the container")

    return {
        "plan": PLAN_VERSION,
        "oci_version": cfg.ociVersion,
        "namespaces": [[ns.type, ns.path] for ns in cfg.linux.namespaces],
        "uid_mappings": [[m.containerID, m.hostID, m.size] for m in cfg.linux.uidMappings],
        "gid_mappings": [[m.containerID, m.hostID, m.size] for m in cfg.linux.gidMappings],
        "root": cfg.root.path,
        "root_layers": list(cfg.root.layers),
        "root_readonly": cfg.root.readonly,
        "rootfs_propagation": PROPAGATION[cfg.linux.rootfsPropagation or "rprivate"],
        "hostname": cfg.hostname,
        "domainname": cfg.domainname,
        "mounts": mounts,
        "masked": list(cfg.linux.maskedPaths),
        "readonly": list(cfg.linux.readonlyPaths),
        "sysctl": dict(cfg.linux.sysctl),
        "process": {
            "args": list(p.args), "env": _governed_env(p.env, gvm["credentials"]) if gvm else list(p.env),
            "cwd": p.cwd,
            "terminal": p.terminal,
            "console_size": [p.consoleSize.height, p.consoleSize.width] if p.consoleSize else None,
            "uid": p.user.uid, "gid": p.user.gid, "groups": list(p.user.additionalGids),
            "umask": p.user.umask if p.user.umask is not None else 0o022,
            "caps": caps, "nnp": p.noNewPrivileges, "oom_score_adj": p.oomScoreAdj,
            "rlimits": [[RLIMITS[r.type], r.type, r.soft, r.hard] for r in p.rlimits],
        },
        "seccomp": seccomp,
        "annotations": dict(cfg.annotations),
        "gvm": gvm,
        "warnings": warnings,
    }


# The jail's side of the sidecar (DESIGN.md §5): the explicit proxy's address, the ports captured
# transparently on every address, and where the per-container CA appears in the rootfs.
PROXY_PORT = 3128
CAPTURED_PORTS = (80, 443)
CA_PATH = "/etc/gvmrt/ca.pem"
NOT_GOVERNED = ("egress is not governed: {file} has no gvm section, so no sidecar runs "
                "(add \"gvm\": {{}} for the default caution policy; `gvmrt spec` writes one)")


def _gvm(cfg: Any, ns_types: list[str], warnings: list[str]) -> dict[str, Any] | None:
    """The governed part of the plan, or None (and a notice) for a plain OCI bundle."""
    from gvmrt.errors import ConfigError
    if cfg.gvm is None:
        return None  # gvmrt.runtime says so once the container exists (NOT_GOVERNED)
    # A governed jail gets a network namespace of its own, always: in the host's (or a shared
    # one) the agent would reach the network directly and the sidecar would govern nothing.
    if "network" not in ns_types:
        raise ConfigError("config.json", "/linux/namespaces",
                          "a bundle with a gvm section needs its own network namespace, the sidecar being its "
                          "only way out; add {\"type\": \"network\"}")
    i = ns_types.index("network")
    if cfg.linux.namespaces[i].path:
        raise ConfigError("config.json", f"/linux/namespaces/{i}/path",
                          "a bundle with a gvm section cannot join an existing network namespace: traffic there "
                          "would bypass the sidecar; remove the path")
    egress = _egress(cfg)
    ports = {port for rule in (cfg.gvm.egress.rules if cfg.gvm.egress else ()) for port in rule.ports or ()}
    creds = []
    for c in cfg.gvm.credentials or ():
        c = c.model_dump(mode="json", exclude_none=True)
        c.setdefault("placeholder", f"gvmrt-placeholder-{c['name']}")
        creds.append(c)
    return {
        "egress": egress if egress is not None else {},
        "credentials": creds,
        "dns": cfg.gvm.dns.model_dump() if cfg.gvm.dns is not None else {},
        "capture": sorted((ports | set(CAPTURED_PORTS)) - {PROXY_PORT}),
        "proxy_port": PROXY_PORT,
        "ca_path": CA_PATH,
        "audit": cfg.gvm.audit.model_dump() if cfg.gvm.audit is not None else {},
        "filesystem": cfg.gvm.filesystem.model_dump() if cfg.gvm.filesystem is not None else {},
    }


def _governed_env(env: list[str], credentials: list[dict[str, Any]]) -> list[str]:
    """process.env plus the proxy and trust variables and the credentials' placeholders; ours
    replace the config's (the agent changing them later gains nothing: every port but the
    captured ones is closed, and a placeholder is worth nothing outside the sidecar)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    ours = {c["env"]: c["placeholder"] for c in credentials if c.get("env")}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        ours[name] = ours[name.lower()] = proxy
    ours["NO_PROXY"] = ours["no_proxy"] = "localhost,127.0.0.1,::1"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        ours[name] = CA_PATH
    kept = [e for e in env if e.split("=", 1)[0] not in ours]
    return kept + [f"{k}={v}" for k, v in ours.items()]


def _egress(cfg: Any) -> dict[str, Any] | None:
    """The validated gvm.egress as plain JSON, after checking that the matcher can compile it.

    Validation has already checked each rule; compiling builds the regexes and host tables the
    sidecar will use, so a policy that cannot be compiled fails `gvmrt create` here, with the
    pointer of its rule, rather than the sidecar at start. The plan keeps the model's JSON (by
    alias, only what was set: it validates again to the same Egress), never the compiled tables.
    """
    egress = cfg.gvm.egress if cfg.gvm is not None else None
    if egress is None:
        return None
    from gvmrt.errors import ConfigError
    import re
    from gvmrt.policy.matcher import CompiledPolicy
    failures = (re.error, ValueError, OverflowError, RecursionError)
    try:
        CompiledPolicy.compile(egress)
    except failures as exc:
        pointer = "/gvm/egress"
        for i, rule in enumerate(egress.rules):
            try:
                CompiledPolicy.compile(egress.model_copy(update={"rules": [rule]}))
            except failures:
                pointer = f"/gvm/egress/rules/{i}"
                break
        raise ConfigError("config.json", pointer, f"the policy does not compile: {exc}") from None
    return egress.model_dump(mode="json", by_alias=True, exclude_unset=True)


def cache_dir() -> str:
    from gvmrt.statedir import is_host_root
    if is_host_root():
        return "/var/cache/gvmrt/plans"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gvmrt", "plans")


def load_plan(raw: bytes, file: str) -> dict[str, Any]:
    """The plan for config.json bytes ``raw``: from the cache, or validated, compiled and cached."""
    key = cache_key(raw)
    path = os.path.join(cache_dir(), key[:2], key + ".json")
    trusted = _private(os.path.dirname(path)) and _private(os.path.dirname(os.path.dirname(path)))
    try:
        if trusted and _private(path):
            with open(path, "rb") as f:
                plan = _json.loads(f.read())
            if plan.get("plan") == PLAN_VERSION:
                return plan
    except (OSError, ValueError):
        pass
    from gvmrt.errors import ConfigError
    from gvmrt.spec import parse_config
    try:
        cfg = parse_config(raw, file)
    except ConfigError as exc:
        # Report the file the user named, not the bare "config.json".
        raise ConfigError(file, exc.pointer, exc.message) from None
    try:
        plan = compile_config(cfg, [])
    except ConfigError as exc:
        raise ConfigError(file, exc.pointer, exc.message) from None
    if trusted or not os.path.exists(os.path.dirname(path)):
        _store(path, plan)
    return plan


def _private(path: str) -> bool:
    """Ours and writable by nobody else: a cached plan decides seccomp and capabilities, so one
    someone else could write is ignored (the config is validated again instead)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _store(path: str, plan: dict[str, Any]) -> None:
    # The cache is an optimisation: a read-only or full disk must not fail the container.
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(_json.dumps(plan))
        os.replace(tmp, path)
    except OSError:
        pass
