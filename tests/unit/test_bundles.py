"""The example bundles in bundles/ stay valid as the config model changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gvmrt.plan import compile_config
from gvmrt.spec import parse_config

BUNDLES = sorted((Path(__file__).resolve().parents[2] / "bundles").glob("*/config.json"))


@pytest.mark.parametrize("config", BUNDLES, ids=lambda p: p.parent.name)
def test_example_bundle_validates_and_compiles(config: Path) -> None:
    warnings: list[str] = []
    plan = compile_config(parse_config(config.read_bytes(), str(config)), warnings)
    assert warnings == []
    if config.parent.name == "python-agent":
        gvm = plan["gvm"]
        assert gvm is not None and 8443 in gvm["capture"]
        assert [c["name"] for c in gvm["credentials"]] == ["demo-api"]
        assert any(r["decision"]["action"] == "require_approval" for r in gvm["egress"]["rules"])


def test_there_are_example_bundles() -> None:
    assert {p.parent.name for p in BUNDLES} >= {"hello", "python-agent"}
