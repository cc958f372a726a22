"""Egress policy of the sidecar (DESIGN.md §6): models, path canonicalisation, the compiled matcher.

Pure: values in, a `Verdict` out; the proxy does the I/O and the audit log records the verdict.
"""

from gvmrt.policy.canon import BadHost, UnsafePath, canonical_host, canonical_path, canonical_paths, parse_query
from gvmrt.policy.matcher import CompiledPolicy, Verdict
from gvmrt.policy.model import (
    CAUTION, Allow, AuditOnly, Decision, Delay, Deny, Egress, RequireApproval, Rule, parse_egress, severity,
)

__all__ = [
    "Allow", "AuditOnly", "BadHost", "CAUTION", "CompiledPolicy", "Decision", "Delay", "Deny", "Egress",
    "RequireApproval", "Rule", "UnsafePath", "Verdict", "canonical_host", "canonical_path", "canonical_paths",
    "parse_egress", "parse_query", "severity",
]
