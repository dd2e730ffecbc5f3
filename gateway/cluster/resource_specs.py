"""Kind-specific resource settings, validated once (config file and CLI).

A resource is ``name``, ``kind``, ``address`` and ``labels``; everything else
is the kind's own settings, kept in the store's ``spec`` column. This module
says which settings each kind takes and turns them into a frozen object.

PostgreSQL (``kind = "postgres"``)::

    tls = "verify-full"      # disable | require | verify-full (default)
    ca_file = "/etc/wicket/pg-server-ca.crt"   # required for verify-full
    server_name = "db.internal"                # default: the address's host
    auth = "cert"            # cert (default) | password
    # auth = "password": where the cluster finds each db user's password.
    # Never from the client. "*" is the fallback for any db user.
    passwords = { app = "env:APP_DB_PASSWORD", "*" = "file:/etc/wicket/pg.pass" }
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import attrs

TLS_MODES = ("disable", "require", "verify-full")
AUTH_MODES = ("cert", "password")


class SpecError(ValueError):
    pass


@attrs.frozen(slots=True, kw_only=True)
class PostgresSpec:
    tls: str = "verify-full"
    ca_file: Path | None = None
    server_name: str | None = None
    auth: str = "cert"
    passwords: tuple[tuple[str, str], ...] = ()

    def password_for(self, db_user: str) -> str:
        """Resolve the secret reference for ``db_user`` (env: or file:).
        Raises :class:`SpecError` naming the reference, never the secret."""
        refs = dict(self.passwords)
        ref = refs.get(db_user) or refs.get("*")
        if ref is None:
            raise SpecError(f"no password configured for db user {db_user!r}")
        scheme, _, where = ref.partition(":")
        if scheme == "env":
            value = os.environ.get(where)
            if value is None:
                raise SpecError(f"environment variable {where} (password of {db_user!r}) is not set")
            return value
        try:
            return Path(where).read_text().rstrip("\r\n")
        except OSError as exc:
            raise SpecError(f"cannot read the password file for {db_user!r}: {exc.strerror}") from None


def _postgres(spec: Mapping[str, Any]) -> dict[str, Any]:
    known = {"tls", "ca_file", "server_name", "auth", "passwords"}
    unknown = set(spec) - known
    if unknown:
        raise SpecError(f"unknown setting(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    tls = spec.get("tls", "verify-full")
    if tls not in TLS_MODES:
        raise SpecError(f"tls = {tls!r}: expected one of {', '.join(TLS_MODES)}")
    out["tls"] = tls
    if "ca_file" in spec:
        if not isinstance(spec["ca_file"], str) or not spec["ca_file"]:
            raise SpecError("ca_file: expected a path")
        out["ca_file"] = spec["ca_file"]
    elif tls == "verify-full":
        raise SpecError('tls = "verify-full" needs ca_file: the CA that signed the server certificate')
    if "server_name" in spec:
        if not isinstance(spec["server_name"], str) or not spec["server_name"]:
            raise SpecError("server_name: expected a host name")
        out["server_name"] = spec["server_name"]
    auth = spec.get("auth", "cert")
    if auth not in AUTH_MODES:
        raise SpecError(f"auth = {auth!r}: expected one of {', '.join(AUTH_MODES)}")
    if auth == "cert" and tls == "disable":
        raise SpecError('auth = "cert" needs TLS to the server (tls = "require" or "verify-full")')
    out["auth"] = auth
    passwords = spec.get("passwords", {})
    if not isinstance(passwords, Mapping):
        raise SpecError('passwords: expected a table of db_user = "env:NAME" or "file:PATH"')
    for user, ref in passwords.items():
        if not isinstance(ref, str) or ref.partition(":")[0] not in ("env", "file") or not ref.partition(":")[2]:
            raise SpecError(f'passwords.{user}: expected "env:NAME" or "file:PATH" (the secret itself never '
                            f"goes in the config)")
    if auth == "password" and not passwords:
        raise SpecError('auth = "password" needs passwords = { db_user = "env:NAME" | "file:PATH", ... }')
    if passwords:
        out["passwords"] = dict(passwords)
    return out


_CHECKERS = {"tcp": lambda spec: _no_settings(spec), "postgres": _postgres}


def _no_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec:
        raise SpecError(f"tcp resources take no settings beyond address and labels (got {', '.join(sorted(spec))})")
    return {}


KINDS = tuple(_CHECKERS)


def check(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``spec`` for ``kind``; return the normalized dict to store."""
    try:
        checker = _CHECKERS[kind]
    except KeyError:
        raise SpecError(f"kind {kind!r} is not one of {', '.join(KINDS)}") from None
    return checker(spec)


def postgres(spec: Mapping[str, Any]) -> PostgresSpec:
    """The stored spec of a postgres resource as an object."""
    return PostgresSpec(
        tls=spec.get("tls", "verify-full"),
        ca_file=Path(spec["ca_file"]) if spec.get("ca_file") else None,
        server_name=spec.get("server_name"),
        auth=spec.get("auth", "cert"),
        passwords=tuple(sorted(dict(spec.get("passwords", {})).items())),
    )
