"""Unit tests for gvmrt.linux.rootfs path handling: secure_join (symlinks resolved as if the rootfs were
"/", never escaping it) and the overlayfs option escaping.

Real trees in tmp_path with real symlinks; nothing is mounted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.linux.rootfs import RootfsError, _escape_overlay, secure_join


def inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@pytest.fixture
def root(tmp_path: Path) -> str:
    """A rootfs next to a "host" tree it must never reach:

    tmp_path/host/etc/passwd            (the host)
    tmp_path/root/etc/passwd            (the container)
    tmp_path/root/host/etc/             (so /host/etc exists inside the rootfs too)
    tmp_path/root/a/b/
    tmp_path/root/file
    """
    (tmp_path / "host" / "etc").mkdir(parents=True)
    (tmp_path / "host" / "etc" / "passwd").write_text("host\n")
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc" / "passwd").write_text("jail\n")
    (r / "host" / "etc").mkdir(parents=True)
    (r / "a" / "b").mkdir(parents=True)
    (r / "file").write_text("")
    return str(r)


def link(root: str, name: str, target: str) -> None:
    path = os.path.join(root, name.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(target, path)


# --- plain paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(("unsafe", "expected"), [
    ("", ""), ("/", ""), (".", ""), ("/.", ""), ("//", ""),
    ("/etc", "etc"), ("etc", "etc"), ("/etc/", "etc"), ("//etc///passwd", "etc/passwd"),
    ("/./etc/./passwd/.", "etc/passwd"), ("/a/b", "a/b"), ("/a/./b/.", "a/b"),
])
def test_plain_paths(root: str, unsafe: str, expected: str) -> None:
    assert secure_join(root, unsafe) == (os.path.join(root, expected) if expected else root)


@pytest.mark.parametrize("unsafe", ["..", "/..", "/../..", "/../../../etc/..", "../../../../../../.."])
def test_dotdot_cannot_climb_above_root(root: str, unsafe: str) -> None:
    assert secure_join(root, unsafe) == root


@pytest.mark.parametrize(("unsafe", "expected"), [
    ("/../etc/passwd", "etc/passwd"), ("/a/../../../etc", "etc"), ("/a/b/../../etc/../a", "a"),
    ("../host/etc/passwd", "host/etc/passwd"), ("/a/b/..", "a"),
])
def test_dotdot_is_clamped_at_root(root: str, unsafe: str, expected: str) -> None:
    assert secure_join(root, unsafe) == os.path.join(root, expected)


@pytest.mark.parametrize(("unsafe", "expected"), [
    ("/missing", "missing"), ("/etc/missing/x/y", "etc/missing/x/y"), ("/a/b/new/./dir/.", "a/b/new/dir"),
    ("/missing/./x", "missing/x"),
])
def test_missing_tails_are_appended(root: str, unsafe: str, expected: str) -> None:
    assert secure_join(root, unsafe) == os.path.join(root, expected)


def test_root_with_trailing_slash(root: str) -> None:
    assert secure_join(root + "/", "/etc/passwd") == os.path.join(root, "etc", "passwd")


# --- symlinks -----------------------------------------------------------------------------------


def test_absolute_symlink_stays_inside_root(root: str) -> None:
    link(root, "/ext", "/host/etc")  # in the rootfs: /ext -> /host/etc
    got = secure_join(root, "/ext/passwd")
    assert got == os.path.join(root, "host", "etc", "passwd")
    assert not os.path.exists(got)  # it did not land on tmp_path/host/etc/passwd


def test_absolute_symlink_etc_to_host_etc(root: str, tmp_path: Path) -> None:
    # The CVE-2019-19921 shape: the rootfs' /etc is a symlink to an absolute host path.
    os.rename(os.path.join(root, "etc"), os.path.join(root, "etc.real"))
    link(root, "/etc", str(tmp_path / "host" / "etc"))
    got = secure_join(root, "/etc/passwd")
    assert inside(root, got)
    assert got == os.path.join(root, str(tmp_path / "host" / "etc").lstrip("/"), "passwd")


def test_absolute_symlink_to_slash_and_dotdots(root: str) -> None:
    link(root, "/a/toroot", "/")
    link(root, "/a/b/climb", "/../../../etc")
    assert secure_join(root, "/a/toroot/etc/passwd") == os.path.join(root, "etc", "passwd")
    assert secure_join(root, "/a/b/climb/passwd") == os.path.join(root, "etc", "passwd")


def test_relative_symlinks_resolve(root: str) -> None:
    link(root, "/rel", "a/b")
    link(root, "/a/sib", "../etc")
    link(root, "/a/b/here", ".")
    link(root, "/a/b/up", "..")
    assert secure_join(root, "/rel") == os.path.join(root, "a", "b")
    assert secure_join(root, "/rel/x") == os.path.join(root, "a", "b", "x")
    assert secure_join(root, "/a/sib/passwd") == os.path.join(root, "etc", "passwd")
    assert secure_join(root, "/a/b/here/here/up/b") == os.path.join(root, "a", "b")
    assert secure_join(root, "/rel/../sib") == os.path.join(root, "etc")  # .. applies to the target a/b


def test_relative_symlink_cannot_climb_above_root(root: str) -> None:
    link(root, "/a/b/escape", "../../../../../../../host/etc")
    got = secure_join(root, "/a/b/escape/passwd")
    assert got == os.path.join(root, "host", "etc", "passwd")


def test_symlink_chain(root: str) -> None:
    link(root, "/l1", "l2")
    link(root, "/l2", "/a/l3")
    link(root, "/a/l3", "b")
    assert secure_join(root, "/l1") == os.path.join(root, "a", "b")


def test_final_symlink_is_resolved(root: str) -> None:
    link(root, "/a/b/passwd", "/etc/passwd")
    assert secure_join(root, "/a/b/passwd") == os.path.join(root, "etc", "passwd")


def test_dangling_symlink_target_is_appended(root: str) -> None:
    link(root, "/dangling", "/nowhere/x")
    assert secure_join(root, "/dangling/y") == os.path.join(root, "nowhere", "x", "y")


def test_empty_symlink_target_is_skipped(root: str) -> None:
    # readlink("") cannot be created with symlink(2) (ENOENT), so only check a target of "./".
    link(root, "/dotslash", "./")
    assert secure_join(root, "/dotslash/etc") == os.path.join(root, "etc")


@pytest.mark.parametrize("links", [
    [("/self", "self")],
    [("/x", "y"), ("/y", "x")],
    [("/x", "/a/y"), ("/a/y", "../x")],
    [("/x", "x/")],
])
def test_symlink_loops_raise_rootfs_error(root: str, links: list[tuple[str, str]]) -> None:
    for name, target in links:
        link(root, name, target)
    first = links[0][0]
    with pytest.raises(RootfsError, match=f"too many levels of symbolic links resolving {first}/z"):
        secure_join(root, first + "/z")


def test_forty_hops_are_fine_forty_one_are_not(root: str) -> None:
    # Linux's MAXSYMLINKS is 40 too (path_resolution(7)).
    for i in range(41):
        link(root, f"/c{i}", f"c{i + 1}")
    os.mkdir(os.path.join(root, "c41"))
    assert secure_join(root, "/c1") == os.path.join(root, "c41")  # 40 links
    with pytest.raises(RootfsError):
        secure_join(root, "/c0")  # 41 links


def test_through_a_regular_file_is_an_oserror_naming_the_path(root: str) -> None:
    # Not a RootfsError and not appended lexically (runc's securejoin treats ENOTDIR like ENOENT),
    # but the error names the path, which the init's error report passes on.
    with pytest.raises(NotADirectoryError) as info:
        secure_join(root, "/file/x")
    assert info.value.filename == os.path.join(root, "file", "x")


@pytest.mark.parametrize(("unsafe", "expected"), [
    ("/missing/../etc", "etc"),
    ("/a/missing/../../etc/passwd", "etc/passwd"),
    ("/a/missing/../b", "a/b"),
])
def test_dotdot_after_a_missing_component(root: str, unsafe: str, expected: str) -> None:
    assert secure_join(root, unsafe) == os.path.join(root, expected)


def test_dotdot_after_a_missing_component_in_a_symlink_target(root: str) -> None:
    link(root, "/l", "missing/../etc")
    assert secure_join(root, "/l/passwd") == os.path.join(root, "etc", "passwd")


def test_symlink_after_missing_and_dotdot_is_resolved(root: str) -> None:
    link(root, "/rel", "a/b")
    assert secure_join(root, "/missing/../rel") == os.path.join(root, "a", "b")


# --- property: never outside root ---------------------------------------------------------------

COMPONENTS = st.sampled_from(["a", "b", "..", ".", "link", ""])


@pytest.fixture(scope="module")
def maze(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Symlinks named `link` all over the tree, climbing, jumping to /, and looping."""
    r = str(tmp_path_factory.mktemp("maze") / "root")
    for d in ("a/a", "a/b", "b/a/b", "b/b"):
        os.makedirs(os.path.join(r, d))
    link(r, "/link", "../../..")
    link(r, "/a/link", "/b/../../a")
    link(r, "/a/b/link", "../../link/../../../b")
    link(r, "/b/link", "a/b/link")
    link(r, "/b/a/b/link", "/b/a/b/link")  # a loop
    link(r, "/b/b/link", "../../missing/./x")
    link(r, "/a/a/link", "../link/b")
    return r


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(COMPONENTS, max_size=10), st.booleans())
def test_result_always_inside_root(maze: str, parts: list[str], absolute: bool) -> None:
    unsafe = ("/" if absolute else "") + "/".join(parts)
    try:
        got = secure_join(maze, unsafe)
    except RootfsError:
        return
    assert inside(maze, got), (unsafe, got)
    rel = os.path.relpath(got, maze)
    assert ".." not in rel.split("/")
    assert got == os.path.normpath(got)
    if os.path.lexists(got):
        # an existing result is fully resolved: no symlink left, and resolving it again is a no-op
        assert not os.path.islink(got)
        assert os.path.realpath(got) == os.path.realpath(maze) + ("" if rel == "." else "/" + rel)
        assert secure_join(maze, "/" + ("" if rel == "." else rel)) == got


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(st.sampled_from("ab./\\:-"), max_size=20))
def test_any_string_stays_inside_root(maze: str, unsafe: str) -> None:
    try:
        got = secure_join(maze, unsafe)
    except RootfsError:
        return
    assert inside(maze, got)


# --- overlay option escaping --------------------------------------------------------------------


@pytest.mark.parametrize(("path", "escaped"), [
    ("/plain/path", "/plain/path"),
    ("/a:b", "/a\\:b"),
    ("/a,b", "/a\\,b"),
    ("/a\\b", "/a\\\\b"),
    ("/x:,\\:", "/x\\:\\,\\\\\\:"),
    ("", ""),
])
def test_escape_overlay(path: str, escaped: str) -> None:
    assert _escape_overlay(path) == escaped


def _unescape(text: str) -> tuple[str, list[int]]:
    """Undo the escaping; also return the positions of unescaped separators (there must be none)."""
    out, seps, i = [], [], 0
    while i < len(text):
        if text[i] == "\\":
            out.append(text[i + 1])
            i += 2
            continue
        if text[i] in ":,":
            seps.append(i)
        out.append(text[i])
        i += 1
    return "".join(out), seps


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(st.sampled_from("ab/:,\\ =é"), max_size=20))
def test_escape_overlay_roundtrips_and_hides_separators(path: str) -> None:
    escaped = _escape_overlay(path)
    back, seps = _unescape(escaped)
    assert back == path
    assert seps == []


def test_escaped_lowerdirs_split_back() -> None:
    lowers = ["/l:1", "/l,2", "/l\\3"]
    joined = ":".join(_escape_overlay(p) for p in lowers)
    parts, cur, i = [], "", 0
    while i < len(joined):
        if joined[i] == "\\":
            cur += joined[i + 1]
            i += 2
        elif joined[i] == ":":
            parts.append(cur)
            cur = ""
            i += 1
        else:
            cur += joined[i]
            i += 1
    parts.append(cur)
    assert parts == lowers


def test_trust_bundle_read_never_follows_a_symlink_out(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """install_ca reads the rootfs's trust bundle component by component with O_NOFOLLOW (a rootfs
    swapped under us must not lead the read to a host file that then lands in the jail)."""
    from gvmrt.linux.rootfs import _read_in_root
    root = tmp_path / "root"
    (root / "etc" / "ssl").mkdir(parents=True)
    (root / "etc" / "ssl" / "cert.pem").write_bytes(b"CA\n")
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host only")
    (root / "etc" / "link.pem").symlink_to(secret)
    (root / "etc" / "dirlink").symlink_to(tmp_path)
    assert _read_in_root(str(root), str(root / "etc" / "ssl" / "cert.pem")) == b"CA\n"
    assert _read_in_root(str(root), str(root / "etc" / "link.pem")) is None
    assert _read_in_root(str(root), str(root / "etc" / "dirlink" / "host-secret")) is None
    assert _read_in_root(str(root), str(root / "etc" / "missing.pem")) is None
