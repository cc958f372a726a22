"""Pydantic models of the `gvm.egress` section of config.json: ordered rules and their decisions.

Validation only; `gvmrt.policy.matcher` compiles a validated `Egress` into lookup tables. The
models share `gvmrt.validation` with `gvmrt.spec`: strict JSON types, unknown keys refused, frozen
values, and errors as JSON pointers. `gvmrt.spec.Gvm` embeds `Egress`, so `parse_config` reports a
bad policy at its full pointer (/gvm/egress/rules/3/decision/ms); `parse_egress` validates the
egress value alone (hot reload) and reports the same pointers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import AwareDatetime, ConfigDict, Field, ValidationError, field_validator, model_validator

from gvmrt.errors import ConfigError
from gvmrt.policy.canon import BadHost, canonical_host
from gvmrt.policy.decision import CAUTION_JSON, UNINSPECTABLE_JSON
from gvmrt.policy.decision import severity as _severity
from gvmrt.validation import At as _At
from gvmrt.validation import Strict as _Strict
from gvmrt.validation import errors_of

__all__ = ["Allow", "AuditOnly", "Delay", "RequireApproval", "Deny", "Decision", "Rule", "Egress", "Credential",
           "CAUTION", "severity", "parse_egress"]


# --- decisions -----------------------------------------------------------------------------------

class Allow(_Strict):
    action: Literal["allow"]


class AuditOnly(_Strict):
    """Allow, and mark the audit entry for review."""

    action: Literal["audit_only"]


class Delay(_Strict):
    action: Literal["delay"]
    ms: int = Field(ge=0, le=600_000)


class RequireApproval(_Strict):
    """Hold the request until an operator approves or denies it; deny at the timeout."""

    action: Literal["require_approval"]
    timeout_s: int = Field(ge=1, le=86_400)


class Deny(_Strict):
    action: Literal["deny"]
    reason: str = Field(min_length=1, max_length=500)


Decision = Annotated[Union[Allow, AuditOnly, Delay, RequireApproval, Deny], Field(discriminator="action")]

def severity(decision: Allow | AuditOnly | Delay | RequireApproval | Deny) -> tuple[int, int]:
    """Sort key: higher is more restrictive (gvmrt.policy.decision.severity, for models)."""
    return _severity(decision)


# Out of the box, an unmatched request is slowed a little and flagged in the audit log.
CAUTION = Delay(**CAUTION_JSON)

# --- rules ---------------------------------------------------------------------------------------

_RULE_ID = r"^[A-Za-z0-9_.:-]+$"
_METHOD = re.compile(r"[A-Za-z!#$%&'*+.^_`|~0-9-]+")  # RFC 9110 §5.6.2 token
JSON_POINTER = re.compile(r"(/([^~/]|~[01])*)*")  # RFC 6901 §3


def _glob_problem(glob: str) -> str | None:
    if not glob.startswith("/"):
        return f"path glob {glob!r} must start with '/'"
    if "***" in glob:
        return f"path glob {glob!r} has '***'; use '*' (one segment) or '**' (any depth)"
    if "\x00" in glob:
        return "path glob contains NUL"
    return None


class _Scope(_Strict):
    """Which requests something applies to, by method, host and path glob (rules, credentials)."""

    methods: list[str] | None = Field(None, min_length=1)
    hosts: list[str] = Field(min_length=1)
    paths: list[str] | None = Field(None, min_length=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str] | None) -> list[str] | None:
        if methods is None:
            return None
        for i, m in enumerate(methods):
            if not _METHOD.fullmatch(m):
                raise _At((i,), f"{m!r} is not an HTTP method")
        return [m.upper() for m in methods]  # methods are case-sensitive on the wire, but no upstream relies on it

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for i, h in enumerate(hosts):
            wild = h.startswith("*.")
            if h == "*":
                out.append("*")
                continue
            name = h[2:] if wild else h
            if wild and not name:
                raise _At((i,), f"{h!r}: a wildcard needs a domain after '*.' (e.g. '*.example.com')")
            if "*" in name:
                raise _At((i,), f"{h!r}: '*' is allowed only as a whole first label ('*.example.com') or alone")
            if ":" in name and not name.startswith("["):
                raise _At((i,), f"{h!r}: put the port in 'ports', not in the host")
            try:
                canon = canonical_host(name)
            except BadHost as exc:
                raise _At((i,), str(exc) if not wild else f"{h!r}: {exc}") from exc
            out.append("*." + canon if wild else canon)
        return out

    @field_validator("paths")
    @classmethod
    def _paths(cls, paths: list[str] | None) -> list[str] | None:
        for i, g in enumerate(paths or ()):
            problem = _glob_problem(g)
            if problem:
                raise _At((i,), problem)
        return paths



class Rule(_Scope):
    id: str = Field(min_length=1, max_length=128, pattern=_RULE_ID)
    ports: list[Annotated[int, Field(ge=1, le=65535)]] | None = Field(None, min_length=1)
    path_regex: str | None = None
    query: dict[str, str] | None = None
    json_: dict[str, Any] | None = Field(None, alias="json")
    on_uninspectable: Decision = Field(default_factory=lambda: Deny(**UNINSPECTABLE_JSON))
    decision: Decision
    # strict=False: JSON has no datetime type, so an RFC 3339 string must be parsed; naive times
    # are refused (AwareDatetime) because "expires at 18:00" on which clock is a policy bug.
    expires: AwareDatetime | None = Field(None, strict=False)

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, rx: str | None) -> str | None:
        if rx is not None:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"not a valid Python regular expression: {exc}") from exc
        return rx

    @field_validator("json_")
    @classmethod
    def _pointers(cls, fields: dict[str, Any] | None) -> dict[str, Any] | None:
        for ptr in fields or {}:
            if not ptr or not JSON_POINTER.fullmatch(ptr):
                raise _At((ptr,), f"{ptr!r} is not a JSON pointer to a field (RFC 6901, e.g. '/model' or '/messages/0/role')")
        return fields

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.paths is not None and self.path_regex is not None:
            raise _At(("path_regex",), "give either 'paths' (globs) or 'path_regex', not both")
        if "on_uninspectable" in self.model_fields_set and self.json_ is None:
            raise _At(("on_uninspectable",), "applies only to rules with 'json' body fields; remove it")
        return self


# --- credentials (gvm.credentials) ------------------------------------------------------------

_CRED_NAME = r"^[A-Za-z0-9_.-]+$"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_SLOT = "{secret}"


class Inject(_Strict):
    """Where the secret goes: one request header, its value built from `format`."""

    header: str = Field(min_length=1, max_length=128)
    format: str = Field(SECRET_SLOT, min_length=1, max_length=1024)

    @field_validator("header")
    @classmethod
    def _header(cls, h: str) -> str:
        if not _METHOD.fullmatch(h):
            raise ValueError(f"{h!r} is not an HTTP header name")
        if h.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise ValueError(f"{h!r} decides where and how a request goes; a secret cannot go there")
        return h

    @field_validator("format")
    @classmethod
    def _format(cls, f: str) -> str:
        if f.count(SECRET_SLOT) != 1:
            raise ValueError(f"must contain {SECRET_SLOT} exactly once, e.g. 'Bearer {SECRET_SLOT}'")
        if any(c in f for c in "\r\n\x00"):
            raise ValueError("must not contain CR, LF or NUL")
        return f


class Credential(_Scope):
    """A secret the agent may use without holding it: injected by the sidecar into requests in scope
    (hosts, and optionally methods and path globs) after they are allowed."""

    name: str = Field(min_length=1, max_length=64, pattern=_CRED_NAME)
    inject: Inject
    env: str | None = Field(None, max_length=128)
    placeholder: str | None = Field(None, min_length=8, max_length=256)
    # More headers to take out of the agent's requests to these hosts (e.g. "Cookie"), besides
    # Authorization, Proxy-Authorization, X-Api-Key, Api-Key, X-Auth-Token and `inject.header`.
    strip: list[str] | None = None

    @field_validator("strip")
    @classmethod
    def _strip(cls, names: list[str] | None) -> list[str] | None:
        for i, n in enumerate(names or ()):
            if not _METHOD.fullmatch(n):
                raise _At((i,), f"{n!r} is not an HTTP header name")
        return names

    @field_validator("env")
    @classmethod
    def _env(cls, e: str | None) -> str | None:
        if e is not None and not _ENV_NAME.fullmatch(e):
            raise ValueError(f"{e!r} is not an environment variable name")
        return e

    @field_validator("placeholder")
    @classmethod
    def _placeholder(cls, p: str | None) -> str | None:
        if p is not None and not all(c.isalnum() or c in "-_." for c in p):
            raise ValueError("use letters, digits, '-', '_' and '.' (it is matched in request headers)")
        return p


def _unique(items: list[Any], field: str, message: str) -> list[Any]:
    """Refuse a repeated `field` value: `message` is formatted with the value and the first index."""
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        value = getattr(item, field)
        if value in seen:
            raise _At((i, field), message.format(value=value, first=seen[value]))
        seen[value] = i
    return items


def credential_names_unique(creds: list[Credential]) -> list[Credential]:
    return _unique(creds, "name", "credential {value!r} is already declared at {first}; names must be unique")


class Egress(_Strict):
    default: Decision = Field(default_factory=lambda: CAUTION)
    mode: Literal["enforce", "watch"] = "enforce"
    rules: list[Rule] = Field(default_factory=list)
    # Hosts the sidecar may connect to although they resolve to loopback, private, link-local or
    # metadata addresses (exact names; DESIGN.md §5: the sidecar must not become a path to host
    # services unless the policy says so by name).
    allow_private: list[str] = Field(default_factory=list)
    # Static answers for the sidecar's own resolution (curl's --resolve, docker's --add-host):
    # a name here is never looked up. Private addresses still need allow_private.
    resolve: dict[str, list[str]] = Field(default_factory=dict)
    # A PEM file of extra CAs, relative to the bundle directory, trusted for upstream TLS in
    # addition to the host's store (private upstreams; the tests' loopback upstream).
    upstream_ca: str | None = Field(None, min_length=1)

    @field_validator("allow_private")
    @classmethod
    def _private_hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for i, h in enumerate(hosts):
            if "*" in h:
                raise _At((i,), f"{h!r}: name hosts exactly; a wildcard would open private addresses to a whole domain")
            try:
                out.append(canonical_host(h))
            except BadHost as exc:
                raise _At((i,), str(exc)) from exc
        return out

    @field_validator("resolve")
    @classmethod
    def _static(cls, table: dict[str, list[str]]) -> dict[str, list[str]]:
        import ipaddress
        out = {}
        for name, addresses in table.items():
            try:
                host = canonical_host(name)
            except BadHost as exc:
                raise _At((name,), str(exc)) from exc
            if not addresses:
                raise _At((name,), "give at least one address")
            for j, a in enumerate(addresses):
                try:
                    ipaddress.ip_address(a)
                except ValueError:
                    raise _At((name, j), f"{a!r} is not an IP address") from None
            out[host] = list(addresses)
        return out

    @field_validator("upstream_ca")
    @classmethod
    def _ca_path(cls, path: str | None) -> str | None:
        if path is not None and (path.startswith("/") or ".." in path.split("/")):
            raise ValueError(f"{path!r}: give a path inside the bundle directory, relative to it (e.g. 'upstream-ca.pem')")
        return path

    @field_validator("rules")
    @classmethod
    def _unique_ids(cls, rules: list[Rule]) -> list[Rule]:
        # Audit entries name rules by id, so an id must mean one rule.
        return _unique(rules, "id", "rule id {value!r} is already used by rule {first}; ids must be unique")


# --- parsing -------------------------------------------------------------------------------------

def parse_egress(data: Any, file: str = "config.json", base: str = "/gvm/egress") -> Egress:
    """Validate a decoded `gvm.egress` value; raise ConfigError naming the first problem's pointer."""
    if not isinstance(data, dict):
        raise ConfigError(file, base, "must be a JSON object")
    try:
        return Egress.model_validate(data)
    except ValidationError as exc:
        ptr, msg = errors_of(exc, data, base)[0]
        raise ConfigError(file, ptr, msg) from None
