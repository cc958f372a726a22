"""Shared fixtures: the installed gvmrt, a real unprivileged user, busybox bundles, a subreaper caller.

The suite runs as root (CI does) and proves rootless operation by running gvmrt as a real
unprivileged user it creates (`gvmrt-test`, with /etc/subuid ranges from useradd). gvmrt is the
installed copy in the world-readable virtualenv (scripts/setup), because that user cannot execute
the pyenv Python under /root nor, possibly, read this checkout.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("GVMRT_VENV", "/opt/gvmrt/venv"))
GVMRT = str(VENV / "bin" / "gvmrt")
PYTHON = str(VENV / "bin" / "python")
TEST_USER = "gvmrt-test"
CALLER_SRC = (REPO / "tests" / "caller.py").read_text()


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        return pwd.getpwnam(TEST_USER)


@dataclass
class Result:
    rc: int | None
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Caller:
    """One long-lived subreaper process (as root or as the test user) that runs commands for us."""

    def __init__(self, user: pwd.struct_passwd | None) -> None:
        argv = [PYTHON, "-c", CALLER_SRC]
        if user is not None:
            argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                    "--reset-env", "--"] + argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("test caller died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


class Gvmrt:
    """`gvmrt --root <private dir> ...` as a given user, through its Caller."""

    def __init__(self, caller: Caller, mode: str, home: Path, state_root: Path, uid: int) -> None:
        self.caller = caller
        self.mode = mode
        self.uid = uid
        self.state_root = state_root
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home),
                    "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
                    "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config"),
                    "LANG": "C.UTF-8"}
        self.data_root = Path("/var/lib/gvmrt") if uid == 0 else home / "data" / "gvmrt"
        # Audit logs: persistent state (gvmrt.hostconf.audit_dir), per state root.
        self.audit_root = Path("/var/lib/gvmrt/audit") if uid == 0 else home / "state" / "gvmrt" / "audit"

    def __call__(self, *args: str, stdin: str = "", timeout: float = 60, root: bool = True,
                 env: dict[str, str] | None = None) -> Result:
        argv = [GVMRT] + (["--root", str(self.state_root)] if root else []) + list(args)
        r = self.caller.request(argv=argv, env={**self.env, **(env or {})}, stdin=stdin, timeout=timeout)
        return Result(r["rc"], r["stdout"], r["stderr"])

    def ok(self, *args: str, **kw: Any) -> Result:
        res = self(*args, **kw)
        assert res.rc == 0, f"gvmrt {' '.join(args)} failed ({res.rc}): {res.err}"
        return res

    def spawn(self, *args: str) -> int:
        argv = [GVMRT, "--root", str(self.state_root)] + list(args)
        return self.caller.request(op="spawn", argv=argv, env=self.env)["pid"]

    def wait(self, pid: int, timeout: float = 60) -> Result:
        r = self.caller.request(op="wait", pid=pid, timeout=timeout)
        return Result(r["rc"], r["stdout"], r["stderr"])

    def reap(self) -> None:
        self.caller.request(op="reap")

    def audit_log(self, cid: str) -> Path:
        return self.audit_root / self.container_dir(cid).parent.name / f"{cid}.jsonl"

    def container_dir(self, cid: str) -> Path:
        import hashlib
        key = hashlib.sha256(str(self.state_root).encode()).hexdigest()[:12]
        return self.data_root / "containers" / key / cid


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("the suite runs as root to create its unprivileged test user")
    return _ensure_user()


@pytest.fixture(scope="session")
def workdir(test_user: pwd.struct_passwd) -> Iterator[Path]:
    """A world-traversable scratch dir (pytest's tmp_path lives under a 0700 dir the user can't enter)."""
    d = Path(tempfile.mkdtemp(prefix="gvmrt-tests-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def build_rootfs(dest: Path, owner: pwd.struct_passwd | None, extra: dict[str, str] | None = None) -> Path:
    args = [str(REPO / "scripts" / "build-busybox-rootfs"), str(dest)]
    tmp_files = []
    for to, content in (extra or {}).items():
        f = tempfile.NamedTemporaryFile("w", delete=False, dir="/var/tmp")
        f.write(content)
        f.close()
        os.chmod(f.name, 0o755)
        tmp_files.append(f.name)
        args.append(f"{f.name}:{to}")
    subprocess.run(args, check=True)
    for f in tmp_files:
        os.unlink(f)
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def rootfs_cache(workdir: Path, test_user: pwd.struct_passwd) -> dict[str, Path]:
    """One busybox rootfs per owner, copied into each bundle (cp -a is ~10 ms)."""
    return {"root": build_rootfs(workdir / "rootfs-root", None),
            "rootless": build_rootfs(workdir / "rootfs-user", test_user)}


@pytest.fixture(scope="session")
def python_rootfs(workdir: Path, test_user: pwd.struct_passwd) -> dict[str, Path]:
    """A rootfs with Debian's Python 3.11 (scripts/build-python-rootfs), one per owner."""
    built = workdir / "python-rootfs-root"
    subprocess.run([str(REPO / "scripts" / "build-python-rootfs"), str(built)], check=True)
    user_copy = workdir / "python-rootfs-user"
    subprocess.run(["cp", "-a", str(built), str(user_copy)], check=True)
    subprocess.run(["chown", "-R", f"{test_user.pw_uid}:{test_user.pw_gid}", str(user_copy)], check=True)
    return {"root": built, "rootless": user_copy}


def default_config(args: list[str], governed: bool = False, **overrides: Any) -> dict[str, Any]:
    """`gvmrt spec`'s config; without its gvm section unless `governed` (most tests are about the
    jail, and a sidecar per container would double their time)."""
    out = subprocess.run([GVMRT, "spec", "--"] + args, check=True, capture_output=True, text=True).stdout
    cfg = json.loads(out)
    if not governed:
        del cfg["gvm"]
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


class Bundles:
    def __init__(self, base: Path, rootfs: Path, owner: pwd.struct_passwd | None) -> None:
        self.base = base
        self.rootfs = rootfs
        self.owner = owner
        self.n = 0

    def make(self, args: list[str] | None = None, config: dict[str, Any] | None = None, name: str | None = None,
             edit: Any = None, shared_rootfs: Path | None = None) -> Path:
        """A bundle dir; `shared_rootfs` is used in place (root.path absolute) instead of copied:
        a rootfs is only ever an overlay lowerdir, so bundles may share one."""
        self.n += 1
        d = self.base / (name or f"b{self.n}")
        d.mkdir(parents=True)
        if shared_rootfs is None:
            subprocess.run(["cp", "-a", str(self.rootfs), str(d / "rootfs")], check=True)
        cfg = config if config is not None else default_config(args or ["true"])
        if shared_rootfs is not None:
            cfg["root"]["path"] = str(shared_rootfs)
        if edit:
            edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        if self.owner is not None:
            subprocess.run(["chown", "-R", f"{self.owner.pw_uid}:{self.owner.pw_gid}", str(d)], check=True)
            os.chown(d.parent, self.owner.pw_uid, self.owner.pw_gid)
        return d


def _env_for(mode: str, test_user: pwd.struct_passwd, workdir: Path, request: pytest.FixtureRequest
             ) -> tuple[Caller, Gvmrt, Bundles]:
    user = test_user if mode == "rootless" else None
    home = workdir / f"home-{mode}"
    home.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=workdir))
    tmp.chmod(0o755)
    state_root = tmp / "state"
    if user is not None:
        for p in (home, tmp):
            os.chown(p, user.pw_uid, user.pw_gid)
    caller = Caller(user)
    gv = Gvmrt(caller, mode, home, state_root, user.pw_uid if user else 0)
    return caller, gv, Bundles(tmp / "bundles", Path(), user)


@pytest.fixture(params=["rootless", "root"])
def env(request: pytest.FixtureRequest, test_user: pwd.struct_passwd, workdir: Path,
        rootfs_cache: dict[str, Path]) -> Iterator[tuple[Gvmrt, Bundles]]:
    """(gvmrt as root or as the unprivileged test user, a bundle factory owned by that user)."""
    caller, gv, bundles = _env_for(request.param, test_user, workdir, request)
    bundles.rootfs = rootfs_cache[request.param]
    try:
        yield gv, bundles
    finally:
        _cleanup(gv)
        caller.close()


@pytest.fixture
def rootless(request: pytest.FixtureRequest, test_user: pwd.struct_passwd, workdir: Path,
             rootfs_cache: dict[str, Path]) -> Iterator[tuple[Gvmrt, Bundles]]:
    caller, gv, bundles = _env_for("rootless", test_user, workdir, request)
    bundles.rootfs = rootfs_cache["rootless"]
    try:
        yield gv, bundles
    finally:
        _cleanup(gv)
        caller.close()


@pytest.fixture
def as_root(request: pytest.FixtureRequest, test_user: pwd.struct_passwd, workdir: Path,
            rootfs_cache: dict[str, Path]) -> Iterator[tuple[Gvmrt, Bundles]]:
    """gvmrt as root only: for tests that need root's own powers on the host (mounting a tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root in the initial user namespace (CAP_SYS_ADMIN to mount a tmpfs)")
    caller, gv, bundles = _env_for("root", test_user, workdir, request)
    bundles.rootfs = rootfs_cache["root"]
    try:
        yield gv, bundles
    finally:
        _cleanup(gv)
        caller.close()


def _cleanup(gv: Gvmrt) -> None:
    res = gv("list", "--quiet")
    for cid in res.out.split():
        gv("delete", "--force", cid)
    leftovers = gv("list", "--quiet").out.split()
    assert not leftovers, f"containers left behind: {leftovers}"


def user_processes(uid: int) -> list[str]:
    """Live (non-zombie) processes of ``uid`` as 'pid comm'."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}")
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2]
        if st.st_uid == uid and state not in "ZX":
            out.append(f"{name} {stat[stat.index('(') + 1:stat.rindex(')')]}")
    return out


def mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [" ".join(line.split()[3:5]) for line in f]
