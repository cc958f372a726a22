"""Bundles in git and between teammates (issue 6): `gvmrt fmt`, `validate`, `pack`, `unpack`,
`inspect`, and `gvmrt layer add|ls|rm|gc` for the local layer store."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer

from gvmrt.cli.common import check_format
from gvmrt.errors import ConfigError, GvmrtError, UsageError

from gvmrt.cli._bundle import MAX_BYTES, MAX_ENTRIES, Bar, tree_size

layer_app = typer.Typer(name="layer", help="The local content-addressed layer store.", no_args_is_help=True,
                        context_settings={"help_option_names": ["-h", "--help"]})


class Failed(GvmrtError):
    """A check failed (exit status 1); the details were printed."""



def _config_path(bundle: str) -> str:
    path = bundle if bundle.endswith(".json") and os.path.isfile(bundle) else os.path.join(bundle, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file (give a bundle directory with a config.json)")
    return path


# --- fmt / validate -------------------------------------------------------------------------------

def canonical_text(data: Any) -> str:
    """config.json as gvmrt writes it: keys sorted (object members have no order), arrays kept
    (their order means something), 2-space indent, UTF-8 as is, a trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def fmt(
    bundles: list[str] = typer.Argument(..., metavar="BUNDLE...", help="bundle directories (or config.json files)"),
    check: bool = typer.Option(False, "--check", help="change nothing; exit 1 if a config is not formatted"),
) -> None:
    """Rewrite config.json canonically (sorted keys, 2-space indent, trailing newline) for small diffs."""
    from gvmrt.spec import load_json
    unformatted = []
    for bundle in bundles:
        path = _config_path(bundle)
        with open(path, "rb") as f:
            raw = f.read()
        text = canonical_text(load_json(raw, path))
        if text.encode() == raw:
            continue
        unformatted.append(path)
        if check:
            print(f"would reformat {path}")
            continue
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
        print(f"reformatted {path}")
    if check and unformatted:
        raise Failed(f"{len(unformatted)} config{'s' if len(unformatted) > 1 else ''} not formatted: run `gvmrt fmt`")


def problems_of(bundle: str) -> list[tuple[str, str, str]]:
    """Every problem of a bundle at once: (file, JSON pointer, message). Schema first; the rest
    (the plan's rules, and the host: files the config names) once the schema holds."""
    from pydantic import ValidationError

    from gvmrt.spec import Config
    from gvmrt.spec import load_json
    from gvmrt.validation import errors_of
    path = _config_path(bundle)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = load_json(raw, path)
    except ConfigError as exc:
        return [(path, exc.pointer, exc.message)]
    if not isinstance(data, dict):
        return [(path, "", "must be a JSON object")]
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        return [(path, p, m) for p, m in errors_of(exc, data)]
    out: list[tuple[str, str, str]] = []
    from gvmrt.plan import compile_config
    try:
        compile_config(cfg, [])
    except ConfigError as exc:
        out.append((path, exc.pointer, exc.message))
    rootfs = os.path.join(base, cfg.root.path)
    if not os.path.isdir(rootfs):
        out.append((path, "/root/path", f"root filesystem {rootfs} is not a directory (build it, or fix root.path)"))
    if cfg.root.layers:
        from gvmrt.layers import Store
        store = Store()
        for i, digest in enumerate(cfg.root.layers):
            if not store.has(digest):
                out.append((path, f"/root/layers/{i}", f"layer {digest} is not in the local store ({store.dir})"))
    for i, m in enumerate(cfg.mounts):
        if m.type == "bind" or "bind" in (m.options or []) or "rbind" in (m.options or []):
            src = m.source if os.path.isabs(m.source or "") else os.path.join(base, m.source or "")
            if not os.path.exists(src):
                out.append((path, f"/mounts/{i}/source", f"{src} does not exist on this host"))
    gvm = cfg.gvm
    if gvm is not None and gvm.egress is not None and gvm.egress.upstream_ca:
        ca = os.path.join(base, gvm.egress.upstream_ca)
        if not os.path.isfile(ca):
            out.append((path, "/gvm/egress/upstream_ca", f"{ca}: no such file in the bundle"))
    if gvm is not None and gvm.audit is not None and gvm.audit.key:
        key = os.path.join(base, os.path.expanduser(gvm.audit.key))
        if not os.path.isfile(key):
            out.append((path, "/gvm/audit/key", f"{key}: no such file (`gvmrt audit keygen -o {key}`)"))
    return out


def validate(
    bundles: list[str] = typer.Argument(..., metavar="BUNDLE...", help="bundle directories (or config.json files)"),
    fmt_: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Check config.json against the schema and this host; print every problem at once."""
    check_format(fmt_)
    found = []
    for bundle in bundles:
        for file, pointer, message in problems_of(bundle):
            found.append({"file": file, "pointer": pointer, "message": message})
    if fmt_ == "json":
        print(json.dumps(found, indent=2))
    else:
        for p in found:
            print(f"{p['file']}: {p['pointer'] or '/'}: {p['message']}")
        if not found:
            print(f"ok: {', '.join(bundles)}")
    if found:
        raise Failed(f"{len(found)} problem{'s' if len(found) > 1 else ''} found")


# --- pack / unpack / inspect ----------------------------------------------------------------------

def pack(
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="bundle directory"),
    output: str = typer.Option(..., "--output", "-o", help="the .gvmb file to write"),
    sign: Optional[str] = typer.Option(None, "--sign", help="Ed25519 private key (PEM, 0600) to sign the manifest"),
    level: int = typer.Option(1, "--level", help="zstd level: 1 (fast, default) to 19 (small)"),
    fmt_: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Pack a bundle (config.json, its files, its root filesystem or layers) into one reproducible file."""
    from gvmrt.cli._bundle import pack_cmd
    pack_cmd(bundle, output, sign, fmt_, level)


def unpack(
    archive: str = typer.Argument(..., metavar="FILE", help="a .gvmb file"),
    dest: str = typer.Argument(..., metavar="DIR", help="the new bundle directory"),
    pubkey: Optional[str] = typer.Option(None, "--pubkey", help="require a signature by this key (PEM)"),
    max_bytes: int = typer.Option(MAX_BYTES, "--max-bytes", help="refuse bundles that expand to more"),
    max_entries: int = typer.Option(MAX_ENTRIES, "--max-entries", help="refuse bundles with more entries"),
    fmt_: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """Verify (signature, every digest, every path) and unpack a .gvmb; nothing is written until it checks out."""
    from gvmrt.cli._bundle import unpack_cmd
    unpack_cmd(archive, dest, pubkey, max_bytes, max_entries, fmt_)


def inspect(
    archive: str = typer.Argument(..., metavar="FILE", help="a .gvmb file"),
    pubkey: Optional[str] = typer.Option(None, "--pubkey", help="require a signature by this key (PEM)"),
    fmt_: str = typer.Option("text", "--format", help="text or json"),
) -> None:
    """What a .gvmb holds (config and policy summary, layers, sizes, signer) without unpacking it."""
    from gvmrt.cli._bundle import inspect_cmd
    inspect_cmd(archive, pubkey, fmt_)


# --- layers ---------------------------------------------------------------------------------------

@layer_app.command("add")
def layer_add(src: str = typer.Argument(..., metavar="DIR|TAR",
                                        help="a directory tree, or a tar archive of one (.tar, .gz, .xz, .zst)")) -> None:
    """Store a tree as a read-only layer; print its digest (for root.layers)."""
    from gvmrt.layers import Store
    store = Store()
    if os.path.isdir(src):
        bar = Bar(lambda: tree_size(src), "hashing")
        add = store.add_dir
    elif os.path.isfile(src):
        bar = Bar(lambda: 0, "extracting")
        add = store.add_tar
    else:
        raise UsageError(f"{src}: no such directory or file")
    try:
        digest, added, notes = add(src, on_bytes=bar)
    finally:
        bar.close()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(digest)
    print(f"{'added to' if added else 'already in'} {store.dir}", file=sys.stderr)


@layer_app.command("ls")
def layer_ls(fmt_: str = typer.Option("text", "--format", help="text or json")) -> None:
    """The layers in the store."""
    from gvmrt.layers import Store
    check_format(fmt_)
    rows = Store().list()
    if fmt_ == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'DIGEST':<71}  {'FILES':>7}  {'SIZE':>10}  ADDED")
    for r in rows:
        print(f"{r['digest']:<71}  {r['files']:>7}  {r['size'] / 1e6:>8.1f}MB  {r['added']}")


@layer_app.command("rm")
def layer_rm(digests: list[str] = typer.Argument(..., metavar="DIGEST...", help="digests or unique prefixes")) -> None:
    """Remove layers from the store (containers running on them keep their mounts)."""
    from gvmrt.layers import Store
    store = Store()
    for text in digests:
        d = store.resolve(text)
        store.remove(d)
        print(f"removed {d}")


@layer_app.command("gc")
def layer_gc(
    keep: list[str] = typer.Option([], "--keep", metavar="BUNDLE", help="a bundle whose layers stay (repeatable)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be removed"),
) -> None:
    """Remove every layer that no container of this state root and no --keep bundle uses."""
    from gvmrt.cli.app import GLOBALS
    from gvmrt.layers import Store
    from gvmrt.runtime import Runtime
    from gvmrt.spec import parse_config
    used: set[str] = set()
    for bundle in keep:
        path = _config_path(bundle)
        with open(path, "rb") as f:
            used.update(parse_config(f.read(), path).root.layers)
    for st in Runtime(GLOBALS.get("--root")).list():
        path = os.path.join(st.get("bundle") or "", "config.json")
        try:
            with open(path, "rb") as f:
                used.update(parse_config(f.read(), path).root.layers)
        except (OSError, GvmrtError):
            continue
    store = Store()
    freed = 0
    for r in store.list():
        if r["digest"] in used:
            continue
        freed += r["size"]
        if not dry_run:
            store.remove(r["digest"])
        print(f"{'would remove' if dry_run else 'removed'} {r['digest']} ({r['size'] / 1e6:.1f} MB)")
    print(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB; kept {len(used)} layer(s) in use", file=sys.stderr)
