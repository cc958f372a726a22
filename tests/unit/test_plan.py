"""Unit tests for gvmrt.plan: mount options, the compiled plan, and the plan cache.

Pure: nothing is mounted and no process is started.  The cache tests point gvmrt.plan.cache_dir at
tmp_path (as root the real one is /var/cache/gvmrt/plans, which XDG_CACHE_HOME does not move).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gvmrt.plan as plan_mod
import gvmrt.spec
from gvmrt.errors import ConfigError
from gvmrt.linux import sys as lsys
from gvmrt.plan import PLAN_VERSION, PROPAGATION, cache_key, compile_config, load_plan, parse_mount_options
from gvmrt.spec import parse_config


def config(**top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "ociVersion": "1.1.0",
        "process": {"args": ["/bin/sh"]},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "user"}, {"type": "pid"}, {"type": "mount"}]},
    }
    cfg.update(top)
    return cfg


def compile_(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    warnings: list[str] = []
    return compile_config(parse_config(json.dumps(cfg).encode()), warnings), warnings


def mounts_of(*mounts: dict[str, Any]) -> list[dict[str, Any]]:
    return compile_(config(mounts=list(mounts)))[0]["mounts"]


# --- parse_mount_options -----------------------------------------------------------------------

def test_ro_and_rw_flip_in_order() -> None:
    assert parse_mount_options(["ro"])[0] == lsys.MS_RDONLY
    assert parse_mount_options(["ro", "rw"])[0] == 0
    assert parse_mount_options(["rw", "ro"])[0] == lsys.MS_RDONLY


def test_clearing_words_undo_setting_words() -> None:
    flags = parse_mount_options(["nosuid", "nodev", "noexec", "suid", "dev"])[0]
    assert flags == lsys.MS_NOEXEC


def test_rbind_sets_bind_and_rec() -> None:
    flags, prop, data, bind = parse_mount_options(["rbind"])
    assert (flags, prop, data, bind) == (lsys.MS_BIND | lsys.MS_REC, 0, [], True)


def test_bind_is_not_recursive() -> None:
    flags, _, _, bind = parse_mount_options(["bind"])
    assert bind and flags == lsys.MS_BIND


@pytest.mark.parametrize(("word", "expected"), [
    ("private", lsys.MS_PRIVATE), ("rprivate", lsys.MS_PRIVATE | lsys.MS_REC),
    ("slave", lsys.MS_SLAVE), ("rslave", lsys.MS_SLAVE | lsys.MS_REC),
    ("shared", lsys.MS_SHARED), ("rshared", lsys.MS_SHARED | lsys.MS_REC),
    ("unbindable", lsys.MS_UNBINDABLE), ("runbindable", lsys.MS_UNBINDABLE | lsys.MS_REC),
])
def test_propagation_is_kept_apart_from_flags(word: str, expected: int) -> None:
    # Propagation needs its own mount(2) call: it cannot be combined with other flags.
    assert parse_mount_options([word, "nosuid"]) == (lsys.MS_NOSUID, expected, [], False)


def test_unknown_words_are_filesystem_data_in_order() -> None:
    flags, _, data, _ = parse_mount_options(["nosuid", "mode=755", "size=65536k", "strictatime", "newinstance"])
    assert flags == lsys.MS_NOSUID | lsys.MS_STRICTATIME
    assert data == ["mode=755", "size=65536k", "newinstance"]


def test_defaults_is_no_flag() -> None:
    assert parse_mount_options(["defaults"]) == (0, 0, [], False)


# --- mounts in the plan -------------------------------------------------------------------------

def test_tmpfs_mount_keeps_flags_and_data() -> None:
    (m,) = mounts_of({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                      "options": ["nosuid", "nodev", "mode=1777"]})
    assert m == {"dest": "/tmp", "type": "tmpfs", "source": "tmpfs", "flags": lsys.MS_NOSUID | lsys.MS_NODEV,
                 "rec": False, "prop": 0, "data": ["mode=1777"]}


def test_source_defaults_to_the_type() -> None:
    (m,) = mounts_of({"destination": "/proc", "type": "proc"})
    assert m["source"] == "proc"


def test_rbind_with_flags_becomes_a_recursive_bind_and_a_remount() -> None:
    (m,) = mounts_of({"destination": "/work", "type": "none", "source": "work",
                      "options": ["rbind", "ro", "nosuid", "rslave"]})
    # The executor binds first, then remounts with the flags, so BIND/REC are not in "flags".
    assert m == {"dest": "/work", "type": "bind", "source": "work", "flags": lsys.MS_RDONLY | lsys.MS_NOSUID,
                 "rec": True, "prop": lsys.MS_SLAVE | lsys.MS_REC, "data": []}


def test_type_bind_implies_bind() -> None:
    (m,) = mounts_of({"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"})
    assert (m["type"], m["rec"], m["flags"]) == ("bind", False, 0)


def test_bind_option_without_type() -> None:
    (m,) = mounts_of({"destination": "/x", "source": "/srv/x", "options": ["bind"]})
    assert m["type"] == "bind"


@pytest.mark.parametrize("mtype", ["proc", "tmpfs", "devpts", "mqueue", "sysfs", "cgroup", "cgroup2"])
def test_kernel_filesystems_a_jail_may_mount(mtype: str) -> None:
    (m,) = mounts_of({"destination": "/m", "type": mtype, "source": mtype})
    assert m["type"] == mtype


@pytest.mark.parametrize("mtype", ["ext4", "nfs", "overlay", "fuse.sshfs", "btrfs"])
def test_other_filesystem_types_are_refused(mtype: str) -> None:
    with pytest.raises(ConfigError) as info:
        mounts_of({"destination": "/m", "type": mtype, "source": "/dev/sda1"})
    assert info.value.pointer == "/mounts/0/type"


@pytest.mark.parametrize("word", ["nosiud", "rro", "idmap", "mode=755"])
def test_bind_mount_refuses_words_it_would_ignore(word: str) -> None:
    with pytest.raises(ConfigError) as info:
        mounts_of({"destination": "/m", "type": "bind", "source": "/srv", "options": ["rbind", "ro", word]})
    assert info.value.pointer == "/mounts/0/options/2"
    assert repr(word) in info.value.message


# --- process, namespaces and the rest -----------------------------------------------------------

def test_capability_bitmasks() -> None:
    cfg = config()
    cfg["process"]["capabilities"] = {
        "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
        "effective": ["CAP_NET_BIND_SERVICE"],
        "permitted": ["CAP_NET_BIND_SERVICE", "CAP_CHECKPOINT_RESTORE"],
    }
    caps = compile_(cfg)[0]["process"]["caps"]
    # <linux/capability.h>: CAP_CHOWN 0, CAP_KILL 5, CAP_NET_BIND_SERVICE 10, CAP_CHECKPOINT_RESTORE 40.
    assert caps == {"bounding": 1 << 0 | 1 << 5 | 1 << 10, "effective": 1 << 10, "inheritable": 0,
                    "permitted": 1 << 10 | 1 << 40, "ambient": 0}


def test_no_capabilities_object_means_none_at_all() -> None:
    # runc's reading too; "keep whatever the init has" would hand the agent every capability.
    assert compile_(config())[0]["process"]["caps"] == {
        "bounding": 0, "effective": 0, "inheritable": 0, "permitted": 0, "ambient": 0}


def test_ambient_capability_that_cannot_be_raised_is_noticed() -> None:
    cfg = config()
    cfg["process"]["capabilities"] = {"ambient": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
    _, warnings = compile_(cfg)
    assert any("ambient CAP_KILL not raised" in w for w in warnings)


def test_rlimit_numbers() -> None:
    cfg = config()
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                                 {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
                                 {"type": "RLIMIT_AS", "soft": 2**64 - 1, "hard": 2**64 - 1}]
    # <asm-generic/resource.h>: RLIMIT_NOFILE 7, RLIMIT_CORE 4, RLIMIT_AS 9.
    assert compile_(cfg)[0]["process"]["rlimits"] == [[7, "RLIMIT_NOFILE", 1024, 4096], [4, "RLIMIT_CORE", 0, 0],
                                                      [9, "RLIMIT_AS", 2**64 - 1, 2**64 - 1]]


def test_process_defaults() -> None:
    proc = compile_(config())[0]["process"]
    assert proc == {"args": ["/bin/sh"], "env": [], "cwd": "/", "terminal": False, "console_size": None, "uid": 0, "gid": 0,
                    "groups": [], "umask": 0o022,
                    "caps": {"bounding": 0, "effective": 0, "inheritable": 0, "permitted": 0, "ambient": 0},
                    "nnp": False, "oom_score_adj": None,
                    "rlimits": []}


def test_user_and_umask() -> None:
    cfg = config()
    cfg["process"]["user"] = {"uid": 1000, "gid": 100, "umask": 0o077, "additionalGids": [5, 27]}
    proc = compile_(cfg)[0]["process"]
    assert (proc["uid"], proc["gid"], proc["umask"], proc["groups"]) == (1000, 100, 0o077, [5, 27])


def test_namespaces_and_mappings() -> None:
    cfg = config(linux={"namespaces": [{"type": "user"}, {"type": "pid"}, {"type": "mount"},
                                       {"type": "network", "path": "/run/netns/agent"}],
                        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
                        "gidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]})
    plan = compile_(cfg)[0]
    assert plan["namespaces"] == [["user", None], ["pid", None], ["mount", None], ["network", "/run/netns/agent"]]
    assert plan["uid_mappings"] == [[0, 100000, 65536]]
    assert plan["gid_mappings"] == [[0, 1000, 1]]


def test_mount_namespace_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        compile_(config(linux={"namespaces": [{"type": "user"}, {"type": "pid"}]}))
    assert info.value.pointer == "/linux/namespaces" and "'mount' namespace" in info.value.message


def test_pid_namespace_is_required() -> None:
    # Without a delegated cgroup, the pid namespace is how kill and delete reach every process.
    with pytest.raises(ConfigError) as info:
        compile_(config(linux={"namespaces": [{"type": "user"}, {"type": "mount"}]}))
    assert info.value.pointer == "/linux/namespaces" and "'pid' namespace" in info.value.message


def test_rootfs_propagation_defaults_to_rprivate() -> None:
    assert compile_(config())[0]["rootfs_propagation"] == PROPAGATION["rprivate"]
    cfg = config(linux={"namespaces": [{"type": "pid"}, {"type": "mount"}], "rootfsPropagation": "rslave"})
    assert compile_(cfg)[0]["rootfs_propagation"] == lsys.MS_SLAVE | lsys.MS_REC


def test_seccomp_is_compiled_to_base64_bpf() -> None:
    cfg = config()
    cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW",
                               "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_ERRNO"}]}
    bpf = base64.b64decode(compile_(cfg)[0]["seccomp"])
    assert bpf and len(bpf) % 8 == 0  # whole struct sock_filter instructions
    assert compile_(config())[0]["seccomp"] is None


def test_resources_and_cgroups_path_are_noticed_not_applied() -> None:
    cfg = config(linux={"namespaces": [{"type": "pid"}, {"type": "mount"}], "cgroupsPath": "/agents/a",
                        "resources": {"memory": {"limit": 1 << 30}, "devices": [{"allow": True, "access": "rwm"}]}})
    _, warnings = compile_(cfg)
    assert warnings == [
        "linux.resources.{memory} not applied: this host does not delegate a cgroup to gvmrt (use process.rlimits)",
        "linux.resources.devices allow rules are moot: every jail mount is nodev except the default devices and devpts",
        "linux.cgroupsPath '/agents/a' ignored: no cgroup delegation on this host",
    ]


def test_plan_is_json_and_holds_no_host_facts() -> None:
    plan, _ = compile_(config(hostname="agent", linux={"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]}))
    assert json.loads(json.dumps(plan)) == plan
    assert plan["plan"] == PLAN_VERSION
    assert str(os.getuid()) not in json.dumps(plan["uid_mappings"])


# --- the cache ----------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "plans"
    monkeypatch.setattr(plan_mod, "cache_dir", lambda: str(d))
    return d


def cache_file(cache: Path, raw: bytes) -> Path:
    key = cache_key(raw)
    return cache / key[:2] / f"{key}.json"


def test_load_plan_twice_returns_equal_plans_the_second_from_the_cache(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps(config(hostname="a", linux={"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}]})).encode()
    first = load_plan(raw, "config.json")
    assert cache_file(cache, raw).is_file()

    def no_parsing(*_: Any, **__: Any) -> Any:
        raise AssertionError("a cached plan must not be validated again")

    monkeypatch.setattr(gvmrt.spec, "parse_config", no_parsing)
    assert load_plan(raw, "config.json") == first


def test_cache_key_follows_content(cache: Path) -> None:
    a = json.dumps(config()).encode()
    b = json.dumps(config(), indent=2).encode()
    assert cache_key(a) != cache_key(b)
    assert load_plan(a, "config.json") == load_plan(b, "config.json")
    assert len(list(cache.glob("*/*.json"))) == 2


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"plan": 0, "mounts": "stale"}'])
def test_corrupt_or_old_cache_entry_is_recompiled(cache: Path, content: bytes) -> None:
    raw = json.dumps(config()).encode()
    path = cache_file(cache, raw)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    plan = load_plan(raw, "config.json")
    assert plan["plan"] == PLAN_VERSION and plan["mounts"] == []
    assert json.loads(path.read_bytes()) == plan  # and the entry is repaired


def test_unwritable_cache_does_not_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(plan_mod, "cache_dir", lambda: str(blocker / "plans"))
    assert load_plan(json.dumps(config()).encode(), "config.json")["plan"] == PLAN_VERSION


def test_errors_are_not_cached(cache: Path) -> None:
    raw = json.dumps(config(ociVersion="2.0.0")).encode()
    for _ in range(2):
        with pytest.raises(ConfigError):
            load_plan(raw, "config.json")
    assert not cache.exists() or not list(cache.glob("*/*.json"))


@pytest.mark.parametrize(("cfg", "pointer"), [
    (config(ociVersion="2.0.0"), "/ociVersion"),                                          # parse error
    (config(mounts=[{"destination": "/d", "type": "ext4", "source": "/dev/sda"}]), "/mounts/0/type"),  # compile
])
def test_config_error_names_the_file_the_caller_gave(cache: Path, cfg: dict[str, Any], pointer: str) -> None:
    path = "/home/me/bundles/agent/config.json"
    with pytest.raises(ConfigError) as info:
        load_plan(json.dumps(cfg).encode(), path)
    assert (info.value.file, info.value.pointer) == (path, pointer)
    assert str(info.value).startswith(f"{path}: {pointer}: ")


def test_syntax_error_names_the_file_the_caller_gave(cache: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_plan(b"{\n  oops\n}", "bundles/x/config.json")
    assert str(info.value).startswith("bundles/x/config.json: line 2 column 3: not valid JSON")


def test_cache_hit_imports_neither_pydantic_nor_libseccomp(tmp_path: Path) -> None:
    # DESIGN.md §3: the hot lifecycle commands only read the cached plan.  Two fresh interpreters:
    # the first fills the cache, the second must find it without loading the cold-path modules.
    code = f"""
import json, sys
import gvmrt.plan as p
p.cache_dir = lambda: {str(tmp_path)!r}
p.load_plan(json.dumps({config()!r}).encode(), "config.json")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pyseccomp") or m == "gvmrt.spec"))
"""
    def run() -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert run().strip() != "[]"  # the miss validates and compiles
    assert run().strip() == "[]"  # the hit does not
