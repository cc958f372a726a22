"""`gvmrt audit keygen | verify | proof | verify-proof | show`: the audit log for an auditor (issue 5).

Everything here runs offline on log files (a container id is only a way to find them), so a
copied log can be checked anywhere with its public key alone.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer

from gvmrt.cli.common import check_format, root, write_new
from gvmrt.errors import GvmrtError, UsageError

audit_app = typer.Typer(name="audit", help="Sign, verify, prove and read audit logs.", no_args_is_help=True,
                        context_settings={"help_option_names": ["-h", "--help"]})




def _pubkey(path: Optional[str]) -> Any:
    if path is None:
        return None
    from gvmrt.audit.keys import load_public
    return load_public(path)


class VerifyFailed(GvmrtError):
    """The log or proof did not verify (exit status 1); the details were printed."""


@audit_app.command()
def keygen(
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="private key file (default: the host's key, <config dir>/audit-key.pem)"),
    force: bool = typer.Option(False, "--force", help="replace an existing key"),
) -> None:
    """Create an Ed25519 signing key (0600) and its public key (.pub.pem) for audit logs.

    The host's default key signs every governed container's log from the next create on; hand the
    .pub.pem file to whoever verifies the logs.
    """
    from gvmrt.audit.keys import default_key_path, generate
    path = output or default_key_path()
    kid, pub = generate(path, force=force)
    print(f"key {kid}")
    print(f"private key: {path} (0600; it signs the logs: keep it on this host)")
    print(f"public key:  {pub} (give it to auditors: gvmrt audit verify LOG --pubkey {os.path.basename(pub)})")


@audit_app.command()
def verify(
    target: str = typer.Argument(..., metavar="ID|LOG", help="container id, or a log file (its rotated parts follow)"),
    pubkey: Optional[str] = typer.Option(None, "--pubkey", help="the signer's public key (PEM): pins the signer"),
    fmt: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Check every hash, link, Merkle root and signature; exit status 0 only when all hold.

    A torn last line (a crash mid-write) and entries after the last seal are reported, not failures.
    Without --pubkey the signatures are checked against the key in the log's header, which pins
    nothing unless it is this host's own key.
    """
    from gvmrt.audit.read import resolve
    from gvmrt.audit.verify import verify_log
    check_format(fmt)
    paths = resolve(target, root())
    by_id = not (os.sep in target or target.endswith(".jsonl") or os.path.isfile(target))
    try:
        report = verify_log(paths, _pubkey(pubkey), container=target if by_id else None)
    except OSError as exc:
        raise UsageError(f"{exc.filename}: {exc.strerror}") from None
    if fmt == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
    if not report.ok:
        raise VerifyFailed(f"{target}: verification FAILED ({len(report.problems) + report.more_problems} "
                           f"problem{'s' if len(report.problems) + report.more_problems != 1 else ''})")


def _print_report(r: Any) -> None:
    files = r.files if len(r.files) <= 3 else [r.files[0], f"... {len(r.files) - 2} more ...", r.files[-1]]
    print(f"log:      {r.log_id or '?'} (container {r.container or '?'}), {len(r.files)} file(s): {', '.join(files)}")
    print(f"entries:  {r.entries} in {r.batches} sealed batch(es), {r.first_time or '-'} .. {r.last_time or '-'}")
    if r.key is None:
        print("signed:   no (unsigned log: hash-chained and Merkle-sealed only; anyone who can write the file "
              "could rewrite it whole)")
    else:
        pin = r.pinned or "NOT pinned (the key is the one the log names; pass --pubkey to pin it)"
        print(f"signed:   key {r.key}, {r.signed} signature(s); pinned by {pin}" if r.pinned else
              f"signed:   key {r.key}, {r.signed} signature(s); {pin}")
    if r.continues is not None:
        print(f"note:     this file continues the log from seq {r.continues}; earlier segments not checked")
    if r.closed:
        print("end:      closed cleanly")
    else:
        print(f"end:      open: {r.unsealed} entr{'y' if r.unsealed == 1 else 'ies'} after the last seal "
              "(the monitor is running, or stopped without closing: the last second may be missing)")
    if r.torn:
        print(f"torn:     the last line {r.torn} is incomplete (a write cut short by a crash); it holds no record")
    for p in r.problems:
        print(f"FAILED    {p}")
    if r.more_problems:
        print(f"FAILED    ... and {r.more_problems} more")
    if r.ok:
        print("verified: every hash, link, Merkle root and signature holds")


@audit_app.command()
def proof(
    log: str = typer.Argument(..., metavar="ID|LOG", help="container id or log file"),
    entry: str = typer.Argument(..., metavar="ENTRY", help="the entry's seq number, or a request id"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write the proof here (default: stdout)"),
) -> None:
    """Export one entry with its Merkle inclusion path and its batch's signed seal (self-contained JSON)."""
    from gvmrt.audit.read import resolve
    from gvmrt.audit.verify import ProofError, make_proof
    try:
        doc = make_proof(resolve(log, root()), entry)
    except ProofError as exc:
        raise UsageError(str(exc)) from None
    text = json.dumps(doc, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    write_new(output, text)
    print(f"proof of entry {entry} written to {output}", file=sys.stderr)


@audit_app.command("verify-proof")
def verify_proof_cmd(
    proof_file: str = typer.Argument(..., metavar="PROOF", help="a file from `gvmrt audit proof`"),
    pubkey: Optional[str] = typer.Option(None, "--pubkey", help="the signer's public key (PEM)"),
    fmt: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Check one proof alone: the entry's hash, its path to the Merkle root, the seal's signature."""
    from gvmrt.audit.verify import ProofError, verify_proof
    check_format(fmt)
    try:
        with open(proof_file, "rb") as f:
            doc = json.load(f)
    except OSError as exc:
        raise UsageError(f"{proof_file}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{proof_file}: not JSON ({str(exc)[:200]})") from None
    try:
        entry, how = verify_proof(doc, _pubkey(pubkey))
    except ProofError as exc:
        if fmt == "json":
            print(json.dumps({"ok": False, "error": str(exc)}))
        raise VerifyFailed(f"{proof_file}: proof FAILED: {exc}") from None
    if fmt == "json":
        print(json.dumps({"ok": True, "signer": how, "entry": entry}, indent=2))
        return
    print(f"verified: entry seq {entry.get('seq')} ({entry.get('record')}"
          f"{', request ' + str(entry.get('request_id')) if entry.get('request_id') else ''}) is in the batch "
          f"its seal signs; signer: {how}")


@audit_app.command()
def show(
    target: str = typer.Argument(..., metavar="ID|LOG", help="container id or log file"),
    since: Optional[str] = typer.Option(None, "--since", help="only records at or after this time "
                                        "(RFC 3339 prefix, e.g. 2026-11-26T10:00, or a duration ago: 10m, 2h)"),
    decision: Optional[str] = typer.Option(None, "--decision", help="only this decision"),
    fmt: str = typer.Option("text", "--format", help="text or json (one object per line)"),
) -> None:
    """A readable view of a log: requests (decision and outcome merged) and lifecycle events."""
    from gvmrt.audit.read import merge, records, resolve
    from gvmrt.cli.operator import BOOKKEEPING, DECISIONS, _line
    check_format(fmt)
    if decision is not None and decision not in DECISIONS:
        raise UsageError(f"--decision {decision!r}: one of {', '.join(DECISIONS)}")
    start = _since(since) if since else None
    for e in merge(records(resolve(target, root()))):
        if e.get("record") in BOOKKEEPING:
            continue
        if start is not None and str(e.get("time", "")) < start:
            continue
        if decision is not None and e.get("decision") != decision:
            continue
        text = json.dumps(e) if fmt == "json" else _line(e)
        if text is not None:
            sys.stdout.write(text + "\n")


def _since(text: str) -> str:
    """An RFC 3339 prefix as given, or a duration before now, as a comparable record time."""
    import re
    import time
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?Z?", text):
        return text.replace(" ", "T").rstrip("Z")
    from gvmrt.cli.operator import parse_duration
    try:
        seconds = parse_duration(text)
    except UsageError:
        raise UsageError(f"--since {text!r}: a time (2026-11-26T10:00) or a duration ago (30s, 10m, 2h, 1d)") from None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - seconds))
