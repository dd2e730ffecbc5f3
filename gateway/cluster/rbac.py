"""Roles: which resources a user may reach, and with which parameters.

A role is a list of *allow* rules, a list of *deny* rules and an optional cap
on the session certificate's lifetime. A rule matches a resource when every
criterion it gives matches:

* ``resources``: glob patterns over the resource name (``"web-*"``);
* ``labels``: for each key, glob patterns over that label's value
  (``{env = ["dev", "staging"]}``); a resource without the key does not match;
* parameter lists (``db_users``, ``db_names``: each kind's registry entry in
  gateway/kinds.py names the ones its dials carry): glob patterns over
  the dial parameter of the same meaning. For an *allow* rule, a dial that
  carries such a parameter is allowed only by a rule that lists it; for a
  *deny* rule, the rule hits when the parameter matches.

A dial is allowed when at least one allow rule of the user's roles matches and
no deny rule of any of the user's roles does: **deny always wins**, whichever
role it comes from. Decisions carry a reason (naming the role and rule) for
the audit log only; what the person dialling is told is :func:`refusal`,
which names neither, and only the parameters roles constrain.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping

import attrs

from gateway import kinds, printable
from gateway.durations import parse_duration

#: rule key -> dial parameter it constrains
PARAM_KEYS = {param.role_key: param.name for param in kinds.params()}


class RoleError(ValueError):
    """A role spec is invalid; the message names the role and the key."""


def _globs(role: str, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise RoleError(f"role {role!r}: {where} must be a string or a list of non-empty strings")
    for glob in value:
        if not printable.is_clean(glob):
            raise RoleError(f"role {role!r}: {where}: {printable.escape(glob)!r} contains a control character "
                            f"({printable.first_unsafe(glob)}); globs match none")
    return tuple(value)


def _match(value: str, patterns: Iterable[str]) -> bool:
    # fnmatchcase: resource names are case-sensitive, whatever the platform.
    # No glob matches a control character (`*` would match a newline, and
    # "ro_\n<forged log line>" would pass for an "ro_*" db user).
    return printable.is_clean(value) and any(fnmatch.fnmatchcase(value, p) for p in patterns)


@attrs.frozen(slots=True, kw_only=True)
class Rule:
    resources: tuple[str, ...] = ()
    labels: tuple[tuple[str, tuple[str, ...]], ...] = ()
    params: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def from_spec(cls, role: str, where: str, spec: Any) -> "Rule":
        if not isinstance(spec, Mapping):
            raise RoleError(f"role {role!r}: each {where} rule must be a table")
        unknown = set(spec) - {"resources", "labels", *PARAM_KEYS}
        if unknown:
            raise RoleError(
                f"role {role!r}: unknown key(s) in {where} rule: {', '.join(sorted(unknown))} "
                f"(expected resources, labels, {', '.join(PARAM_KEYS)})"
            )
        resources = _globs(role, f"{where}.resources", spec["resources"]) if "resources" in spec else ()
        labels_spec = spec.get("labels", {})
        if not isinstance(labels_spec, Mapping):
            raise RoleError(f"role {role!r}: {where}.labels must be a table of key = glob(s)")
        labels = tuple(
            sorted((str(k), _globs(role, f"{where}.labels.{k}", v)) for k, v in labels_spec.items())
        )
        params = tuple(
            sorted((PARAM_KEYS[k], _globs(role, f"{where}.{k}", spec[k])) for k in PARAM_KEYS if k in spec)
        )
        if not resources and not labels:
            raise RoleError(
                f"role {role!r}: a {where} rule needs `resources` or `labels` "
                f"(use resources = [\"*\"] to mean every resource)"
            )
        return cls(resources=resources, labels=labels, params=params)

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.resources:
            spec["resources"] = list(self.resources)
        if self.labels:
            spec["labels"] = {k: list(v) for k, v in self.labels}
        inverse = {v: k for k, v in PARAM_KEYS.items()}
        for key, globs in self.params:
            spec[inverse[key]] = list(globs)
        return spec

    def selects(self, name: str, labels: Mapping[str, str]) -> bool:
        if self.resources and not _match(name, self.resources):
            return False
        for key, patterns in self.labels:
            if key not in labels or not _match(labels[key], patterns):
                return False
        return True

    def allows_params(self, params: Mapping[str, str]) -> bool:
        rule_params = dict(self.params)
        for key in PARAM_KEYS.values():
            if key in params and not _match(params[key], rule_params.get(key, ())):
                return False
        return True

    def denies_params(self, params: Mapping[str, str]) -> bool:
        # A deny rule without parameter lists denies the whole resource.
        return all(key in params and _match(params[key], globs) for key, globs in self.params)


@attrs.frozen(slots=True, kw_only=True)
class Role:
    name: str
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    max_session_ttl: float | None = None

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> "Role":
        if not isinstance(spec, Mapping):
            raise RoleError(f"role {name!r} must be a table")
        unknown = set(spec) - {"allow", "deny", "max_session_ttl"}
        if unknown:
            raise RoleError(
                f"role {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
                f"(expected allow, deny, max_session_ttl)"
            )

        def rules(kind: str) -> tuple[Rule, ...]:
            raw = spec.get(kind, [])
            if isinstance(raw, Mapping):
                raw = [raw]
            if not isinstance(raw, list):
                raise RoleError(f"role {name!r}: {kind} must be a list of rule tables")
            return tuple(Rule.from_spec(name, kind, r) for r in raw)

        ttl = None
        if spec.get("max_session_ttl") is not None:
            try:
                ttl = parse_duration(spec["max_session_ttl"])
            except ValueError as exc:
                raise RoleError(f"role {name!r}: max_session_ttl: {exc}") from None
            if ttl <= 0:
                raise RoleError(f"role {name!r}: max_session_ttl must be positive")
        return cls(name=name, allow=rules("allow"), deny=rules("deny"), max_session_ttl=ttl)

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "allow": [r.to_spec() for r in self.allow],
            "deny": [r.to_spec() for r in self.deny],
        }
        if self.max_session_ttl is not None:
            spec["max_session_ttl"] = self.max_session_ttl
        return spec


@attrs.frozen(slots=True)
class Decision:
    allowed: bool
    reason: str


def decide(
    roles: Iterable[Role], name: str, labels: Mapping[str, str], params: Mapping[str, str] | None = None
) -> Decision:
    """May a holder of ``roles`` dial resource ``name`` with ``params``?"""
    roles = list(roles)
    params = params or {}
    for role in roles:
        for i, rule in enumerate(role.deny):
            if rule.selects(name, labels) and rule.denies_params(params):
                return Decision(False, f"denied by role {role.name!r} (deny rule {i + 1})")
    selected = False
    for role in roles:
        for rule in role.allow:
            if rule.selects(name, labels):
                selected = True
                if rule.allows_params(params):
                    return Decision(True, f"allowed by role {role.name!r}")
    if not roles:
        return Decision(False, "the user has no roles")
    if selected:
        return Decision(False, f"no role allows {_shown(params)} on this resource")
    return Decision(False, f"no role of the user ({', '.join(r.name for r in roles)}) allows this resource")


def constrained(params: Mapping[str, str]) -> dict[str, str]:
    """The dial parameters roles constrain (``db_user``, ``db_name``), of
    all those a dial carries (``pg.application_name``... are not checked)."""
    return {k: v for k, v in params.items() if k in _CONSTRAINED}


_CONSTRAINED = frozenset(PARAM_KEYS.values())


def _shown(params: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(constrained(params).items()))


def refusal(roles: Iterable[Role], name: str, labels: Mapping[str, str] | None,
            params: Mapping[str, str] | None = None) -> str:
    """What the person dialling is told when a dial to ``name`` is refused
    (``labels`` None: no such resource). A resource their roles cannot
    reach reads exactly as one that does not exist, so a refusal tells no
    one what exists; one they can reach (``wicket ls`` shows it) names the
    parameters refused. No role or rule is named: the audit has those."""
    prefix = f"access to {name!r} denied"
    if labels is None or not visible(roles, name, labels):
        return f"{prefix}: no such resource, or none of your roles reaches it"
    shown = _shown(params or {})
    return f"{prefix}: none of your roles allows {shown or 'this dial'} on it"


def visible(roles: Iterable[Role], name: str, labels: Mapping[str, str]) -> bool:
    """Should ``wicket ls`` show this resource (some dial to it may succeed)?"""
    roles = list(roles)
    if any(
        rule.selects(name, labels) and not rule.params for role in roles for rule in role.deny
    ):
        return False
    return any(rule.selects(name, labels) for role in roles for rule in role.allow)


def session_ttl_cap(roles: Iterable[Role]) -> float | None:
    """The shortest max_session_ttl among ``roles`` (None: no role caps it)."""
    caps = [r.max_session_ttl for r in roles if r.max_session_ttl is not None]
    return min(caps) if caps else None


def allowed_params(roles: Iterable[Role], name: str, labels: Mapping[str, str]) -> dict[str, list[str]]:
    """Parameter globs (db users, db names...) the allow rules grant on a resource."""
    out: dict[str, list[str]] = {}
    for role in roles:
        for rule in role.allow:
            if rule.selects(name, labels):
                for key, globs in rule.params:
                    out.setdefault(key, [])
                    out[key].extend(g for g in globs if g not in out[key])
    return out
