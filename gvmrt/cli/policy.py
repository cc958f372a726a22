"""`gvmrt policy suggest` and `gvmrt policy test`: writing and checking rules from recorded traffic.

The work is in gvmrt.policy.suggest (pure); this module reads the log (gvmrt.audit.read), loads a
bundle's policy the way `gvmrt create` does (gvmrt.plan.load_plan: the same validation, the same
one-line errors), and prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import typer

from gvmrt.cli.common import check_format, root
from gvmrt.errors import GvmrtError, UsageError

if TYPE_CHECKING:
    from gvmrt.policy.matcher import CompiledPolicy

policy_app = typer.Typer(
    name="policy",
    help="Write egress rules from recorded traffic, and test a policy against a recording.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Trouble(GvmrtError):
    """`policy test` exits 1 when a decision changes (as diff does), so its errors exit 2."""

    exit_code = 2



def _records(target: str) -> list[dict[str, Any]]:
    from gvmrt.audit.read import records, resolve
    return list(records(resolve(target, root())))


def _printable(text: str) -> str:
    # Paths and hosts are the agent's choice: nothing of theirs may drive the operator's terminal.
    from gvmrt.cli.operator import _printable as printable
    return printable(text)


def _skipped(skipped: Counter[str]) -> str:
    if not skipped:
        return ""
    parts = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"; skipped {sum(skipped.values())}: {parts}"


def _table(rows: list[tuple[str, ...]]) -> str:
    rows = [tuple(_printable(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows)


# Help texts: one line per paragraph, because typer keeps a docstring's line breaks.
SUGGEST_HELP = (
    "Allow rules for the requests of a recording (best: one made with `gvmrt run --watch`).\n\n"
    "One rule per host and method (and port, other than 80 and 443). Path segments that look like ids "
    "(numbers, UUIDs, hex of 8+ with a digit, opaque tokens of 20+ characters) become `*`; a rule with more "
    "than 20 paths gets their common prefix + `/**`. The rules (JSON, stdout) go into gvm.egress.rules as they "
    "are; the summary goes to stderr. Review them: they allow what the agent did, which is not necessarily "
    "what it should do."
)


@policy_app.command(help=SUGGEST_HELP)
def suggest(
    target: str = typer.Argument(..., metavar="ID|LOG", help="container id (live or deleted) or decision log file"),
    fmt: str = typer.Option("json", "--format", help="json (a list for gvm.egress.rules) or text"),
) -> None:
    """`gvmrt policy suggest` (its help is SUGGEST_HELP)."""
    check_format(fmt)
    from gvmrt.policy.suggest import suggest as make

    recs = _records(target)
    s = make(recs)
    if s.recording.decisions == 0:
        raise UsageError(f"{target}: the log has no decision records: nothing to suggest rules from")
    if fmt == "json":
        sys.stdout.write(json.dumps(s.rules, indent=2) + "\n")
    elif s.rules:
        rows: list[tuple[str, ...]] = [("ID", "METHOD", "HOST", "PORT", "REQUESTS", "PATHS")]
        for r in s.rules:
            first, *more = r["paths"]
            rows.append((r["id"], r["methods"][0], r["hosts"][0], str(r["ports"][0]) if "ports" in r else "any",
                         str(s.counts[r["id"]]), first))
            rows += [("", "", "", "", "", p) for p in more]
        sys.stdout.write(_table(rows))
    err = sys.stderr
    if s.recording.watch == 0:
        err.write("gvmrt: note: no record of this log is from watch mode; rules are suggested from the requests "
                  "that were let through (record with `gvmrt run --watch` to see everything the agent does)\n")
    for note in s.notes:
        err.write(f"gvmrt: note: {_printable(note)}\n")
    err.write(f"{len(s.rules)} rules from {s.used} requests ({s.recording.watch} watch-mode records)"
              f"{_skipped(s.skipped)}\n")


def load_policy(bundle: str) -> CompiledPolicy:
    """The bundle's egress policy, compiled for enforcement (a watch-mode policy's would-be decisions).

    Validated exactly as `gvmrt create` validates it (the plan, from its cache or freshly), so a bad
    bundle gets create's message."""
    from gvmrt.plan import load_plan
    from gvmrt.policy.matcher import CompiledPolicy
    from gvmrt.runtime import read_config
    if os.path.basename(bundle) == "config.json" and os.path.isfile(bundle):
        bundle = os.path.dirname(bundle) or "."
    raw, path = read_config(os.path.realpath(bundle))
    plan = load_plan(raw, path)
    gvm = plan.get("gvm")
    if gvm is None:
        raise UsageError(f"{path} has no gvm section, so no policy decides its requests "
                         "(add \"gvm\": {\"egress\": ...})")
    return CompiledPolicy.from_json(gvm["egress"], watch=False)


TEST_HELP = (
    "Replay a recording against BUNDLE's policy and show which decisions would change.\n\n"
    "The old decision is the one recorded (for watch-mode records, the one enforcement would have made); the "
    "new one is what BUNDLE's policy decides, enforcing, for the same method, host, port and path. Headers and "
    "bodies are not recorded: a rule with `json` body fields sees no body and gives its on_uninspectable "
    "decision (marked \"body rule\"). The summary goes to stderr.\n\n"
    "Exit status: 0 when no decision changes, 1 when some would, 2 on error (as diff)."
)


@policy_app.command(help=TEST_HELP)
def test(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="bundle directory (or its config.json)"),
    target: str = typer.Argument(..., metavar="ID|LOG", help="container id (live or deleted) or decision log file"),
    show_all: bool = typer.Option(False, "--all", help="show every request, not only the changed ones"),
    fmt: str = typer.Option("text", "--format", help="text or json (a list of rows)"),
) -> None:
    """`gvmrt policy test` (its help is TEST_HELP)."""
    try:
        check_format(fmt)
        from gvmrt.policy.suggest import observe, replay
        policy = load_policy(bundle)
        recs = _records(target)
    except GvmrtError as exc:
        if exc.exit_code == 2:
            raise
        raise _Trouble(str(exc)) from None
    rec = observe(recs)
    if rec.decisions == 0:
        raise _Trouble(f"{target}: the log has no decision records: nothing to replay")
    rows = replay(policy, recs)
    shown = rows if show_all else [r for r in rows if r.changed]
    if fmt == "json":
        sys.stdout.write(json.dumps([r.json() for r in shown], indent=2) + "\n")
    elif shown:
        table: list[tuple[str, ...]] = [("OLD", "", "NEW", "REQUEST", "RULE (OLD -> NEW)", "")]
        for r in shown:
            q = r.request
            table.append((r.old, "->" if r.changed else "==", r.new, f"{q.method} {q.host}:{q.port}{q.path}",
                          f"{r.old_rule or '-'} -> {r.new_rule or '-'}",
                          "body rule: no body recorded" if r.body_rule else ""))
        sys.stdout.write(_table(table))
    changes = Counter(f"{r.old}->{r.new}" for r in rows if r.changed)
    detail = ", ".join(f"{n} {t}" for t, n in sorted(changes.items(), key=lambda kv: (-kv[1], kv[0])))
    sys.stderr.write(f"{len(rows)} requests, {sum(changes.values())} would change"
                     + (f" ({detail})" if detail else "") + _skipped(rec.skipped) + "\n")
    body = sum(r.body_rule for r in rows)
    if body:
        sys.stderr.write(f"gvmrt: note: {body} request(s) decided by rules on JSON body fields, which saw no "
                         "body (bodies are not recorded)\n")
    if changes:
        raise typer.Exit(1)
