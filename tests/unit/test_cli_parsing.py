"""Unit tests for the stdlib CLI dispatcher (gvmrt.cli): global options, verb options, signals, help,
the `list` table, and `--version`.

Pure: the only `main()` calls are ones that fail or finish before any container state is touched
(usage errors, `--version`, `state` of a container that does not exist under a tmp_path --root).
"""

from __future__ import annotations

import _signal
import re
import signal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt import OCI_VERSION, __version__
from gvmrt.cli import GLOBAL_OPTS, VERBS, format_table, main, parse_globals, parse_signal, parse_verb, verb_help
from gvmrt.errors import UsageError

FAST = settings(max_examples=100, deadline=None, database=None)

# --- global options ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--root", "/d", "state", "x"], ["--root=/d", "state", "x"]])
def test_globals_root_both_spellings(argv: list[str]) -> None:
    assert parse_globals(argv) == ({"--root": "/d"}, ["state", "x"])


def test_globals_inline_value_keeps_later_equals() -> None:
    assert parse_globals(["--root=/a=b", "list"]) == ({"--root": "/a=b"}, ["list"])


def test_globals_inline_empty_value() -> None:
    assert parse_globals(["--root=", "list"]) == ({"--root": ""}, ["list"])


def test_globals_several() -> None:
    opts, rest = parse_globals(["--debug", "--log", "/l", "--log-format=json", "--systemd-cgroup",
                                "--cgroup-manager", "disabled", "--rootless=true", "kill", "x", "KILL"])
    assert opts == {"--debug": True, "--log": "/l", "--log-format": "json", "--systemd-cgroup": True,
                    "--cgroup-manager": "disabled", "--rootless": "true"}
    assert rest == ["kill", "x", "KILL"]


def test_globals_stop_at_the_verb() -> None:
    assert parse_globals(["state", "--root", "/d"]) == ({}, ["state", "--root", "/d"])
    assert parse_globals(["--debug", "delete", "--debug"]) == ({"--debug": True}, ["delete", "--debug"])


def test_globals_value_may_look_like_an_option() -> None:
    # As with runc: a value-taking option takes the next word, whatever it is.
    assert parse_globals(["--root", "--debug", "list"]) == ({"--root": "--debug"}, ["list"])


def test_globals_lone_dash_is_not_an_option() -> None:
    assert parse_globals(["-", "x"]) == ({}, ["-", "x"])


def test_globals_empty() -> None:
    assert parse_globals([]) == ({}, [])


@pytest.mark.parametrize("argv", [
    ["--frob", "state", "x"], ["--help"], ["-h"], ["--version"], ["-v"], ["-b", "dir", "create", "x"],
])
def test_globals_unknown_is_handed_on_untouched(argv: list[str]) -> None:
    assert parse_globals(argv) == ({}, argv)


def test_globals_unknown_after_known() -> None:
    assert parse_globals(["--debug", "--frob=1", "spec"]) == ({"--debug": True}, ["--frob=1", "spec"])


@pytest.mark.parametrize("name", sorted(n for n, (takes, _) in GLOBAL_OPTS.items() if takes))
def test_globals_missing_value(name: str) -> None:
    with pytest.raises(UsageError, match=f"option {name} needs a value"):
        parse_globals([name])


def test_globals_flag_with_value_is_refused() -> None:
    with pytest.raises(UsageError, match="takes no value"):
        parse_globals(["--debug=no", "state", "x"])


# --- verb options -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--bundle", "/b", "--pid-file", "/p", "c1"],
    ["--bundle=/b", "--pid-file=/p", "c1"],
    ["-b", "/b", "c1", "--pid-file", "/p"],
    ["-b=/b", "c1", "--pid-file=/p"],
])
def test_verb_value_options(argv: list[str]) -> None:
    assert parse_verb("create", argv) == ({"--bundle": "/b", "--pid-file": "/p"}, ["c1"])


def test_verb_inline_value_may_be_empty_or_hold_equals() -> None:
    assert parse_verb("create", ["--pid-file=", "--id=a=b", "x"]) == ({"--pid-file": "", "--id": "a=b"}, ["x"])


@pytest.mark.parametrize(("verb", "argv", "opts"), [
    ("delete", ["-f", "x"], {"--force": True}),
    ("delete", ["x", "--force"], {"--force": True}),
    ("kill", ["-a", "x"], {"--all": True}),
    ("run", ["-d", "x", "--keep"], {"--detach": True, "--keep": True}),
    ("list", ["-q"], {"--quiet": True}),
    ("list", ["-f", "json"], {"--format": "json"}),
    ("list", ["--format=table"], {"--format": "table"}),
    ("create", ["--no-pivot", "--no-new-keyring", "--preserve-fds", "2", "x"],
     {"--no-pivot": True, "--no-new-keyring": True, "--preserve-fds": "2"}),
])
def test_verb_flags_and_aliases(verb: str, argv: list[str], opts: dict[str, object]) -> None:
    got_opts, pos = parse_verb(verb, argv)
    assert got_opts == opts
    assert pos == [a for a in argv if not a.startswith("-") and a not in opts.values()]


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_verb_help_flag(verb: str, flag: str) -> None:
    assert parse_verb(verb, [flag]) == ({"--help": True}, [])


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_unknown_option_is_named(verb: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_verb(verb, ["x", "--frobnicate"])
    msg = str(info.value)
    assert msg.startswith(f"{verb}: unknown option --frobnicate")
    assert f"gvmrt {verb} --help" in msg


def test_verb_unknown_option_with_inline_value_is_named_without_value() -> None:
    with pytest.raises(UsageError, match=r"start: unknown option --frob \("):
        parse_verb("start", ["--frob=1", "x"])


def test_verb_unknown_short_option_named_as_typed() -> None:
    with pytest.raises(UsageError, match=r"unknown option -a\b"):
        parse_verb("delete", ["-a", "x"])


def test_verb_list_short_format_inline() -> None:
    assert parse_verb("list", ["-f=json"]) == ({"--format": "json"}, [])


@pytest.mark.parametrize(("verb", "name"), [("create", "--bundle"), ("create", "--pid-file"), ("run", "--id"),
                                            ("list", "--format"), ("create", "-b"), ("list", "-f")])
def test_verb_missing_value(verb: str, name: str) -> None:
    with pytest.raises(UsageError, match="needs a value"):
        parse_verb(verb, [name])


@pytest.mark.parametrize(("verb", "arg"), [("delete", "--force=yes"), ("kill", "--all=1"), ("list", "-q=1"),
                                           ("run", "--detach=")])
def test_verb_flag_with_value_is_refused(verb: str, arg: str) -> None:
    with pytest.raises(UsageError, match="takes no value"):
        parse_verb(verb, [arg, "x"])


def test_double_dash_ends_options() -> None:
    assert parse_verb("delete", ["--", "--force"]) == ({}, ["--force"])
    assert parse_verb("delete", ["-f", "--", "-x", "--", "y"]) == ({"--force": True}, ["-x", "--", "y"])
    assert parse_verb("start", ["--"]) == ({}, [])


def test_lone_dash_is_positional() -> None:
    assert parse_verb("start", ["-"]) == ({}, ["-"])


def test_kill_negative_number_after_id_is_positional() -> None:
    assert parse_verb("kill", ["c1", "-9"]) == ({}, ["c1", "-9"])
    assert parse_verb("kill", ["-a", "c1", "-15"]) == ({"--all": True}, ["c1", "-15"])
    # ...but `-9` is not a signal spelling parse_signal accepts: `gvmrt kill c1 -9` is a usage error.
    with pytest.raises(UsageError, match="invalid signal '-9'"):
        parse_signal("-9")


def test_kill_negative_number_before_id_is_an_unknown_option() -> None:
    with pytest.raises(UsageError, match="unknown option -9"):
        parse_verb("kill", ["-9", "c1"])


def test_negative_number_is_an_option_for_other_verbs() -> None:
    with pytest.raises(UsageError, match="unknown option -9"):
        parse_verb("delete", ["c1", "-9"])


def test_kill_signal_name_with_dash_is_an_option() -> None:
    with pytest.raises(UsageError, match="unknown option -KILL"):
        parse_verb("kill", ["c1", "-KILL"])


@FAST
@given(st.lists(st.text(min_size=1).filter(lambda s: not s.startswith("-")), max_size=5))
def test_plain_words_are_positional_in_order(words: list[str]) -> None:
    for verb in VERBS:
        assert parse_verb(verb, words) == ({}, words)


@FAST
@given(st.lists(st.text(max_size=8), max_size=6), st.sampled_from(sorted(VERBS)))
def test_parse_verb_only_raises_usage_errors(argv: list[str], verb: str) -> None:
    try:
        opts, pos = parse_verb(verb, argv)
    except UsageError:
        return
    assert set(opts) <= set(VERBS[verb]["opts"]) | {"--help"}
    assert all(isinstance(p, str) for p in pos)


# --- signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["TERM", "SIGTERM", "term", "sigterm", "Term", "SigTerm", "15", "015"])
def test_signal_term_spellings(text: str) -> None:
    assert parse_signal(text) == signal.SIGTERM


@pytest.mark.parametrize("sig", sorted(signal.valid_signals() - {0}))
def test_every_signal_number_is_accepted(sig: int) -> None:
    assert parse_signal(str(int(sig))) == sig


@pytest.mark.parametrize("name", sorted(n for n in dir(_signal) if n.startswith("SIG") and "_" not in n))
def test_every_signal_name_is_accepted(name: str) -> None:
    expected = getattr(_signal, name)
    assert parse_signal(name) == expected
    assert parse_signal(name[3:]) == expected
    assert parse_signal(name.lower()) == expected
    assert parse_signal(name[3:].lower()) == expected


def test_realtime_bounds() -> None:
    assert parse_signal("RTMIN") == signal.SIGRTMIN
    assert parse_signal("SIGRTMAX") == signal.SIGRTMAX
    assert parse_signal(str(signal.NSIG - 1)) == signal.NSIG - 1


@pytest.mark.parametrize("text", [
    "0", "00", "65", str(signal.NSIG), "-1", "-9", "+9", "1.5", "9x", " 15", "15 ", "SIGTERM ", "", "SIG", "sig",
    "SIG_DFL", "sig_dfl", "SIG_IGN", "_DFL", "NSIG", "SIGNSIG", "FOO", "SIGFOO", "BLOCK", "SIG_BLOCK",
    "ITIMER_REAL", "RTMIN+1", "SIGRTMIN+1", "9" * 30, "SIGTERM\n", "TERM\x00",
])
def test_invalid_signals(text: str) -> None:
    with pytest.raises(UsageError, match="invalid signal"):
        parse_signal(text)


@FAST
@given(st.text(st.characters(max_codepoint=127), max_size=12))
def test_parse_signal_ascii_is_a_signal_or_usage_error(text: str) -> None:
    try:
        n = parse_signal(text)
    except UsageError:
        return
    assert 0 < n < signal.NSIG


@pytest.mark.parametrize("text", ["²", "1²", "³"])
def test_superscript_digits_are_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="invalid signal"):
        parse_signal(text)


def test_main_kill_superscript_signal_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--root", str(tmp_path), "kill", "c1", "²"])
    err = capsys.readouterr().err
    assert "invalid signal" in err
    assert rc == 2


# --- help, table, main ------------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_help(verb: str) -> None:
    text = verb_help(verb)
    lines = text.splitlines()
    assert lines[0] == f"Usage: gvmrt {VERBS[verb]['usage']}"
    assert lines[1] == ""
    assert lines[2] == VERBS[verb]["help"]
    opts = VERBS[verb]["opts"]
    if not opts:
        assert "Options:" not in text
        assert len(lines) == 3
        return
    assert lines[3:5] == ["", "Options:"]
    option_lines = lines[5:]
    assert len(option_lines) == len(opts)
    for line, (name, (takes, helptext)) in zip(option_lines, opts.items()):
        assert line.startswith(f"  {name} VALUE " if takes else f"  {name} ")
        assert line.endswith(helptext)
    # the help texts are in one column
    assert len({line.index(h) for line, (_, (_, h)) in zip(option_lines, opts.items())}) == 1


def _state(cid: str, pid: int, status: str, bundle: str = "/b", owner: str = "root") -> dict[str, object]:
    return {"id": cid, "pid": pid, "status": status, "bundle": bundle, "created": "2024-01-01T00:00:00Z",
            "owner": owner}


def test_format_table_empty_is_the_header() -> None:
    assert format_table([]) == "ID   PID   STATUS   BUNDLE   CREATED   OWNER\n"


def test_format_table_aligns_columns() -> None:
    out = format_table([_state("a", 1, "running", "/long/bundle/path"), _state("longer-id", 12345, "stopped")])
    lines = out.splitlines()
    assert out.endswith("\n") and len(lines) == 3
    assert all(line == line.rstrip() for line in lines)
    for col in ("PID", "STATUS", "BUNDLE", "CREATED", "OWNER"):
        start = lines[0].index(col)
        assert lines[0][start - 3:start] == "   "
        for line in lines[1:]:
            assert line[start - 1] == " " and line[start] != " "
    assert lines[1].split() == ["a", "1", "running", "/long/bundle/path", "2024-01-01T00:00:00Z", "root"]
    assert lines[2].split() == ["longer-id", "12345", "stopped", "/b", "2024-01-01T00:00:00Z", "root"]


def test_format_table_strips_trailing_space_of_short_last_column() -> None:
    out = format_table([_state("a", 0, "stopped", owner="")])
    assert out.splitlines()[1] == "a    0     stopped   /b       2024-01-01T00:00:00Z"


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_main_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"gvmrt version {__version__}"
    assert re.fullmatch(r"gvmrt version \d+\.\d+\.\d+\S*", lines[0])
    assert lines[1].startswith("spec: 1.")
    assert lines[1] == f"spec: {OCI_VERSION}"
    assert lines[2].startswith("python: 3.")


def test_main_version_after_globals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", "/nonexistent", "--version"]) == 0
    assert capsys.readouterr().out.startswith("gvmrt version ")


@pytest.mark.parametrize(("argv", "message"), [
    (["--log-format=xml", "list"], "--log-format must be text or json, not 'xml'"),
    (["--root"], "option --root needs a value"),
    (["start", "--frob"], "start: unknown option --frob"),
    (["delete"], "delete: missing container id"),
    (["start", "a", "b"], "start: unexpected argument 'b'"),
    (["kill", "c1", "-9"], "invalid signal '-9'"),
    (["kill", "c1", "0"], "invalid signal '0'"),
    (["state", "bad/id/.."], "is neither a container id nor a bundle directory"),
    (["state", "bad id"], "invalid container id"),
    (["list", "--format", "yaml"], "list: --format must be table or json, not 'yaml'"),
])
def test_main_usage_errors_exit_2(argv: list[str], message: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--root", str(tmp_path / "state"), *argv] if argv[0] != "--root" else argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith("gvmrt: ") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "state").exists()


def test_main_verb_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kill", "--help"]) == 0
    assert capsys.readouterr().out == verb_help("kill") + "\n"


def test_main_state_of_missing_container(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--root", str(tmp_path), "state", "nope"])
    assert rc == 1
    assert "container 'nope' does not exist" in capsys.readouterr().err
