"""JSON for the lifecycle hot path, on the stdlib's C scanner and string encoder.

`import json` pulls in `re` (json.decoder and json.encoder compile regexes at import), which costs
~4 ms here, a third of the budget of `gvmrt state` (DESIGN.md §3). The C accelerator `_json` does
the real work for the stdlib module anyway; this module calls it directly. Output is the same as
json.dumps with ensure_ascii (the default) for the types gvmrt stores: dict, list, str, int, bool,
None, float.
"""

from __future__ import annotations

import _json

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_WS = " \t\n\r"


class _Context:
    # The attributes _json.make_scanner reads (json.decoder.JSONDecoder's).
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


_scan = _json.make_scanner(_Context())
_esc = _json.encode_basestring_ascii


class JSONError(ValueError):
    pass


def loads(data: bytes | str):  # noqa: ANN201 - any JSON value
    text = data.decode() if isinstance(data, bytes) else data
    start = len(text) - len(text.lstrip(_WS))
    try:
        obj, end = _scan(text, start)
    except StopIteration as exc:
        raise JSONError(f"expecting a value at character {exc.value}") from None
    if text[end:].strip(_WS):
        raise JSONError(f"extra data at character {end}")
    return obj


def dumps(obj, indent: int | None = None) -> str:  # noqa: ANN001
    out: list[str] = []
    _encode(obj, out, indent, 0)
    return "".join(out)


def _encode(obj, out: list[str], indent: int | None, level: int) -> None:  # noqa: ANN001, C901
    if isinstance(obj, str):
        out.append(_esc(obj))
    elif obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(_float(obj))
    elif isinstance(obj, (list, tuple)):
        if not obj:
            out.append("[]")
            return
        sep, nl, close = _layout(indent, level)
        out.append("[" + nl)
        for i, item in enumerate(obj):
            if i:
                out.append(sep)
            _encode(item, out, indent, level + 1)
        out.append(close + "]")
    elif isinstance(obj, dict):
        if not obj:
            out.append("{}")
            return
        sep, nl, close = _layout(indent, level)
        out.append("{" + nl)
        for i, (key, value) in enumerate(obj.items()):
            if i:
                out.append(sep)
            out.append(_esc(_key(key)) + (": " if indent is not None else ":"))
            _encode(value, out, indent, level + 1)
        out.append(close + "}")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def _float(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "Infinity" if x > 0 else "-Infinity"
    return float.__repr__(x)


def _key(key) -> str:  # noqa: ANN001 - json.dumps's key coercion
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, float):
        return _float(key)
    if isinstance(key, int):
        return int.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _layout(indent: int | None, level: int) -> tuple[str, str, str]:
    if indent is None:
        return ",", "", ""
    inner = "\n" + " " * (indent * (level + 1))
    return "," + inner, inner, "\n" + " " * (indent * level)
