"""What every pydantic model of config.json shares: the strict base, located errors, JSON pointers.

`gvmrt.spec` (the OCI part) and `gvmrt.policy.model` (the `gvm.egress` part) both build on this
module, so a problem anywhere in config.json is reported one way: the RFC 6901 pointer of the
offending value and a message a person can act on. It lives apart from both so that neither has
to import the other to report an error (spec imports the policy models).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Strict", "At", "pointer", "message", "errors_of", "SPEC_UNSUPPORTED", "DISCRIMINATORS"]


class Strict(BaseModel):
    # strict: a JSON value must already have the right type, as Go's encoding/json (runc, the
    # reference) requires; pydantic's lax mode would read "noNewPrivileges": "no" as false and
    # "uid": "0" as 0, so a config gvmrt accepts could be one runc refuses.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class At(ValueError):
    """A validator error about a member of the value being validated.

    ``path`` (keys and indexes, relative to the validated value) is appended to pydantic's
    location, so the JSON pointer names e.g. /process/env/3 rather than the whole list, or
    /hostname rather than the document when a model-level check fails.
    """

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


# Runtime-spec settings gvmrt has no field for (newer than the models, or not implemented): a
# person who writes one gets "not supported" rather than "check the spelling".
SPEC_UNSUPPORTED = {"ioPriority", "scheduler", "execCPUAffinity", "netDevices", "memoryPolicy"}

# The keys that select the member of a discriminated union in the config models (the policy's
# decisions: {"action": "delay", "ms": 300}). pydantic puts the selected tag in ``loc`` after the
# field (decision/delay/ms); a member of ``loc`` equal to the value of one of these keys of the
# object being walked is that tag, not a key of the document.
DISCRIMINATORS = ("action",)

_MISSING = object()


def _document_path(loc: tuple[Any, ...], data: Any) -> list[str | int]:
    """The members of pydantic's ``loc`` that are keys or indexes of the document ``data``.

    pydantic mixes in names of its own: validator names ("function-after[...]") and the tag of a
    discriminated union (/decision/delay/ms for {"decision": {"action": "delay"}}), which name no
    value of the document. Walking the document drops those: a tag is recognised as the value of
    the object's discriminator key (`DISCRIMINATORS`); any other member of ``loc`` that is not a
    key there is kept only as the last one (a missing required field), or when the walk has left
    the document (below a value of the wrong type).
    """
    out: list[str | int] = []
    node = data
    tag_skipped = False
    for i, part in enumerate(loc):
        if isinstance(part, str) and part.startswith(("function-", "[")) and part.endswith("]"):
            continue  # validator and dict-key markers: never part of the document
        last = i == len(loc) - 1
        if isinstance(node, dict):
            if not tag_skipped and isinstance(part, str) and any(node.get(d) == part for d in DISCRIMINATORS):
                tag_skipped = True  # once per object: a key named like the tag may follow it
                continue  # a discriminated union's tag, even when the object also has a key of that name
            tag_skipped = False
            if part in node:
                node = node[part]
            elif last:
                node = _MISSING
            else:
                continue  # not a key of the document: a marker of pydantic's own
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = _MISSING
        out.append(part)
    return out


def pointer(parts: list[str | int] | tuple[str | int, ...], base: str = "") -> str:
    """RFC 6901 JSON pointer of ``parts`` under the pointer ``base``."""
    return base + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def message(err: dict[str, Any]) -> str:
    """A one-line message for one of pydantic's errors, to follow a pointer and a colon."""
    kind = err["type"]
    loc = err["loc"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden" and loc and loc[-1] in SPEC_UNSUPPORTED:
        return "is a runtime-spec setting gvmrt does not support; remove it"
    if kind == "extra_forbidden":
        return "is not a field gvmrt knows here (check the spelling; unknown settings are refused, not ignored)"
    if kind == "too_short" and loc and loc[-1] == "args":
        return "must be a non-empty list"
    ctx = err.get("ctx") or {}
    if kind == "union_tag_invalid":
        tag = str(ctx.get("discriminator", "tag")).strip("'")
        return f"unknown {tag} {ctx.get('tag')!r}: does not match any of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "is required"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    # pydantic's own messages start a sentence ("Input should be ..."); ours follow a pointer and a
    # colon, so lower the first letter of an ordinary word, never of a name ("RLIMIT_NOFILE", "OCI").
    if msg[:1].isupper() and msg[1:2].islower():
        msg = msg[0].lower() + msg[1:]
    return msg


def errors_of(exc: ValidationError, data: Any, base: str = "") -> list[tuple[str, str]]:
    """(JSON pointer, message) for every problem pydantic found validating the document ``data``.

    ``base`` is the pointer of ``data`` in its file ("" for the whole config.json, "/gvm/egress"
    when only the egress policy was validated).
    """
    errors = exc.errors(include_url=False)
    # A misspelt key ("host" for "hosts") is both an unknown key and a missing field of the same
    # object; pydantic lists the missing field first, but the typo is the problem to report.
    missing: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "missing" and err["loc"] and isinstance(err["loc"][-1], str):
            missing.setdefault(tuple(err["loc"][:-1]), []).append(err["loc"][-1])

    def suggestion(err: dict[str, Any]) -> str | None:
        if err["type"] != "extra_forbidden" or not err["loc"] or not isinstance(err["loc"][-1], str):
            return None
        close = difflib.get_close_matches(err["loc"][-1], missing.get(tuple(err["loc"][:-1]), []), n=1)
        return close[0] if close else None

    out = []
    for err in sorted(errors, key=lambda e: suggestion(e) is None):  # stable: otherwise pydantic's order
        parts = _document_path(tuple(err["loc"]), data)
        ctx = err.get("ctx") or {}
        if err["type"] == "union_tag_not_found":
            # A missing tag is a missing key: /decision/action, like any other required field.
            tag = str(ctx.get("discriminator", "")).strip("'")
            if tag:
                parts.append(tag)
        at = ctx.get("error")
        if isinstance(at, At):
            parts += list(at.path)
        text = message(err)
        close = suggestion(err)
        if close:
            text = f"is not a field gvmrt knows here; did you mean {close!r}?"
        out.append((pointer(parts, base), text))
    return out
