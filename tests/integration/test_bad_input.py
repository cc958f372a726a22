"""Bad input gets one clear line, a distinct exit code, and changes nothing on disk."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GVMRT, Bundles, Gvmrt

USAGE, RUNTIME = 2, 1


def assert_untouched(gv: Gvmrt, cid: str) -> None:
    assert gv.ok("list", "--quiet").out == ""
    assert not (gv.state_root / cid).exists()
    assert not gv.container_dir(cid).exists()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("gvmrt: ")
    return lines[0]


def create_fails(gv: Gvmrt, b: Path, code: int, *needles: str, cid: str = "bad") -> str:
    res = gv("create", "--bundle", str(b), cid)
    assert res.rc == code, res
    line = one_line(res.err)
    for needle in needles:
        assert needle in line, line
    assert_untouched(gv, cid)
    return line


def test_missing_bundle_dir(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, _ = rootless
    create_fails(gv, Path("/nonexistent/bundle"), USAGE, "bundle /nonexistent/bundle: no such directory")


def test_missing_config(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    (b / "config.json").unlink()
    create_fails(gv, b, USAGE, "no config.json", "gvmrt spec >")


def test_missing_rootfs(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    shutil.rmtree(b / "rootfs")
    create_fails(gv, b, USAGE, "/root/path", "is not a directory")


def test_config_not_json_names_line_and_column(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    (b / "config.json").write_text('{\n  "ociVersion": "1.1.0",\n  "process": {,\n}\n')
    create_fails(gv, b, USAGE, f"{b}/config.json", "line 3 column 15", "not valid JSON")


@pytest.mark.parametrize("edit, pointer, message", [
    (lambda c: c["process"].update(args=[]), "/process/args", "must be a non-empty list"),
    (lambda c: c["process"].update(args="sh"), "/process/args", "list"),
    (lambda c: c["process"].update(cwd="tmp"), "/process/cwd", "absolute path"),
    (lambda c: c["process"]["user"].update(uid=-1), "/process/user/uid", "greater than or equal to 0"),
    (lambda c: c["process"].update(noNewPrivilege=True), "/process/noNewPrivilege", "not a field gvmrt knows"),
    (lambda c: c["process"].update(apparmorProfile="docker-default"), "/process/apparmorProfile", "not supported"),
    (lambda c: c.update(ociVersion="2.0.0"), "/ociVersion", "1.x"),
    (lambda c: c["process"]["capabilities"].update(bounding=["CAP_FLY"]), "/process/capabilities/bounding",
     "unknown capability 'CAP_FLY'"),
    (lambda c: c["mounts"].append({"destination": "/data", "type": "ext4", "source": "/dev/sda1"}),
     "/mounts/7/type", "cannot be mounted by a rootless jail"),
    (lambda c: c["linux"]["seccomp"]["syscalls"].append({"names": ["no_such_call"], "action": "SCMP_ACT_ERRNO"}),
     "/linux/seccomp/syscalls/", "unknown system call 'no_such_call'"),
    (lambda c: c["linux"].update(namespaces=[n for n in c["linux"]["namespaces"] if n["type"] != "mount"]),
     "/linux/namespaces", "needs a 'mount' namespace"),
])
def test_bad_config_field_names_json_pointer(rootless: tuple[Gvmrt, Bundles], edit: Any, pointer: str,
                                             message: str) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"], edit=edit)
    line = create_fails(gv, b, USAGE, f"{b}/config.json: {pointer}", message)
    assert line.count(":") >= 2


def test_rlimit_above_host_hard_limit_is_explained(rootless: tuple[Gvmrt, Bundles]) -> None:
    import resource
    gv, bundles = rootless
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    b = bundles.make(["true"], edit=lambda c: c["process"].update(
        rlimits=[{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": hard + 1}]))
    create_fails(gv, b, USAGE, "/process/rlimits/0", f"above this host's hard limit {hard}", "CAP_SYS_RESOURCE")


def test_ids_exist_missing_or_malformed(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sleep", "30"])
    gv.ok("create", "--bundle", str(b), "dup")
    res = gv("create", "--bundle", str(b), "dup")
    assert res.rc == RUNTIME and "already exists" in one_line(res.err)
    assert gv.ok("state", "dup").json()["status"] == "created"  # the first one is untouched
    for verb in ("start", "state", "kill", "delete"):
        res = gv(verb, "ghost")
        assert res.rc == RUNTIME and "does not exist" in one_line(res.err), verb
    for bad in ("a b", "../x", "x/y", "é", "..", "a;rm"):
        res = gv("create", "--bundle", str(b), bad)
        assert res.rc == USAGE, (bad, res)
        one_line(res.err)
    gv.ok("delete", "dup")


def test_illegal_state_transitions(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["sleep", "30"])
    gv.ok("run", "--detach", "--bundle", str(b), "st")
    res = gv("start", "st")
    assert res.rc == RUNTIME and "it is running" in one_line(res.err)
    res = gv("delete", "st")
    line = one_line(res.err)
    assert res.rc == RUNTIME and "it is running" in line and "delete --force" in line
    assert gv.ok("state", "st").json()["status"] == "running"
    gv.ok("kill", "st", "KILL")
    gv.ok("delete", "--force", "st")


def test_usage_errors_are_exit_2(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, _ = rootless
    for args in (["create"], ["state"], ["state", "a", "b"], ["kill"], ["list", "--format", "yaml"],
                 ["--log-format", "xml", "list"], ["create", "--preserve-fds", "x", "y"]):
        res = gv(*args)
        assert res.rc == USAGE, (args, res)
        one_line(res.err)


def test_no_user_namespaces_names_the_sysctl(rootless: tuple[Gvmrt, Bundles]) -> None:
    """A kernel without user namespaces, simulated: user.max_user_namespaces is per user namespace,
    so gvmrt runs as root of a fresh one (`unshare -U -r`) whose limit is set to 0."""
    gv, bundles = rootless
    b = bundles.make(["true"])
    script = ('echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"')
    argv = ["unshare", "-U", "-r", "sh", "-c", script, "sh", GVMRT, "--root", str(gv.state_root),
            "create", "--bundle", str(b), "nouserns"]
    r = gv.caller.request(argv=argv, env=gv.env)
    assert r["rc"] == RUNTIME, r
    assert "user.max_user_namespaces is 0" in one_line(r["stderr"])
    assert_untouched(gv, "nouserns")


def test_rootless_without_user_namespace_is_refused(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless

    def edit(c: dict) -> None:
        c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "user"]
    b = bundles.make(["true"], edit=edit)
    create_fails(gv, b, USAGE, "needs a 'user' namespace")


def test_program_not_found_fails_create(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["/no/such/agent"])
    create_fails(gv, b, RUNTIME, "'/no/such/agent': executable file not found")
    b2 = bundles.make(["true"], edit=lambda c: c["process"].update(cwd="/does/not/exist"))
    create_fails(gv, b2, RUNTIME, "process.cwd /does/not/exist")


def test_bad_bind_source_names_the_path(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"], edit=lambda c: c["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}))
    create_fails(gv, b, RUNTIME, "mount /data", "/no/such/dir")


def test_unsupported_settings_are_named_not_ignored(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    for edit, needle in ((lambda c: c.update(hooks={"prestart": [{"path": "/bin/true"}]}), "hooks"),
                         (lambda c: c["linux"].update(devices=[{"path": "/dev/sda", "type": "b", "major": 8,
                                                                "minor": 0}]), "linux.devices"),
                         (lambda c: c["process"].update(terminal=True), "--console-socket")):
        b = bundles.make(["true"], edit=edit)
        create_fails(gv, b, USAGE, needle)


def test_resources_are_not_silently_ignored(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"], edit=lambda c: c["linux"].update(resources={"memory": {"limit": 1 << 28}}))
    res = gv("run", "--bundle", str(b), "res")
    assert res.rc == 0
    assert "linux.resources.{memory} not applied" in res.err


def test_config_json_is_reported_with_its_path(rootless: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = rootless
    b = bundles.make(["true"])
    cfg = json.loads((b / "config.json").read_text())
    del cfg["process"]
    (b / "config.json").write_text(json.dumps(cfg))
    create_fails(gv, b, USAGE, f"{b}/config.json: /process: is required")
    assert os.path.exists(b / "rootfs")
