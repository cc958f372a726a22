"""Small things every CLI module needs once: the --format check, the global --root, writing a
new file. Stdlib only (gvmrt.cli._bundle runs without typer)."""

from __future__ import annotations

from typing import Optional

from gvmrt.errors import UsageError


def check_format(fmt: str) -> str:
    if fmt not in ("text", "json"):
        raise UsageError(f"--format {fmt!r}: text or json")
    return fmt


def root() -> Optional[str]:
    """The global --root option (parsed by gvmrt.cli before typer ran the command)."""
    from gvmrt.cli.app import GLOBALS
    return GLOBALS.get("--root")


def write_new(path: str, text: str, exists_hint: str = "") -> None:
    """Write `text` to `path`, which must not exist yet (one-line errors)."""
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise UsageError(f"{path} exists already{exists_hint}") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
