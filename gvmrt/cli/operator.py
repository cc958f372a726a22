"""`gvmrt events`, `pending`, `approve`, `deny`: the operator's view of a governed container (issue 4).

Past decisions come from the container's decision log (read directly: the caller owns it); live
ones, held requests and answers go through the control socket its monitor serves (gvmrt.control).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Iterator, Optional

import typer

from gvmrt.cli.common import check_format, root
from gvmrt.errors import GvmrtError, StateError, UsageError

DECISIONS = ("allow", "audit_only", "delay", "require_approval", "deny")
BOOKKEEPING = ("log", "segment", "seal", "close")     # the audit log's own records: not events
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}



def _container(cid: str) -> tuple[str, dict[str, Any]]:
    """(state dir, OCI state) of a governed container whose sidecar may be asked things."""
    from gvmrt.runtime import Runtime, resolve_target
    rt = Runtime(root())
    cid, _ = resolve_target(cid)
    st = rt.state(cid)
    if "sidecar" not in st:
        raise StateError(f"container {cid!r} is not governed (its config.json has no gvm section): no sidecar, "
                         "no events or approvals")
    return rt.root.dir(cid), st


def _client(sdir: str, st: dict[str, Any], timeout: float | None = 10) -> Any:
    from gvmrt.control import Client, ControlError
    if st["sidecar"]["status"] != "running":
        raise StateError(f"the sidecar of container {st['id']!r} is not running "
                         f"(container {st['status']}); its decisions are in {st['sidecar']['audit']}")
    try:
        return Client(sdir, timeout)
    except ControlError as exc:
        raise GvmrtError(f"container {st['id']!r}: {exc}") from None


def _call(sdir: str, st: dict[str, Any], **msg: Any) -> dict[str, Any]:
    from gvmrt.control import ControlError
    with _client(sdir, st) as c:
        try:
            return c.call(**msg)
        except ControlError as exc:
            raise GvmrtError(str(exc)) from None


def parse_duration(text: str) -> int:
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"--for {text!r}: give a duration like 30s, 10m, 2h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _check_id(request_id: str) -> str:
    from gvmrt.proxy.operator import REQUEST_ID
    if not REQUEST_ID.fullmatch(request_id):
        raise UsageError(f"{request_id!r} is not a request id (16 hex digits, as in X-Gvm-Request-Id and "
                         "`gvmrt pending`)")
    return request_id


def _printable(text: str) -> str:
    """Nothing the agent chose may drive the operator's terminal (escape sequences, fake lines)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _line(e: dict[str, Any]) -> str | None:
    """One readable line of a record; None for the log's own bookkeeping (headers, seals)."""
    raw = _raw_line(e)
    return None if raw is None else _printable(raw)


def _raw_line(e: dict[str, Any]) -> str | None:
    kind = e.get("record")
    if kind in BOOKKEEPING:
        return None
    t = f"{e.get('time', ''):<24}"
    if e.get("event") == "reload":
        return (f"{t} policy reloaded by uid {e.get('by_uid')}: {e.get('old_sha256', '')[:12]} -> "
                f"{e.get('new_sha256', '')[:12]} ({e.get('rules')} rules)")
    if kind == "lifecycle":
        event = e.get("event")
        if event == "created":
            detail = (f"from {e.get('bundle')} (config {str(e.get('config_sha256'))[:12]}, policy "
                      f"{str(e.get('policy_sha256'))[:12]}{', watch mode' if e.get('watch') else ''})")
        elif event == "stopped":
            detail = (f"exit status {e['exit_status']}" if e.get("exit_status") is not None
                      else str(e.get("note") or "exit status unknown"))
        elif event == "audit_recovered":
            detail = f"the log failed from {e.get('since')} ({e.get('reason')}); {e.get('refused')} refused"
        else:
            detail = f"by uid {e['by_uid']}" if "by_uid" in e else ""
        return f"{t} container {event} {detail}".rstrip()
    if kind == "filesystem" or e.get("event") == "filesystem":
        mark = {"added": "A", "modified": "M", "deleted": "D"}.get(str(e.get("change")), "?")
        digest = f"  sha256 {str(e.get('sha256'))[:16]}" if e.get("sha256") else ""
        return (f"{t} workspace {e.get('event', '')} {mark} {e.get('workspace', '')}/{e.get('path', '')}{digest}"
                f"  ({e.get('reason', '')})")
    if e.get("event") == "audit":
        return (f"{t} the audit log is {e.get('audit')}" + (f": {e['reason']}" if e.get("reason") else "")
                + (" (governed requests are refused)" if e.get("audit") in ("failing", "failed") else ""))
    if e.get("event") == "held":
        return (f"{'':23} {e['method']} {e['host']}:{e['port']}{e['path']}  rule={e['rule'] or '-'}  HELD "
                f"{e['request_id']} (answer within {e['timeout_s']} s: gvmrt approve|deny)")
    target = (f"{e.get('host', '')} {e.get('path', '')}" if e.get("method") == "DNS"
              else f"{e.get('host', '')}:{e.get('port', '')}{e.get('path', '')}")
    return (f"{t} {e.get('method', '')} {target}"
            f"  rule={e.get('rule') or '-'}  {e.get('decision', '')}  {e.get('status', '')}"
            + (f"  (watch: would {e['would']})" if e.get("would") and e.get("would") != e.get("decision") else "")
            + ("  flagged" if e.get("flagged") else ""))


def _past(path: str) -> Iterator[dict[str, Any]]:
    """The records of a container's log, every segment, skipping a torn last line."""
    from gvmrt.audit.read import records, segments
    return records(segments(path))


def events(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing decisions as they happen"),
    decision: Optional[str] = typer.Option(None, "--decision", help=f"only this decision ({', '.join(DECISIONS)})"),
    fmt: str = typer.Option("text", "--format", help="text or json (one object per line)"),
) -> None:
    """The container's decisions: past ones from its log, then (--follow) live ones and held requests."""
    if decision is not None and decision not in DECISIONS:
        raise UsageError(f"--decision {decision!r}: one of {', '.join(DECISIONS)}")
    check_format(fmt)
    from gvmrt.errors import ContainerNotFound
    try:
        sdir, st = _container(cid)
    except ContainerNotFound:
        # Deleted: its decision log outlives it, and still answers for the past.
        from gvmrt.runtime import Runtime, resolve_target
        rt = Runtime(root())
        path = rt.root.audit_path(resolve_target(cid)[0])
        if follow or not os.path.exists(path):
            raise
        sdir, st = "", {"id": cid, "sidecar": {"audit": path}}

    def show(e: dict[str, Any]) -> None:
        if e.get("record") in BOOKKEEPING:
            return
        if decision is not None and (e.get("event") == "held" and decision != "require_approval"
                                     or e.get("event") != "held" and e.get("decision") != decision):
            return
        e = {k: v for k, v in e.items() if k != "event"} if e.get("event") == "decision" else e
        text = json.dumps(e) if fmt == "json" else _line(e)
        if text is None:
            return
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    live = None
    if follow:
        # Subscribe before reading the log, so nothing falls between the two; records in both are
        # printed once (by request id).
        client = _client(sdir, st, timeout=10)
        live = client.subscribe()
    from gvmrt.audit.read import merge
    seen = set()
    waiting: dict[Any, dict[str, Any]] = {}     # forwarded requests whose outcome is still to come
    for e in merge(_past(st["sidecar"]["audit"])):
        seen.add(e.get("request_id"))
        if e.get("record") == "decision" and e.get("status") is None and live is not None:
            waiting[e.get("request_id")] = e    # in flight: shown when its outcome arrives
            continue
        show(e)
    if live is None:
        return
    try:
        for e in live:
            if e.get("event") == "overflow":
                raise GvmrtError("events: the sidecar dropped this subscription (too slow a reader); run it again")
            if e.get("event") != "decision":
                show(e)
                continue
            rid = e.get("request_id")
            if e.get("record") == "decision":
                if rid in seen:
                    continue
                seen.add(rid)
                if e.get("status") is None:
                    waiting[rid] = e
                    continue
                show(e)
            elif e.get("record") == "outcome":
                dec = waiting.pop(rid, None)
                if dec is not None:
                    show(merge([dec, e])[0])
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def pending(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    fmt: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Requests held for approval (RequireApproval), oldest first."""
    check_format(fmt)
    sdir, st = _container(cid)
    held = _call(sdir, st, op="pending")["pending"]
    if fmt == "json":
        sys.stdout.write(json.dumps(held) + "\n")
        return
    rows = [("REQUEST", "METHOD", "TARGET", "BODY", "RULE", "HELD", "TIMEOUT")]
    rows += [(h["request_id"], h["method"], f"{h['host']}:{h['port']}{h['path']}",
              "-" if h["body_bytes"] is None else str(h["body_bytes"]), h["rule"] or "-", f"{h['held_s']:.0f}s",
              f"{h['timeout_s']}s") for h in held]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    sys.stdout.write("".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows))


def approve(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    request_id: Optional[str] = typer.Argument(None, metavar="[REQUEST_ID]", help="the held request (gvmrt pending)"),
    for_: Optional[str] = typer.Option(None, "--for", help="also let identical requests through for this long (10m, 2h)"),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="ask about each held request as it arrives"),
) -> None:
    """Let a held request through (or, with --interactive, decide each one as it comes)."""
    for_s = parse_duration(for_) if for_ else None
    sdir, st = _container(cid)
    if interactive:
        if request_id is not None:
            raise UsageError("approve --interactive takes no request id: it asks about each one")
        _interactive(sdir, st, for_s)
        return
    if request_id is None:
        raise UsageError("approve needs a request id (see `gvmrt pending`), or --interactive")
    reply = _call(sdir, st, op="approve", request_id=_check_id(request_id), for_s=for_s)
    print(reply["message"])


def deny(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    request_id: str = typer.Argument(..., metavar="REQUEST_ID", help="the held request (gvmrt pending)"),
) -> None:
    """Refuse a held request (the agent gets 403)."""
    sdir, st = _container(cid)
    reply = _call(sdir, st, op="deny", request_id=_check_id(request_id))
    print(reply["message"])


def _interactive(sdir: str, st: dict[str, Any], for_s: int | None) -> None:
    """Ask about each held request as it arrives, until stdin ends, ^C, or the sidecar goes away.

    The event stream is read by a thread; this one waits on it and on stdin together, so the end
    of input is noticed even while nothing is held (answers typed ahead are kept for the next
    prompt)."""
    import queue
    import select
    import threading
    from collections import deque

    from gvmrt.control import ControlError
    client = _client(sdir, st, timeout=10)
    stream = client.subscribe()
    held: queue.Queue = queue.Queue()
    typed: deque[str] = deque()
    asked: set[str] = set()

    def pump() -> None:
        try:
            for e in stream:
                if e.get("event") == "held":
                    held.put(e)
        except (OSError, ValueError, ControlError):
            pass
        held.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def ask(h: dict[str, Any]) -> bool:
        if h["request_id"] in asked:
            return True
        asked.add(h["request_id"])
        sys.stdout.write(_printable(f"{h['method']} {h['host']}:{h['port']}{h['path']} (rule {h['rule'] or '-'}, "
                                    f"body {h['body_bytes'] if h['body_bytes'] is not None else '-'} B)")
                         + " approve? [y/N] ")
        sys.stdout.flush()
        answer = typed.popleft() if typed else sys.stdin.readline()
        if not answer:
            return False
        yes = answer.strip().lower() in ("y", "yes")
        try:
            reply = _call(sdir, st, op="approve" if yes else "deny", request_id=h["request_id"],
                          **({"for_s": for_s} if yes and for_s else {}))
            print(reply["message"], flush=True)
        except GvmrtError as exc:
            print(f"not answered: {exc}", flush=True)
        return True

    try:
        for h in _call(sdir, st, op="pending")["pending"]:
            if not ask(h):
                return
        while True:
            try:
                h = held.get(timeout=0.2)
            except queue.Empty:
                if select.select([sys.stdin], [], [], 0)[0]:
                    line = sys.stdin.readline()
                    if not line:
                        return          # end of input: nothing more will be answered
                    typed.append(line)
                continue
            if h is None or not ask(h):
                return
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def update(
    cid: str = typer.Argument(..., metavar="ID", help="container id"),
    policy: Optional[str] = typer.Option(None, "--policy", help="a JSON file with the new gvm.egress policy "
                                         "(the policy object, or a whole config.json)"),
    from_bundle: bool = typer.Option(False, "--from-bundle", help="re-read gvm.egress from the bundle's config.json"),
) -> None:
    """Swap a running container's egress policy atomically (old or new per request, never a mix)."""
    if (policy is None) == (not from_bundle):
        raise UsageError("update needs exactly one of --policy FILE and --from-bundle")
    sdir, st = _container(cid)
    path = policy if policy is not None else os.path.join(st["bundle"], "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        from gvmrt.errors import ConfigError
        raise ConfigError(path, "", f"not valid JSON: {exc}") from None
    base = "/gvm/egress"
    if isinstance(data, dict) and ("gvm" in data or "ociVersion" in data):
        gvm = data.get("gvm")
        if not isinstance(gvm, dict) or "egress" not in gvm:
            from gvmrt.errors import ConfigError
            raise ConfigError(path, "/gvm/egress", "is missing: nothing to reload")
        data = gvm["egress"]
    elif policy is not None:
        base = ""
    from gvmrt.policy.matcher import CompiledPolicy
    from gvmrt.policy.model import parse_egress
    model = parse_egress(data, path, base)
    CompiledPolicy.compile(model)            # what the sidecar will do with it, checked here first
    # Sent as canonical JSON text (sorted keys, no spaces): the monitor applies exactly this text
    # and records its SHA-256, without serialising the policy again.
    from gvmrt.control import policy_text
    text = policy_text(model.model_dump(mode="json", by_alias=True, exclude_unset=True))
    reply = _call(sdir, st, op="reload", egress_json=text)
    for w in reply.get("warnings") or ():
        sys.stderr.write(f"gvmrt: note: {w}\n")
    print(f"policy of {st['id']} reloaded: {reply['old'][:12]} -> {reply['new'][:12]}")
