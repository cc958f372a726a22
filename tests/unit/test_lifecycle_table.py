"""Unit tests for gvmrt.lifecycle: which command is legal in which status, and what the refusal says.

Pure: the table and check() only. Expected legality follows OCI runtime-spec runtime.md:
start needs created; kill needs created or running; delete needs stopped (gvmrt also deletes a
created container, killing its waiting init, as runc does); delete --force works in any status.
"""

from __future__ import annotations

import itertools

import pytest

from gvmrt import lifecycle
from gvmrt.errors import GvmrtError, StateError
from gvmrt.lifecycle import CREATED, CREATING, RUNNING, STOPPED, TRANSITIONS, allowed, check

STATUSES = [CREATING, CREATED, RUNNING, STOPPED]
COMMANDS = ["start", "kill", "delete", "delete --force"]
EXPECTED = {
    "start": {CREATED},
    "kill": {CREATED, RUNNING},
    "delete": {CREATED, STOPPED},
    "delete --force": {CREATING, CREATED, RUNNING, STOPPED},
}
PAIRS = list(itertools.product(COMMANDS, STATUSES))
ALLOWED = [(c, s) for c, s in PAIRS if s in EXPECTED[c]]
REFUSED = [(c, s) for c, s in PAIRS if s not in EXPECTED[c]]


def test_statuses_are_the_oci_ones() -> None:
    assert (CREATING, CREATED, RUNNING, STOPPED) == ("creating", "created", "running", "stopped")


def test_the_table_is_the_expected_one() -> None:
    assert {c: allowed(c) for c in COMMANDS} == EXPECTED


def test_refused_pairs_exist() -> None:
    # Every status refuses something except through --force; and 7 pairs are refused in all.
    assert len(ALLOWED) == 9 and len(REFUSED) == 7


@pytest.mark.parametrize(("command", "status"), ALLOWED)
def test_allowed_pairs_pass(command: str, status: str) -> None:
    assert check("c1", command, status) is None


@pytest.mark.parametrize(("command", "status"), REFUSED)
def test_refused_pairs_raise_state_error(command: str, status: str) -> None:
    with pytest.raises(StateError) as info:
        check("my-ctr", command, status)
    err = info.value
    assert isinstance(err, GvmrtError) and err.exit_code == 1
    msg = str(err)
    assert msg.startswith(f"cannot {command} container 'my-ctr': it is {status} (needs ")
    # what is needed: every status the command accepts, and no other
    needs = msg.split("(needs ", 1)[1].split(")", 1)[0]
    assert set(needs.split(" or ")) == EXPECTED[command]
    assert "\n" not in msg


@pytest.mark.parametrize(("command", "status", "hint"), [
    ("start", RUNNING, "it is already running"),
    ("start", STOPPED, "`gvmrt delete c-9` and create it again"),
    ("kill", STOPPED, "already exited"),
    ("delete", RUNNING, "`gvmrt kill c-9`) or use `gvmrt delete --force c-9`"),
    ("delete", CREATING, "`gvmrt delete --force c-9` if that one died"),
])
def test_refusals_carry_a_hint_naming_the_container(command: str, status: str, hint: str) -> None:
    with pytest.raises(StateError, match="; ") as info:
        check("c-9", command, status)
    assert hint in str(info.value)


@pytest.mark.parametrize(("command", "status"), [("start", CREATING), ("kill", CREATING)])
def test_refusals_without_hint(command: str, status: str) -> None:
    with pytest.raises(StateError) as info:
        check("x", command, status)
    assert str(info.value).endswith(")")


def test_unknown_status_is_refused() -> None:
    for command in COMMANDS:
        with pytest.raises(StateError, match="it is paused"):
            check("x", command, "paused")


def test_unknown_command_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        check("x", "pause", CREATED)


def test_id_is_quoted_with_repr() -> None:
    with pytest.raises(StateError, match=r"container 'a\.b_c-1'"):
        check("a.b_c-1", "start", STOPPED)


def test_allowed_is_the_table_not_a_copy() -> None:
    assert allowed("start") is lifecycle._COMMANDS["start"]


# --- the documented transition table ------------------------------------------------------------


def test_transitions_cover_every_status_and_target_known_statuses() -> None:
    assert set(TRANSITIONS) == set(STATUSES)
    for status, events in TRANSITIONS.items():
        assert set(events.values()) <= set(STATUSES), status


def test_stopped_is_terminal() -> None:
    assert set(TRANSITIONS[STOPPED].values()) == {STOPPED}


@pytest.mark.parametrize(("command", "status"), [(c, s) for c, s in ALLOWED if c != "delete --force"])
def test_every_allowed_command_is_a_documented_transition(command: str, status: str) -> None:
    assert command in TRANSITIONS[status]


@pytest.mark.parametrize(("command", "status"), REFUSED)
def test_no_refused_command_is_a_documented_transition(command: str, status: str) -> None:
    assert command not in TRANSITIONS[status]


@pytest.mark.parametrize("status", [CREATING, CREATED])
def test_delete_force_is_a_documented_transition(status: str) -> None:
    assert "delete --force" in TRANSITIONS[status]
