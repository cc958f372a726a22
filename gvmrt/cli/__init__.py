"""Entry point. The lifecycle verbs podman and containerd call on every container go through a thin
stdlib-only dispatcher (this module); typer builds the full CLI for everything else (gvmrt.cli.app).

Why: `import typer, pydantic, cryptography` costs ~70 ms here, against crun's whole 10 ms `run`
(DESIGN.md §3). Options follow runc's spellings so tools that drive runc can drive gvmrt.
"""

from __future__ import annotations

import os
import sys

from gvmrt import OCI_VERSION, __version__
from gvmrt.errors import GvmrtError, UsageError

TYPE_CHECKING = False  # typing costs ~2 ms to import; annotations are strings (PEP 563)
if TYPE_CHECKING:
    from typing import Any

# name → (takes a value?, help). Global options come before the verb, as with runc.
GLOBAL_OPTS: dict[str, tuple[bool, str]] = {
    "--root": (True, "state directory (default $XDG_RUNTIME_DIR/gvmrt, /run/gvmrt for root)"),
    "--log": (True, "also write errors (and --debug messages) to FILE"),
    "--log-format": (True, "text or json for --log"),
    "--debug": (False, "print debug messages"),
    "--systemd-cgroup": (False, "accepted for runc compatibility; gvmrt does not manage cgroups here"),
    "--cgroup-manager": (True, "accepted for runc/crun compatibility; ignored"),
    "--rootless": (True, "accepted for runc compatibility; gvmrt detects rootless mode itself"),
}
_ALIASES = {"-b": "--bundle", "-f": "--force", "-a": "--all", "-d": "--detach", "-q": "--quiet", "-h": "--help"}

# create and run take the same options (runc's); run adds its own two.
_CREATE_OPTS: dict[str, tuple[bool, str]] = {
    "--bundle": (True, "bundle directory (default: the current directory)"),
    "--pid-file": (True, "write the container init's host pid to FILE"),
    "--id": (True, "container id when the argument is a bundle directory"),
    "--console-socket": (True, "unix socket for the pty master (process.terminal)"),
    "--preserve-fds": (True, "pass N extra fds (from 3 on) to the container"),
    "--no-pivot": (False, "accepted; gvmrt always uses pivot_root"),
    "--no-new-keyring": (False, "accepted; gvmrt never creates a session keyring"),
}

VERBS: dict[str, dict[str, Any]] = {
    "create": {
        "usage": "create [--bundle DIR] [--pid-file FILE] <id | bundle-dir>",
        "help": "Create a container from a bundle; its process waits for `gvmrt start`.",
        "opts": _CREATE_OPTS,
    },
    "run": {
        "usage": "run [--bundle DIR] [--detach] [--keep] [--watch] <id | bundle-dir>",
        "help": "Create, start and wait; exit with the container's status (128+N for signal N).",
        "opts": {**_CREATE_OPTS,
                 "--detach": (False, "return once the container runs"),
                 "--keep": (False, "keep the container (state, upper dir) after it exits"),
                 "--watch": (False, "let every request through and record what the policy would decide")},
    },
    "start": {"usage": "start <id | bundle-dir>", "help": "Run the created container's process.", "opts": {}},
    "state": {"usage": "state <id | bundle-dir>", "help": "Print the OCI state of a container as JSON.", "opts": {}},
    "kill": {"usage": "kill [--all] <id | bundle-dir> [SIGNAL]",
             "help": "Send SIGNAL (name like TERM/SIGTERM or number; default TERM) to the container.",
             "opts": {"--all": (False, "signal every process of the container")}},
    "delete": {"usage": "delete [--force] [--discard-changes] <id | bundle-dir>",
               "help": "Remove a stopped container (with --force, kill it first); never fails to clean up.",
               "opts": {"--force": (False, "kill a running container, and clean up half-created ones (and drop "
                                           "workspace changes held for review)"),
                        "--discard-changes": (False, "drop workspace changes held for review (recorded)")}},
    "list": {"usage": "list [--format table|json] [--quiet]", "help": "List containers.",
             "opts": {"--format": (True, "table (default) or json"), "--quiet": (False, "print ids only")}},
}


# pack, unpack, inspect: parsed here too (options as in gvmrt.cli.bundle, which typer shows).
BUNDLE_VERBS: dict[str, dict[str, tuple[bool, str]]] = {
    "pack": {"--output": (True, ""), "--sign": (True, ""), "--level": (True, ""), "--format": (True, "")},
    "unpack": {"--pubkey": (True, ""), "--max-bytes": (True, ""), "--max-entries": (True, ""), "--format": (True, "")},
    "inspect": {"--pubkey": (True, ""), "--format": (True, "")},
}
_BUNDLE_POSITIONAL = {"pack": 1, "unpack": 2, "inspect": 1}


def run_bundle_verb(verb: str, argv: list[str]) -> int:
    table = BUNDLE_VERBS[verb]
    opts: dict[str, Any] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) > 1:
            typed, eq, inline = arg.partition("=")
            name = "--output" if typed == "-o" else typed
            if name not in table:
                raise UsageError(f"{verb}: unknown option {typed} (see `gvmrt {verb} --help`)")
            opts[name], i = _take(argv, i, name, inline if eq else None)
        else:
            pos.append(arg)
        i += 1
    if len(pos) != _BUNDLE_POSITIONAL[verb]:
        raise UsageError(f"{verb}: takes {_BUNDLE_POSITIONAL[verb]} argument(s) (see `gvmrt {verb} --help`)")
    from gvmrt.cli import _bundle as b
    fmt = opts.get("--format", "text")
    if verb == "pack":
        if "--output" not in opts:
            raise UsageError("pack: -o/--output FILE is required")
        b.pack_cmd(pos[0], opts["--output"], opts.get("--sign"), fmt, _int_opt(opts, "--level") or 1)
    elif verb == "unpack":
        b.unpack_cmd(pos[0], pos[1], opts.get("--pubkey"), _int_opt(opts, "--max-bytes") or b.MAX_BYTES,
                     _int_opt(opts, "--max-entries") or b.MAX_ENTRIES, fmt)
    else:
        b.inspect_cmd(pos[0], opts.get("--pubkey"), fmt)
    sys.stdout.flush()
    return 0


class Out:
    """Errors and notices: one line on stderr, and into --log in text or JSON (runc's log format)."""

    def __init__(self) -> None:
        self.log_path: str | None = None
        self.log_format = "text"
        self.debug = False

    def _log(self, level: str, msg: str) -> None:
        if not self.log_path:
            return
        import time

        from gvmrt import _json as json
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = (json.dumps({"level": level, "msg": msg, "time": now}) if self.log_format == "json"
                else f'time="{now}" level={level} msg="{msg}"')
        try:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass

    def error(self, msg: str) -> None:
        sys.stderr.write(f"gvmrt: {msg}\n")
        self._log("error", msg)

    def notice(self, msg: str) -> None:
        sys.stderr.write(f"gvmrt: note: {msg}\n")
        self._log("warning", msg)

    def dbg(self, msg: str) -> None:
        if self.debug:
            sys.stderr.write(f"gvmrt: debug: {msg}\n")
            self._log("debug", msg)


def _take(argv: list[str], i: int, name: str, inline: str | None) -> tuple[str, int]:
    if inline is not None:
        return inline, i
    if i + 1 >= len(argv):
        raise UsageError(f"option {name} needs a value")
    return argv[i + 1], i + 1


def parse_globals(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Global options up to the verb; returns (options, rest starting at the verb)."""
    opts: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, inline = arg.partition("=")
        name = _ALIASES.get(name, name)
        if name not in GLOBAL_OPTS:
            return opts, argv[i:]  # --help, --version, or unknown: typer decides
        takes = GLOBAL_OPTS[name][0]
        if takes:
            opts[name], i = _take(argv, i, name, inline if eq else None)
        elif eq:
            raise UsageError(f"option {name} takes no value")
        else:
            opts[name] = True
        i += 1
    return opts, argv[i:]


def parse_verb(verb: str, argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    table = VERBS[verb]["opts"]
    opts: dict[str, Any] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            pos.extend(argv[i + 1:])
            break
        if arg.startswith("-") and len(arg) > 1 and not (verb == "kill" and pos and arg[1:].isdigit()):
            typed, eq, inline = arg.partition("=")
            # -f is --format for list (runc's), --force elsewhere
            name = "--format" if verb == "list" and typed == "-f" else _ALIASES.get(typed, typed)
            if name == "--help":
                opts["--help"] = True
                i += 1
                continue
            if name not in table:
                raise UsageError(f"{verb}: unknown option {typed} (see `gvmrt {verb} --help`)")
            takes = table[name][0]
            if takes:
                opts[name], i = _take(argv, i, name, inline if eq else None)
            elif eq:
                raise UsageError(f"{verb}: option {name} takes no value")
            else:
                opts[name] = True
        else:
            pos.append(arg)
        i += 1
    return opts, pos


def verb_help(verb: str) -> str:
    spec = VERBS[verb]
    lines = [f"Usage: gvmrt {spec['usage']}", "", spec["help"]]
    if spec["opts"]:
        lines.append("")
        lines.append("Options:")
        for name, (takes, text) in spec["opts"].items():
            lines.append(f"  {name + (' VALUE' if takes else ''):<26} {text}")
    return "\n".join(lines)


def parse_signal(text: str) -> int:
    import _signal  # the C module: `signal` imports enum (~4 ms)
    if text.isascii() and text.isdigit():
        n = int(text)
        if 0 < n < _signal.NSIG:
            return n
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(_signal, name, None) if name.isidentifier() and "_" not in name else None
        if isinstance(sig, int) and 0 < sig < _signal.NSIG:
            return sig
    raise UsageError(f"invalid signal {text!r}: use a name (TERM, SIGKILL) or a number (15)")


def _positional(verb: str, pos: list[str], n: int) -> None:
    if len(pos) < n:
        raise UsageError(f"{verb}: missing container id (usage: gvmrt {VERBS[verb]['usage']})")
    if len(pos) > n:
        raise UsageError(f"{verb}: unexpected argument {pos[n]!r} (usage: gvmrt {VERBS[verb]['usage']})")


def _int_opt(opts: dict[str, Any], name: str) -> int:
    value = opts.get(name, "0")
    if not str(value).isdigit():
        raise UsageError(f"option {name} needs a whole number, got {value!r}")
    return int(value)


def run_verb(verb: str, gopts: dict[str, Any], argv: list[str], out: Out) -> int:
    from gvmrt import _json as json
    from gvmrt.runtime import Runtime, resolve_target

    opts, pos = parse_verb(verb, argv)
    if opts.get("--help"):
        print(verb_help(verb))
        return 0
    rt = Runtime(gopts.get("--root"), notify=out.notice)
    if verb in ("create", "run"):
        _positional(verb, pos, 1)
        cid, bundle = resolve_target(pos[0], opts.get("--id"))
        if bundle is None:
            bundle = opts.get("--bundle") or os.getcwd()
        elif "--bundle" in opts:
            raise UsageError(f"{verb}: give either a bundle directory or --bundle, not both")
        preserve = _int_opt(opts, "--preserve-fds")
        if verb == "create":
            rt.create(cid, bundle, pid_file=opts.get("--pid-file"), preserve_fds=preserve,
                      console_socket=opts.get("--console-socket"))
            return 0
        return rt.run(cid, bundle, detach=bool(opts.get("--detach")), keep=bool(opts.get("--keep")),
                      watch=bool(opts.get("--watch")), pid_file=opts.get("--pid-file"), preserve_fds=preserve,
                      console_socket=opts.get("--console-socket"))
    if verb == "list":
        _positional(verb, pos, 0)
        fmt = opts.get("--format", "table")
        if fmt not in ("table", "json"):
            raise UsageError(f"list: --format must be table or json, not {fmt!r}")
        states = rt.list()
        if opts.get("--quiet"):
            sys.stdout.write("".join(s["id"] + "\n" for s in states))
        elif fmt == "json":
            sys.stdout.write(json.dumps(states) + "\n")
        else:
            sys.stdout.write(format_table(states))
        return 0
    if verb == "kill":
        if len(pos) == 2:
            sig = parse_signal(pos[1])
            pos = pos[:1]
        else:
            sig = 15
        _positional(verb, pos, 1)
        cid, _ = resolve_target(pos[0])
        rt.kill(cid, sig, all_procs=bool(opts.get("--all")))
        return 0
    _positional(verb, pos, 1)
    cid, _ = resolve_target(pos[0])
    if verb == "start":
        rt.start(cid)
    elif verb == "state":
        sys.stdout.write(json.dumps(rt.state(cid), indent=2) + "\n")
    elif verb == "delete":
        rt.delete(cid, force=bool(opts.get("--force")), discard_changes=bool(opts.get("--discard-changes")))
    return 0


def format_table(states: list[dict[str, Any]]) -> str:
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"]) for s in states]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Out()
    try:
        gopts, rest = parse_globals(argv)
        out.log_path = gopts.get("--log")
        fmt = gopts.get("--log-format", "text")
        if fmt not in ("text", "json"):
            raise UsageError(f"--log-format must be text or json, not {fmt!r}")
        out.log_format = fmt
        out.debug = bool(gopts.get("--debug"))
        if gopts.get("--systemd-cgroup") or gopts.get("--cgroup-manager") not in (None, "disabled"):
            out.notice("cgroup manager options ignored: this host does not delegate cgroups to gvmrt; "
                       "resource limits come from process.rlimits")
        if rest and rest[0] in ("--version", "-v"):
            print(f"gvmrt version {__version__}\nspec: {OCI_VERSION}\npython: {sys.version.split()[0]}")
            return 0
        if rest and rest[0] in VERBS:
            code = run_verb(rest[0], gopts, rest[1:], out)
            sys.stdout.flush()
            return code
        if rest and rest[0] in BUNDLE_VERBS and not {"--help", "-h"} & set(rest):
            # pack/unpack/inspect move hundreds of megabytes next to tar: not through typer's
            # ~80 ms of imports. Their help (and any error typer would word better) is typer's.
            return run_bundle_verb(rest[0], rest[1:])
        from gvmrt.cli.app import run_app
        return run_app(rest, gopts, out)
    except GvmrtError as exc:
        out.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
    except BrokenPipeError:
        return 141
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, traceback with --debug
        if out.debug:
            import traceback
            traceback.print_exc()
        out.error(f"internal error: {type(exc).__name__}: {exc} (this is a bug; rerun with --debug for details)")
        return 1


def run() -> None:
    """The launcher's entry: main(), flush, and leave without tearing the interpreter down (nothing
    of gvmrt's needs finalizers; freeing every module costs ~1 ms on each lifecycle command)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 141
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
