"""One exception tree (STYLE.md habit 6).

A user sees exactly one line: ``gvmrt: <what>: <why>[; <what to do>]``.  Foreign exceptions are
translated where they cross into gvmrt (``raise GvmrtError(...) from exc``); a traceback means a bug.
Exit codes: 1 for runtime failures, 2 for usage errors (bad flags, bad ids, bad config), like runc's
urfave/cli and every POSIX tool.
"""

from __future__ import annotations


class GvmrtError(Exception):
    """A failure the user can act on; ``str()`` is the whole one-line message."""

    exit_code = 1


class UsageError(GvmrtError):
    """The command line itself is wrong (unknown flag, missing argument, malformed id)."""

    exit_code = 2


class ConfigError(UsageError):
    """config.json (or another input file) is wrong; names the file and the JSON pointer."""

    def __init__(self, file: str, pointer: str, message: str) -> None:
        self.file = file
        self.pointer = pointer
        self.message = message
        where = f"{file}: {pointer}" if pointer else file
        super().__init__(f"{where}: {message}")


class ContainerNotFound(GvmrtError):
    def __init__(self, cid: str) -> None:
        super().__init__(f"container {cid!r} does not exist (see `gvmrt list`)")


class ContainerExists(GvmrtError):
    def __init__(self, cid: str) -> None:
        super().__init__(f"container {cid!r} already exists; choose another id or `gvmrt delete {cid}` first")


class StateCorrupt(GvmrtError):
    """state.json exists but cannot be read as a container state; only delete --force helps."""

    def __init__(self, cid: str, why: str) -> None:
        super().__init__(f"state of container {cid!r} is corrupt ({why}); `gvmrt delete --force {cid}` removes it")


class StateError(GvmrtError):
    """A lifecycle command that is illegal in the container's current state."""


class HostError(GvmrtError):
    """The host cannot do what was asked (missing kernel feature, limit, tool)."""
