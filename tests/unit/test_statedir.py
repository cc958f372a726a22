"""Unit tests for gvmrt.statedir (ids, state and data roots, atomic state files, the lock) and
gvmrt.runtime.resolve_target (id or bundle directory).

Only tmp_path files; environment variables through monkeypatch. is_host_root() caches its answer
in statedir._HOST_ROOT, which the tests set to simulate root or a user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt import _json, statedir
from gvmrt.errors import ContainerNotFound, GvmrtError, HostError, UsageError
from gvmrt.runtime import resolve_target
from gvmrt.statedir import (ID_MAX_LEN, Lock, StateRoot, _owned_dir, data_root, default_state_root, read_state,
                            validate_id, write_json_atomic)

ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
FAST = settings(max_examples=100, deadline=None, database=None)


@pytest.fixture
def rootless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statedir, "_HOST_ROOT", False)


@pytest.fixture
def host_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statedir, "_HOST_ROOT", True)


# --- container ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["a", "A", "0", "c1", "my_container.v2-x", "-", "_", "...", ".a", "a.", "-rf",
                                 "x" * ID_MAX_LEN])
def test_valid_ids(cid: str) -> None:
    assert validate_id(cid) == cid


@FAST
@given(st.text(ID_CHARS, min_size=1, max_size=64).filter(lambda s: s not in (".", "..")))
def test_ids_from_the_charset_are_valid(cid: str) -> None:
    assert validate_id(cid) is cid


@FAST
@given(st.text(ID_CHARS, max_size=10), st.characters().filter(lambda c: c not in ID_CHARS),
       st.text(ID_CHARS, max_size=10))
def test_any_other_character_is_refused_and_shown(before: str, bad: str, after: str) -> None:
    with pytest.raises(UsageError) as info:
        validate_id(before + bad + after)
    assert repr(bad)[1:-1] in str(info.value)
    assert "use only A-Z a-z 0-9 _ . -" in str(info.value)


@pytest.mark.parametrize("cid", [".", ".."])
def test_dot_and_dotdot_are_refused(cid: str) -> None:
    with pytest.raises(UsageError, match=f"invalid container id {cid!r}"):
        validate_id(cid)


@pytest.mark.parametrize("cid", ["a/b", "/", "../x", "a b", "a\x00", "a\n", "é", "a:b", "a+b", "*", "\u0661"])
def test_invalid_ids(cid: str) -> None:
    with pytest.raises(UsageError, match="invalid container id"):
        validate_id(cid)


def test_empty_id() -> None:
    with pytest.raises(UsageError, match="must not be empty"):
        validate_id("")


def test_length_limit() -> None:
    with pytest.raises(UsageError, match=f"is {ID_MAX_LEN + 1} characters long; the limit is {ID_MAX_LEN}"):
        validate_id("x" * (ID_MAX_LEN + 1))
    assert ID_MAX_LEN == 255  # an id names a directory: NAME_MAX


def test_every_valid_id_can_name_a_state_dir(tmp_path: Path) -> None:
    cid = validate_id("x" * ID_MAX_LEN)
    os.mkdir(StateRoot(str(tmp_path)).dir(cid))
    with pytest.raises(UsageError):
        validate_id("x" * 256)  # would fail mkdir with ENAMETOOLONG


def test_read_state_of_longest_valid_id_is_a_gvmrt_error(tmp_path: Path) -> None:
    cid = validate_id("x" * ID_MAX_LEN)
    with pytest.raises(GvmrtError):
        read_state(StateRoot(str(tmp_path)).dir(cid), cid)


# --- state and data roots -----------------------------------------------------------------------


def test_state_root_custom_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = StateRoot("rel/dir")
    assert r.custom and r.path == str(tmp_path / "rel" / "dir")
    assert r.dir("c1") == str(tmp_path / "rel" / "dir" / "c1")


def test_default_state_root_for_host_root(host_root: None) -> None:
    assert default_state_root() == "/run/gvmrt"
    assert StateRoot(None).path == "/run/gvmrt"
    assert not StateRoot(None).custom


def test_default_state_root_follows_xdg_runtime_dir(rootless: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_state_root() == str(tmp_path / "gvmrt")


def test_default_state_root_without_a_usable_xdg_runtime_dir(rootless: None, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    uid = os.getuid()
    expected = {f"/run/user/{uid}/gvmrt", f"/tmp/gvmrt-{uid}"}
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert default_state_root() in expected
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert default_state_root() in expected
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_state_root() in expected


def test_data_root_for_host_root(host_root: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_root() == "/var/lib/gvmrt"


def test_data_root_follows_xdg_data_home(rootless: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert data_root() == str(tmp_path / "data" / "gvmrt")


def test_data_root_defaults_to_home(rootless: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == str(tmp_path / ".local" / "share" / "gvmrt")


def test_data_root_refuses_slash_home(rootless: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "")
    monkeypatch.setenv("HOME", "/")
    with pytest.raises(HostError, match="XDG_DATA_HOME"):
        data_root()


def test_data_dir_default_root(rootless: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert StateRoot(None).data_dir("c1") == str(tmp_path / "gvmrt" / "containers" / "default" / "c1")


def test_data_dir_differs_per_custom_root(rootless: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    base = os.path.join(data_root(), "containers")
    d1 = StateRoot(str(tmp_path / "r1")).data_dir("c1")
    d2 = StateRoot(str(tmp_path / "r2")).data_dir("c1")
    default = StateRoot(None).data_dir("c1")
    assert len({d1, d2, default}) == 3
    for d in (d1, d2):
        assert d.startswith(base + os.sep)
        key = os.path.relpath(d, base).split(os.sep)
        assert len(key) == 2 and key[1] == "c1"
        assert len(key[0]) == 12 and all(ch in "0123456789abcdef" for ch in key[0])
    # the same root, spelled differently, is the same key
    monkeypatch.chdir(tmp_path)
    assert StateRoot("r1").data_dir("c1") == StateRoot(str(tmp_path / "r1") + "/").data_dir("c1") == d1
    # and the id is the last component
    assert StateRoot(str(tmp_path / "r1")).data_dir("c2") == os.path.join(os.path.dirname(d1), "c2")


def test_data_dir_for_host_root_custom(host_root: None, tmp_path: Path) -> None:
    assert StateRoot(str(tmp_path)).data_dir("c1").startswith("/var/lib/gvmrt/containers/")


def test_ids(tmp_path: Path) -> None:
    r = StateRoot(str(tmp_path / "state"))
    assert r.ids() == []  # missing root: no containers
    os.makedirs(r.dir("b"))
    os.makedirs(r.dir("a"))
    write_json_atomic(os.path.join(r.dir("a"), "state.json"), {"id": "a"})
    (tmp_path / "state" / "stray-file").write_text("")
    assert r.ids() == ["a", "b"]


# --- _owned_dir and ensure ----------------------------------------------------------------------


def test_ensure_creates_a_private_dir(tmp_path: Path) -> None:
    path = tmp_path / "x" / "state"
    StateRoot(str(path)).ensure()
    st_ = os.stat(path)
    assert stat.S_ISDIR(st_.st_mode) and st_.st_uid == os.getuid()
    assert stat.S_IMODE(st_.st_mode) & 0o077 == 0
    StateRoot(str(path)).ensure()  # again: fine


def test_owned_dir_missing_without_create(tmp_path: Path) -> None:
    assert _owned_dir(str(tmp_path / "nope"), create=False) == str(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707, 0o722, 0o1777])
def test_owned_dir_refuses_a_dir_writable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "shared"
    path.mkdir()
    os.chmod(path, mode)
    for create in (False, True):
        with pytest.raises(HostError, match="not writable by others; remove it or pass --root") as info:
            _owned_dir(str(path), create=create)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o750, 0o711])
def test_owned_dir_accepts_a_dir_only_we_can_write(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    os.chmod(path, mode)
    assert _owned_dir(str(path), create=False) == str(path)


def test_owned_dir_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HostError, match="must be a directory"):
        _owned_dir(str(tmp_path / "link"), create=True)


def test_owned_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(HostError):
        _owned_dir(str(tmp_path / "f"), create=False)
    with pytest.raises(HostError, match="cannot create state directory"):
        _owned_dir(str(tmp_path / "f"), create=True)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another uid needs root")
def test_owned_dir_refuses_a_dir_owned_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 54321, 54321)
    with pytest.raises(HostError, match=f"owned by uid {os.getuid()}"):
        _owned_dir(str(path), create=False)


def test_ensure_refuses_squatted_root(tmp_path: Path) -> None:
    path = tmp_path / "squat"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(HostError):
        StateRoot(str(path)).ensure()


# --- state files ----------------------------------------------------------------------------------

STATE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=15,
)


@pytest.fixture(scope="module")
def shared_sdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("sdir"))


@settings(FAST, max_examples=40)
@given(st.dictionaries(st.text(max_size=8), STATE_VALUES, max_size=6), st.text(max_size=8))
def test_write_then_read_roundtrip(shared_sdir: str, st_: dict[str, Any], cid: str) -> None:
    st_ = {**st_, "id": cid}  # a state object always names its container
    sdir = shared_sdir
    write_json_atomic(os.path.join(sdir, "state.json"), st_)
    assert read_state(sdir, "c1") == st_
    assert os.listdir(sdir) == ["state.json"]


def test_write_json_atomic_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = {"id": "c1", "status": "created", "pid": 42, "annotations": {"é": "x"}}
    write_json_atomic(str(path), state)
    assert path.read_bytes() == _json.dumps(state).encode()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    write_json_atomic(str(path), {"id": "c1", "status": "stopped"})  # replaces it
    assert read_state(str(tmp_path), "c1") == {"id": "c1", "status": "stopped"}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_write_json_atomic_replaces_not_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(str(path), {"v": 1})
    before = os.stat(path).st_ino
    fd = os.open(path, os.O_RDONLY)
    try:
        write_json_atomic(str(path), {"v": 2})
        assert os.read(fd, 100) == b'{"v":1}'  # a reader holding the old file sees it whole
    finally:
        os.close(fd)
    assert os.stat(path).st_ino != before


def test_write_json_atomic_leaves_nothing_on_encode_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json_atomic(str(tmp_path / "state.json"), {"bad": object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("raw", [b"", b"{", b'{"id": "c1",', b"\xff\xfe", b"not json", b'{"a":1} trailing',
                                 b"\x00" * 16])
def test_corrupt_state_names_delete_force(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "state.json").write_bytes(raw)
    with pytest.raises(GvmrtError) as info:
        read_state(str(tmp_path), "c1")
    err = info.value
    assert not isinstance(err, ContainerNotFound)
    assert err.exit_code == 1
    assert "state of container 'c1' is corrupt" in str(err)
    assert "`gvmrt delete --force c1`" in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("raw", [b"[]", b"null", b"5", b'"x"'])
def test_non_object_state_is_corrupt(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "state.json").write_bytes(raw)
    with pytest.raises(GvmrtError, match="delete --force"):
        read_state(str(tmp_path), "c1")


def test_state_dir_without_state_json_is_a_creating_husk(tmp_path: Path) -> None:
    sdir = tmp_path / "c1"
    sdir.mkdir()
    (sdir / "lock").write_text("")
    assert read_state(str(sdir), "c1") == {"id": "c1", "status": "creating", "pid": 0, "husk": True}


def test_missing_state_dir_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ContainerNotFound, match="container 'c1' does not exist"):
        read_state(str(tmp_path / "c1"), "c1")


# --- the lock -------------------------------------------------------------------------------------


def test_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    # flock(2) locks belong to the open file description: two Lock objects in one process conflict.
    a, b = Lock(str(tmp_path), "c1", create=True), Lock(str(tmp_path), "c1")
    assert a.acquire(blocking=False) is True
    try:
        assert b.acquire(blocking=False) is False
        assert b.fd == -1
    finally:
        a.release()
    assert a.fd == -1
    assert b.acquire(blocking=False) is True
    b.release()


def test_lock_file_is_private(tmp_path: Path) -> None:
    with Lock(str(tmp_path), create=True) as lock:
        assert lock.fd >= 0
        assert stat.S_IMODE(os.stat(lock.path).st_mode) == 0o600
        assert lock.path == str(tmp_path / "lock")
        assert Lock(str(tmp_path)).acquire(blocking=False) is False
    assert lock.fd == -1
    again = Lock(str(tmp_path))
    assert again.acquire(blocking=False) is True
    again.release()


def test_lock_release_is_idempotent(tmp_path: Path) -> None:
    lock = Lock(str(tmp_path), create=True)
    lock.release()
    lock.acquire()
    lock.release()
    lock.release()
    assert lock.fd == -1


def test_lock_only_create_makes_the_file(tmp_path: Path) -> None:
    sdir = tmp_path / "c1"
    sdir.mkdir()
    for blocking in (False, True):
        with pytest.raises(ContainerNotFound, match="container 'c1' does not exist"):
            Lock(str(sdir)).acquire(blocking=blocking)
    with pytest.raises(ContainerNotFound, match="container 'other' does not exist"):
        Lock(str(sdir), "other").acquire()
    assert not (sdir / "lock").exists()


def test_lock_in_missing_dir_is_container_not_found(tmp_path: Path) -> None:
    with pytest.raises(ContainerNotFound, match="'gone'"):
        Lock(str(tmp_path / "gone")).acquire(blocking=False)


def test_lock_on_a_file_deleted_while_waiting(tmp_path: Path) -> None:
    import threading

    holder = Lock(str(tmp_path), "c1", create=True)
    holder.acquire()
    result: list[BaseException | bool] = []

    def wait() -> None:
        try:
            result.append(Lock(str(tmp_path), "c1").acquire())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    t.join(0.05)
    os.unlink(holder.path)  # `delete` removes the state dir while holding the lock...
    holder.release()  # ...and lets the waiter go: it must see the container is gone
    t.join(5)
    assert not t.is_alive()
    assert len(result) == 1 and isinstance(result[0], ContainerNotFound)


# --- resolve_target -------------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundles" / "hello"
    b.mkdir(parents=True)
    (b / "config.json").write_text("{}")
    return b


def test_bundle_path(bundle: Path) -> None:
    assert resolve_target(str(bundle)) == ("hello", str(bundle))
    assert resolve_target(str(bundle) + "/") == ("hello", str(bundle))


def test_bundle_path_is_made_real(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "alias").symlink_to(bundle)
    assert resolve_target(str(tmp_path / "alias")) == ("hello", str(bundle))  # id from the real name
    monkeypatch.chdir(tmp_path)
    assert resolve_target("bundles/hello") == ("hello", str(bundle))
    assert resolve_target("./bundles/../bundles/hello") == ("hello", str(bundle))


def test_dot_and_dotdot_bundles(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(bundle)
    assert resolve_target(".") == ("hello", str(bundle))
    (bundle / "sub").mkdir()
    monkeypatch.chdir(bundle / "sub")
    assert resolve_target("..") == ("hello", str(bundle))


def test_id_override(bundle: Path) -> None:
    assert resolve_target(str(bundle), "other-id") == ("other-id", str(bundle))


def test_id_override_is_validated(bundle: Path) -> None:
    with pytest.raises(UsageError, match="invalid container id"):
        resolve_target(str(bundle), "bad/id")


def test_bundle_name_must_be_a_valid_id(tmp_path: Path) -> None:
    b = tmp_path / "my bundle"
    b.mkdir()
    (b / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="invalid container id 'my bundle'"):
        resolve_target(str(b))
    assert resolve_target(str(b), "ok") == ("ok", str(b))


def test_plain_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle: Path) -> None:
    assert resolve_target("c1") == ("c1", None)
    # a bare word is an id even when a bundle of that name is in the current directory
    monkeypatch.chdir(bundle.parent)
    assert resolve_target("hello") == ("hello", None)


def test_plain_id_is_validated() -> None:
    with pytest.raises(UsageError, match="invalid container id"):
        resolve_target("a b")
    with pytest.raises(UsageError, match="must not be empty"):
        resolve_target("")


@pytest.mark.parametrize("sub", ["no-config", "missing"])
def test_path_without_config_json(tmp_path: Path, sub: str) -> None:
    (tmp_path / "no-config").mkdir()
    arg = str(tmp_path / sub)
    with pytest.raises(UsageError, match="neither a container id nor a bundle directory with a config.json") as info:
        resolve_target(arg)
    assert repr(arg) in str(info.value)


def test_config_json_that_is_a_directory_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "b" / "config.json").mkdir(parents=True)
    with pytest.raises(UsageError, match="neither"):
        resolve_target(str(tmp_path / "b"))


@pytest.mark.parametrize("arg", ["c1", "./nowhere", "/nonexistent/bundle"])
def test_id_override_without_a_bundle(arg: str) -> None:
    with pytest.raises(UsageError, match=f"--id goes with a bundle directory, but {arg!r} is not one"):
        resolve_target(arg, "x")


def test_dot_without_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="invalid container id '.'"):
        resolve_target(".")
