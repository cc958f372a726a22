"""What the matcher hands out: decisions as small frozen values, without pydantic.

The pydantic models of `gvmrt.policy.model` validate a policy (at `gvmrt create`, once per config
content); the sidecar compiles the *validated JSON* (`CompiledPolicy.from_json`) and never imports
pydantic: that import is ~70 ms and ~12 MB of the monitor's start and RSS here. So the decision
kinds exist twice, once as models (validation, schema) and once here (matching, serving); a unit
test checks the two agree on every field and default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "severity", "ALLOW", "CAUTION_JSON", "UNINSPECTABLE_JSON"]

# Most restrictive last. When several forms of one request (raw and canonical paths) reach
# different rules, the matcher keeps the highest (DESIGN.md §6: encoding never turns Deny into Allow).
_SEVERITY = {"allow": 0, "audit_only": 1, "delay": 2, "require_approval": 3, "deny": 4}

# Defaults of the policy, as JSON (the models' defaults are built from these too).
CAUTION_JSON = {"action": "delay", "ms": 300}
UNINSPECTABLE_JSON = {"action": "deny", "reason": "the request body could not be inspected"}


@dataclass(frozen=True, slots=True)
class Decision:
    action: str                    # allow, audit_only, delay, require_approval, deny
    ms: int | None = None          # delay
    timeout_s: int | None = None   # require_approval
    reason: str | None = None      # deny

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(data["action"], data.get("ms"), data.get("timeout_s"), data.get("reason"))


ALLOW = Decision("allow")


def severity(decision: Any) -> tuple[int, int]:
    """Sort key: higher is more restrictive; a longer delay or approval wait is more restrictive.
    Takes a `Decision` or a decision model (anything with the same attributes)."""
    extra = getattr(decision, "ms", None) or getattr(decision, "timeout_s", None) or 0
    return _SEVERITY[decision.action], extra
