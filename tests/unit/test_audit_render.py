"""The sidecar's rendered audit records (audit.chain.Rendered): byte for byte what the general
canonical encoder makes of the same entry, so a log written either way verifies the same."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gvmrt.audit.chain import VERSION, Chain, canonical
from gvmrt.audit.verify import parse_line
from gvmrt.proxy.server import _Exchange

# Any text, including what JSON must escape (quotes, backslashes, control characters) and what
# canonical form writes as \\u escapes (non-ASCII, astral characters, lone surrogates).
TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
INT = st.integers(min_value=0, max_value=10**15)


@st.composite
def exchanges(draw: Any) -> _Exchange:
    ex = _Exchange(draw(TEXT), draw(TEXT), draw(TEXT), draw(st.integers(0, 65535)), draw(TEXT),
                   container=draw(TEXT), mode=draw(st.sampled_from(["proxy", "transparent"])))
    ex.rule = draw(st.none() | TEXT)
    ex.decision = draw(st.sampled_from(["allow", "audit_only", "delay", "deny"]))
    ex.reason = draw(TEXT)
    # Beyond the types the sidecar sets (a status from int(), flagged from bool expressions), any
    # JSON scalar must still come out as canonical() writes it.
    ex.status = draw(st.none() | st.integers(0, 999) | st.booleans())
    ex.bytes_out = draw(INT)
    ex.bytes_in = draw(st.none() | INT | st.booleans())
    ex.flagged = draw(st.booleans() | st.integers(0, 2) | st.none())
    ex.started -= draw(st.floats(0, 10**6, allow_nan=False))
    return ex


def _as_canonical(rendered: str, made: dict[str, Any], seq: int, prev: str) -> str:
    """`canonical` of the dict form, given the time and duration the renderer read itself."""
    obj = json.loads(rendered)
    made.update(time=obj["time"], duration_ms=obj["duration_ms"], v=VERSION, seq=seq, prev=prev)
    return canonical(made)


@settings(max_examples=400, deadline=None)
@given(exchanges(), st.integers(0, 2**53), st.text("0123456789abcdef", min_size=64, max_size=64))
def test_a_rendered_decision_is_the_canonical_form_of_entry(ex: _Exchange, seq: int, prev: str) -> None:
    rendered = ex.render_decision(seq, prev)
    assert rendered == _as_canonical(rendered, ex.entry(), seq, prev)
    assert rendered.isascii()


@settings(max_examples=400, deadline=None)
@given(exchanges(), st.integers(0, 2**53), st.text("0123456789abcdef", min_size=64, max_size=64),
       st.booleans())
def test_a_rendered_outcome_is_the_canonical_form_of_outcome(ex: _Exchange, seq: int, prev: str,
                                                             ended: bool) -> None:
    if ended:
        ex.ended = ("2026-11-26T01:02:03.456Z", 12.345)
    rendered = ex.render_outcome(seq, prev)
    assert rendered == _as_canonical(rendered, ex.outcome(), seq, prev)
    if ended:
        assert json.loads(rendered)["duration_ms"] == 12.345


def test_a_chain_of_rendered_and_dict_entries_verifies_line_by_line() -> None:
    ex = _Exchange("r-1", "GET", "api.example", 443, "/v1/\u00e9?q=\"x\"", container="c")
    ex.rule, ex.decision, ex.status = "allow-api", "allow", None
    chain = Chain("0" * 32)
    lines = [chain.append({"record": "log", "time": "2026-11-26T01:02:03.456Z"}),
             chain.append(ex.render_decision), chain.append(ex.render_outcome)]
    prev = "0" * 64
    for seq, raw in enumerate(lines):
        obj, h, problem = parse_line(raw)
        assert problem is None and obj is not None
        assert (obj["seq"], obj["prev"]) == (seq, prev)
        prev = h
    assert chain.prev == prev and len(chain.leaves) == 3
