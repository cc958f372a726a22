"""Remove what a container left on disk, whoever inside the jail owns it.

The overlay upper dir holds whatever the agent wrote, with the modes it chose (a root inside
the jail can make a 000 directory full of files) and, with subordinate id maps, files owned by
ids the invoking user cannot touch directly. Removal first fixes modes as it goes; if files are
owned by subordinate ids it repeats inside a user namespace with the container's maps, where the
invoking user is root over exactly those ids (the way `podman unshare rm` works).
"""

from __future__ import annotations

import errno
import os
import stat
import time


def _rmtree_fixing_modes(path: str) -> None:
    """rm -rf that first gives us rwx on every directory it enters (no shutil: it imports ~3 ms).

    Idempotent under concurrency: whatever another `delete --force` removed first is simply gone.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return
        if st.st_mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
        with os.scandir(path) as it:
            entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
    except FileNotFoundError:
        return
    for child, is_dir in entries:
        if is_dir:
            _rmtree_fixing_modes(child)
        else:
            try:
                os.unlink(child)
            except FileNotFoundError:
                pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def remove_tree(path: str, uid_maps: list[list[int]], gid_maps: list[list[int]]) -> None:
    if not os.path.lexists(path):
        return
    try:
        for attempt in range(5):
            try:
                _rmtree_fixing_modes(path)
                return
            except OSError as exc:
                # A process of the container's that was still finishing (a monitor whose create
                # was killed) may add a file between the listing and the rmdir: go round again.
                if exc.errno != errno.ENOTEMPTY or attempt == 4:
                    raise
                time.sleep(0.05)
    except PermissionError:
        if os.getuid() == 0 or len(uid_maps) + len(gid_maps) <= 2:
            raise
    _rmtree_in_userns(path, uid_maps, gid_maps)


def _rmtree_in_userns(path: str, uid_maps: list[list[int]], gid_maps: list[list[int]]) -> None:
    from gvmrt.linux import process
    from gvmrt.linux import sys as lsys

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(w)
            lsys.unshare(lsys.CLONE_NEWUSER)
            os.read(r, 1)  # wait for the maps
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            _rmtree_fixing_modes(path)
            code = 0
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(r)
    status = 1
    try:
        process.write_id_maps(pid, uid_maps, gid_maps, deny_setgroups=False)
    finally:
        os.write(w, b"1")
        os.close(w)
        _, status = os.waitpid(pid, 0)
    if status or os.path.lexists(path):
        raise OSError(errno.EPERM, "cannot remove the container's files (owned by subordinate ids)", path)
