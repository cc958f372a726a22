"""Unit tests for gvmrt._json: the hot-path JSON codec must agree with the stdlib json module.

Pure: no files, no processes. The property tests compare against `json` for every JSON-able value
gvmrt could store (str-keyed dicts, lists, str with non-ASCII and control characters, big ints,
bools, None, finite floats).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gvmrt import _json

FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Text that includes control characters, quotes, backslashes, non-ASCII (BMP and astral), and lone
# surrogates (Python str can hold them; json.dumps with ensure_ascii escapes them as \udXXX).
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=20) | st.sampled_from(
    ["", "\x00", "\x1f", "\x7f", '"', "\\", "/", "\u2028\u2029", "é", "日本", "\U0001f600", "\ud800", "\b\f\n\r\t"])
INTS = st.integers() | st.integers(min_value=-(10 ** 60), max_value=10 ** 60) | st.sampled_from(
    [0, -1, 2 ** 63, -(2 ** 63) - 1, 2 ** 64, 10 ** 300])
FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([0.0, -0.0, 1e-320, 1e308, 0.1, 1.5e16])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=25,
)


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types (1 == 1.0 == True in Python) and the sign of 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


# --- dumps -----------------------------------------------------------------------------------

@FAST
@given(VALUES, st.integers(min_value=0, max_value=4))
def test_dumps_matches_stdlib(v: Any, indent: int) -> None:
    assert _json.dumps(v) == json.dumps(v, separators=(",", ":"))
    assert _json.dumps(v, indent=2) == json.dumps(v, indent=2)
    assert _json.dumps(v, indent=indent) == json.dumps(v, indent=indent)


@pytest.mark.parametrize("v", [
    {}, [], "", {"a": {}}, {"a": []}, [[]], [{}], {"": ""},
    {"k": [1, {"x": None, "y": [True, False]}], "é": "\x00"},
])
def test_dumps_edge_shapes(v: Any) -> None:
    assert _json.dumps(v) == json.dumps(v, separators=(",", ":"))
    assert _json.dumps(v, indent=2) == json.dumps(v, indent=2)


def test_dumps_tuple_is_a_list() -> None:
    assert _json.dumps((1, "a", (None,))) == '[1,"a",[null]]'


def test_dumps_escapes_to_ascii() -> None:
    out = _json.dumps({"é": "日\U0001f600\x01"})
    assert out.isascii()
    assert out == '{"\\u00e9":"\\u65e5\\ud83d\\ude00\\u0001"}'


def test_dumps_int_keys_like_stdlib() -> None:
    assert _json.dumps({1: 2}) == json.dumps({1: 2}, separators=(",", ":")) == '{"1":2}'


@pytest.mark.parametrize("bad", [object(), {1, 2}, b"bytes", 1j])
def test_dumps_refuses_other_types(bad: Any) -> None:
    with pytest.raises(TypeError, match="cannot encode"):
        _json.dumps({"x": [bad]})


@pytest.mark.parametrize("v", [math.inf, -math.inf, math.nan])
def test_dumps_non_finite_float_like_stdlib(v: float) -> None:
    assert _json.dumps(v) == json.dumps(v)


@pytest.mark.parametrize("key", [True, False, None])
def test_dumps_bool_none_keys_like_stdlib(key: Any) -> None:
    assert _json.dumps({key: 1}) == json.dumps({key: 1}, separators=(",", ":"))


# --- loads -----------------------------------------------------------------------------------

@FAST
@given(VALUES, st.text(" \t\n\r", max_size=5), st.text(" \t\n\r", max_size=5))
def test_loads_roundtrips(v: Any, before: str, after: str) -> None:
    assert same(_json.loads(json.dumps(v)), v)
    assert same(_json.loads(json.dumps(v, indent=2)), v)
    assert same(_json.loads(json.dumps(v, ensure_ascii=False)), v)
    assert same(_json.loads(_json.dumps(v)), v)
    # bytes input, and leading/trailing JSON whitespace
    assert same(_json.loads(json.dumps(v).encode()), v)
    assert same(_json.loads(before + _json.dumps(v, indent=2) + after), v)
    assert same(_json.loads((before + json.dumps(v) + after).encode()), v)
    try:
        raw = json.dumps(v, ensure_ascii=False).encode()  # UTF-8 text, unless v holds a lone surrogate
    except UnicodeEncodeError:
        return
    assert same(_json.loads(raw), v)


def test_loads_bytes_utf8_non_ascii() -> None:
    assert _json.loads('{"é":"日本"}'.encode()) == {"é": "日本"}


@pytest.mark.parametrize("text", [" 1", "1 ", "\t\n\r {} \r\n\t", "\n[\n1\n]\n"])
def test_loads_whitespace_examples(text: str) -> None:
    assert _json.loads(text) == json.loads(text)
    assert _json.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", ["1 2", "{} {}", "[]x", "null,", "true false", '"a""b"', "1 /", "{}\x00", "0 \f"])
def test_loads_refuses_trailing_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="extra data"):
        _json.loads(text)


MALFORMED = [
    "", " ", "\n\t", "nul", "tru", "-", "+1", "01", ".5", "1.", "1e", "[", "]", "[1,", "[1,]", "[1 2]", "{", "}",
    '{"a"', '{"a":', '{"a":1,}', "{a:1}", "{'a':1}", '{"a" 1}', '"abc', '"\\x"', '"\\u12"', '"\x01"', '"\n"',
    "undefined", "Infinity-", "[,]", "{,}", "\ufeff{}", "\f1", "\u00a01", "True", "None", "0x10",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_loads_malformed_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError) as info:
        _json.loads(text)
    assert not isinstance(info.value, (StopIteration, IndexError))
    with pytest.raises(ValueError):
        json.loads(text)  # the stdlib agrees it is malformed


@pytest.mark.parametrize("text", MALFORMED)
def test_loads_malformed_bytes_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        _json.loads(text.encode())


def test_loads_invalid_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        _json.loads(b'"\xff"')


@FAST
@given(st.text(max_size=30) | st.text(' \t\n\r{}[]:,"\\0123456789.eE+-truefalsnNIiy', max_size=30))
def test_loads_never_leaks_scanner_exceptions(text: str) -> None:
    """Whatever the input: a value, or a ValueError (never StopIteration, IndexError, ...)."""
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            _json.loads(text)
    else:
        assert same(_json.loads(text), expected)


@settings(FAST, max_examples=60)
@given(VALUES, st.integers(min_value=0, max_value=200))
def test_loads_truncated_is_value_error_or_prefix_value(v: Any, cut: int) -> None:
    text = json.dumps(v)
    prefix = text[: min(cut, len(text))]
    try:
        expected = json.loads(prefix)
    except ValueError:
        with pytest.raises(ValueError):
            _json.loads(prefix)
    else:
        assert same(_json.loads(prefix), expected)


def test_loads_constants_like_stdlib() -> None:
    assert _json.loads("Infinity") == math.inf
    assert _json.loads("-Infinity") == -math.inf
    assert math.isnan(_json.loads("NaN"))


def test_loads_big_int_and_float_types() -> None:
    assert _json.loads(str(10 ** 100)) == 10 ** 100
    assert type(_json.loads("1")) is int
    assert type(_json.loads("1.0")) is float
    assert type(_json.loads("1e2")) is float


def test_loads_duplicate_keys_last_wins_like_stdlib() -> None:
    assert _json.loads('{"a":1,"a":2}') == json.loads('{"a":1,"a":2}') == {"a": 2}


def test_loads_error_is_a_value_error_subclass() -> None:
    assert issubclass(_json.JSONError, ValueError)
