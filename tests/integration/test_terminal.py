"""process.terminal with --console-socket: the pty master reaches the caller (conmon, recvtty) the way runc sends it."""
from __future__ import annotations

import array
import errno
import os
import socket
from pathlib import Path

from tests.conftest import Bundles, Gvmrt


def receive_master(listener: socket.socket) -> tuple[int, bytes]:
    conn, _ = listener.accept()
    with conn:
        fds = array.array("i")
        msg, ancdata, _, _ = conn.recvmsg(1024, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: fds.itemsize])
    assert len(fds) == 1, ancdata
    return fds[0], msg


def read_all(fd: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:  # EIO once the last slave fd is closed
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        out += chunk
    return out.decode().replace("\r\n", "\n")


def test_console_socket_gets_a_pty_master(env: tuple[Gvmrt, Bundles], workdir: Path) -> None:
    gv, bundles = env

    def edit(cfg: dict) -> None:
        cfg["process"]["terminal"] = True
        cfg["process"]["consoleSize"] = {"height": 24, "width": 100}
    b = bundles.make(["sh", "-c", "tty; test -t 0 && test -t 1 && echo is-a-tty; stty size; ls -l /dev/console"],
                     edit=edit)
    sock_path = b.parent / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    os.chmod(sock_path, 0o777)
    try:
        gv.ok("create", "--console-socket", str(sock_path), "--bundle", str(b), "tty1")
        master, name = receive_master(listener)
        assert name.startswith(b"/dev/pts/")
        gv.ok("start", "tty1")
        out = read_all(master)
        os.close(master)
    finally:
        listener.close()
    lines = out.splitlines()
    assert lines[0] == name.decode() and "is-a-tty" in lines and "24 100" in lines, out
    assert "/dev/console" in lines[-1]
    gv.ok("delete", "--force", "tty1")


def test_terminal_needs_a_console_socket_and_vice_versa(env: tuple[Gvmrt, Bundles]) -> None:
    gv, bundles = env
    b = bundles.make(["true"], edit=lambda c: c["process"].update(terminal=True))
    res = gv("create", "--bundle", str(b), "t2")
    assert res.rc == 2 and "/process/terminal: true needs --console-socket" in res.err
    b2 = bundles.make(["true"])
    res = gv("create", "--console-socket", "/nonexistent.sock", "--bundle", str(b2), "t3")
    assert res.rc == 2 and "needs process.terminal true" in res.err
    b3 = bundles.make(["true"], edit=lambda c: c["process"].update(terminal=True))
    res = gv("create", "--console-socket", str(b3 / "missing.sock"), "--bundle", str(b3), "t4")
    assert res.rc == 2 and "missing.sock: No such file or directory" in res.err
    assert gv.ok("list", "--quiet").out == ""
