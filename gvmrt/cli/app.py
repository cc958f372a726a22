"""The full CLI (typer): `spec` and every verb that is not on the per-container hot path.

The lifecycle verbs (create, start, state, kill, delete, run, list) are parsed by the stdlib
dispatcher in gvmrt.cli; they are listed here too so `gvmrt --help` shows the whole tool.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

import typer

from gvmrt import __version__

app = typer.Typer(
    name="gvmrt",
    help="A rootless, OCI-style container runtime for autonomous AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _globals(
    root: Optional[str] = typer.Option(None, "--root", help="state directory (default $XDG_RUNTIME_DIR/gvmrt)"),
    log: Optional[str] = typer.Option(None, "--log", help="also write errors to FILE"),
    log_format: str = typer.Option("text", "--log-format", help="text or json"),
    debug: bool = typer.Option(False, "--debug", help="print debug messages"),
    version: bool = typer.Option(False, "--version", "-v", help="print the version"),
) -> None:
    """Global options (they go before the command, as with runc)."""


@app.command()
def spec(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b",
                                         help="write DIR/config.json (refuses to overwrite) instead of printing"),
    rootless: bool = typer.Option(True, "--rootless/--no-userns",
                                  help="put the jail in a user namespace (default; also for root)"),
    with_mappings: bool = typer.Option(False, "--with-mappings",
                                       help="write uid/gid mappings for you (runc needs them; they tie the bundle to your uid)"),
    args: Optional[list[str]] = typer.Argument(None, help="the agent's command (default: sh)"),
) -> None:
    """Print a starting config.json: OCI runtime-spec 1.x, rootless, no capabilities, agent seccomp profile.

    Without --with-mappings the config maps whoever runs it to root in the jail (gvmrt and crun do
    that), so the same committed bundle works for every teammate.
    """
    from gvmrt.spec import default_config

    cfg = default_config(rootless=rootless, uid=os.getuid(), gid=os.getgid(), args=args or None)
    if with_mappings and rootless:
        cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": os.getuid(), "size": 1}]
        cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": os.getgid(), "size": 1}]
    text = json.dumps(cfg, indent=2, sort_keys=False) + "\n"
    if bundle is None:
        sys.stdout.write(text)
        return
    from gvmrt.cli.common import write_new
    write_new(os.path.join(bundle, "config.json"), text, "; remove it or print with `gvmrt spec > FILE`")


GLOBALS: dict[str, Any] = {}   # the global options gvmrt.cli parsed (--root ...), for commands here


def _proxy_command() -> None:
    from gvmrt.cli.proxy import proxy
    app.command(name="proxy")(proxy)
    from gvmrt.cli import operator
    for name in ("events", "pending", "approve", "deny", "update"):
        app.command(name=name)(getattr(operator, name))


_proxy_command()


def _groups() -> None:
    from gvmrt.cli.audit import audit_app
    app.add_typer(audit_app, name="audit")
    from gvmrt.cli.policy import policy_app
    app.add_typer(policy_app, name="policy")
    from gvmrt.cli import bundle
    for name in ("fmt", "validate", "pack", "unpack", "inspect"):
        app.command(name=name)(getattr(bundle, name))
    app.add_typer(bundle.layer_app, name="layer")
    from gvmrt.cli import review
    for name in ("diff", "commit"):
        app.command(name=name)(getattr(review, name))


_groups()


def _lifecycle(verb: str) -> Any:
    from gvmrt.cli import VERBS

    def command(ctx: typer.Context) -> None:
        # Reached only for help rendering; gvmrt.cli.main dispatches these verbs before typer.
        raise typer.Exit(0)

    command.__doc__ = VERBS[verb]["help"] + f"\n\nUsage: gvmrt {VERBS[verb]['usage']} (see `gvmrt {verb} --help`)"
    return command


def _register() -> None:
    from gvmrt.cli import VERBS
    for verb in VERBS:
        app.command(name=verb, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            _lifecycle(verb))


_register()


def run_app(argv: list[str], gopts: dict[str, Any], out: Any) -> int:
    """Run typer on ``argv`` (global options were parsed already).

    typer reports its own usage errors (exit 2) and help; GvmrtError from a command propagates to
    gvmrt.cli.main, which prints the one-line message.
    """
    GLOBALS.update(gopts)
    try:
        app(args=argv, prog_name="gvmrt", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


__all__ = ["app", "run_app", "__version__"]
