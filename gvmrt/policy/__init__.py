"""Egress policy of the sidecar (DESIGN.md §6): models, path canonicalisation, the compiled matcher.

Pure: values in, a `Verdict` out; the proxy does the I/O and the audit log records the verdict.
The models (pydantic) are imported only when one of their names is asked for: the sidecar uses
the matcher and the plain decisions alone (gvmrt.policy.decision).
"""

from gvmrt.policy.canon import BadHost, UnsafePath, canonical_host, canonical_path, canonical_paths, parse_query
from gvmrt.policy.decision import Decision, severity
from gvmrt.policy.matcher import CompiledPolicy, Verdict

_MODEL_NAMES = ("CAUTION", "Allow", "AuditOnly", "Delay", "Deny", "Egress", "RequireApproval", "Rule", "parse_egress")

__all__ = [
    "BadHost", "CompiledPolicy", "Decision", "UnsafePath", "Verdict", "canonical_host", "canonical_path",
    "canonical_paths", "parse_query", "severity", *_MODEL_NAMES,
]


def __getattr__(name: str) -> object:
    if name in _MODEL_NAMES:
        from gvmrt.policy import model
        return getattr(model, name)
    raise AttributeError(f"module 'gvmrt.policy' has no attribute {name!r}")
