"""Container lifecycle states and what each command may do in each (STYLE.md habit 3).

OCI runtime-spec runtime.md: creating → created → running → stopped. gvmrt derives the status
from the kernel on every read (is the init alive, with the start time recorded at create, and is
the exec FIFO still there), as runc does, so `state` is honest even if nobody asked for an hour.
"""

from __future__ import annotations

from gvmrt.errors import StateError

CREATING, CREATED, RUNNING, STOPPED = "creating", "created", "running", "stopped"

# status → {event: next status}
TRANSITIONS: dict[str, dict[str, str]] = {
    CREATING: {"init-ready": CREATED, "init-died": STOPPED, "delete --force": STOPPED},
    CREATED: {"start": RUNNING, "kill": STOPPED, "delete": STOPPED, "delete --force": STOPPED,
              "init-died": STOPPED},
    RUNNING: {"kill": RUNNING, "exit": STOPPED, "delete --force": STOPPED},
    STOPPED: {"delete": STOPPED, "delete --force": STOPPED},
}
# Commands whose legality is decided by the table; `state`/`list` are always allowed.
_COMMANDS = {
    "start": {CREATED},
    "kill": {CREATED, RUNNING},
    "delete": {CREATED, STOPPED},
    "delete --force": {CREATING, CREATED, RUNNING, STOPPED},
}


def allowed(command: str) -> set[str]:
    return _COMMANDS[command]


def check(cid: str, command: str, status: str) -> None:
    """Raise StateError naming the container's status and what the command needs."""
    ok = _COMMANDS[command]
    if status in ok:
        return
    hints = {
        ("start", RUNNING): "it is already running",
        ("start", STOPPED): f"its process has exited; `gvmrt delete {cid}` and create it again",
        ("kill", STOPPED): "its process has already exited",
        ("delete", RUNNING): f"stop it first (`gvmrt kill {cid}`) or use `gvmrt delete --force {cid}`",
        ("delete", CREATING): f"another gvmrt is creating it; use `gvmrt delete --force {cid}` if that one died",
    }
    hint = hints.get((command, status), "")
    need = " or ".join(sorted(ok))
    raise StateError(f"cannot {command} container {cid!r}: it is {status} (needs {need})" + (f"; {hint}" if hint else ""))
