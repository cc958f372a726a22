"""The bodies of `gvmrt pack`, `unpack` and `inspect`, without typer: gvmrt.cli dispatches these
verbs itself (they move hundreds of megabytes next to tar, and typer's imports cost ~80 ms);
gvmrt.cli.bundle wraps the same functions for typer's help."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional

from gvmrt.cli.common import check_format

MAX_BYTES = 16 << 30
MAX_ENTRIES = 1_000_000



class Bar:
    """A progress bar on a terminal (rich), nothing otherwise."""

    def __init__(self, total: Callable[[], int], what: str) -> None:
        """`total` is asked only on a terminal (it may walk a tree)."""
        self.progress = None
        if sys.stderr.isatty() and (n := total()) > 0:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
            self.progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), transient=True)
            self.task = self.progress.add_task(what, total=n)
            self.progress.start()

    def __call__(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def tree_size(path: str) -> int:
    total = 0
    for d, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


def pack_cmd(bundle: str, output: str, sign: Optional[str], fmt_: str, level: int = 1) -> None:
    from gvmrt.pack import pack as do_pack
    check_format(fmt_)
    signer = None
    if sign is not None:
        from gvmrt.audit.keys import load_private
        signer = load_private(sign)
    bar = Bar(lambda: tree_size(bundle) if os.path.isdir(bundle) else 0, "packing")
    try:
        res = do_pack(bundle, output, sign=signer, progress=bar, level=level)
    finally:
        bar.close()
    for note in res["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if fmt_ == "json":
        print(json.dumps(res, indent=2))
        return
    print(f"packed {bundle} -> {res['file']}: {res['entries']} entries, {res['bytes'] / 1e6:.1f} MB -> "
          f"{res['size'] / 1e6:.1f} MB" + (f", {len(res['layers'])} layer(s)" if res["layers"] else "")
          + (f", signed by key {res['signed_by']}" if res["signed_by"] else ", unsigned"))


def unpack_cmd(archive: str, dest: str, pubkey: Optional[str], max_bytes: int, max_entries: int, fmt_: str) -> None:
    from gvmrt.audit.keys import load_public
    from gvmrt.pack import Limits
    from gvmrt.pack import unpack as do_unpack
    check_format(fmt_)
    pk = load_public(pubkey) if pubkey else None
    def size() -> int:
        from gvmrt.pack import inspect as do_inspect
        return int((do_inspect(archive, pk).get("totals") or {}).get("bytes", 0))
    bar = Bar(size, "unpacking")
    try:
        res = do_unpack(archive, dest, pk, limits=Limits(max_bytes, max_entries), progress=bar)
    finally:
        bar.close()
    if fmt_ == "json":
        print(json.dumps(res, indent=2))
        return
    print(f"unpacked {archive} -> {res['dest']}: {res['entries']} entries, {res['bytes'] / 1e6:.1f} MB; "
          f"{res['signature']}")
    for d in res["layers_added"]:
        print(f"layer {d}: added to the store")
    for d in res["layers_present"]:
        print(f"layer {d}: already in the store, not unpacked again")


def inspect_cmd(archive: str, pubkey: Optional[str], fmt_: str) -> None:
    from gvmrt.audit.keys import load_public
    from gvmrt.pack import inspect as do_inspect
    check_format(fmt_)
    info = do_inspect(archive, load_public(pubkey) if pubkey else None)
    if fmt_ == "json":
        print(json.dumps(info, indent=2))
        return
    b = info.get("bundle") or {}
    t = info.get("totals") or {}
    pol = b.get("policy")
    print(f"file:        {info['file']} ({info['size'] / 1e6:.1f} MB)")
    print(f"signature:   {info['signature']}")
    print(f"contents:    {t.get('entries')} entries, {t.get('files')} files, {t.get('bytes', 0) / 1e6:.1f} MB expanded")
    print(f"config:      sha256 {str(b.get('config_sha256'))[:16]}..., root {b.get('root')}, runs {b.get('args')}")
    if pol is None:
        print("policy:      not governed (no gvm section)")
    else:
        default = pol.get("default") or {"action": "delay", "ms": 300}
        print(f"policy:      {pol['rules']} rules ({', '.join(pol['decisions']) or 'none'}), default "
              f"{default.get('action')}, mode {pol['mode']}")
    if b.get("credentials"):
        print(f"credentials: {', '.join(b['credentials'])} (secrets are never in a bundle)")
    for d, lay in (info.get("layers") or {}).items():
        print(f"layer:       {d} ({lay['files']} files, {lay['bytes'] / 1e6:.1f} MB)")
