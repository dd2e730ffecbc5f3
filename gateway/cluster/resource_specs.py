"""Kind-specific resource settings, validated once (config file and CLI).

A resource is ``name``, ``kind``, ``address`` and ``labels``; everything else
is the kind's own settings, kept in the store's ``spec`` column. A kind names
its :class:`Schema` in its registry entry (gateway/kinds.py): how to check
the settings, how to turn the stored dict into a frozen object, and which
``wicket-cluster resources add`` flags set them.

Two schemas exist. ``tcp`` takes no settings (:data:`NO_SETTINGS`). Every
database kind shares :data:`DATABASE`, how the cluster reaches and logs in to
the server as the db user a client asks for::

    tls = "verify-full"      # disable | require | verify-full (default)
    ca_file = "/etc/wicket/db-server-ca.crt"   # required for verify-full
    server_name = "db.internal"                # default: the address's host
    auth = "cert"            # cert (default) | password
    # auth = "password": where the cluster finds each db user's password.
    # Never from the client. "*" is the fallback for any db user.
    passwords = { app = "env:APP_DB_PASSWORD", "*" = "file:/etc/wicket/db.pass" }
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs

TLS_MODES = ("disable", "require", "verify-full")
AUTH_MODES = ("cert", "password")
SECRET_SCHEMES = ("env", "file")


class SpecError(ValueError):
    pass


@attrs.frozen(slots=True, kw_only=True)
class SpecFlag:
    """A ``wicket-cluster resources add`` option that sets one setting."""

    key: str
    help: str
    choices: tuple[str, ...] | None = None
    #: Repeatable KEY=VALUE, making a table (``passwords``).
    table: bool = False
    #: The option's name; default ``--`` + the key with dashes.
    flag: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


@attrs.frozen(slots=True, kw_only=True)
class Schema:
    """What a kind's settings are: ``check`` validates a raw dict (raising
    :class:`SpecError` naming the key) and returns the dict to store;
    ``parse`` turns a stored dict into the object the kind works with."""

    check: Callable[[Mapping[str, Any]], dict[str, Any]]
    parse: Callable[[Mapping[str, Any]], Any]
    flags: tuple[SpecFlag, ...] = ()


def _no_settings(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec:
        raise SpecError(f"this kind takes no settings beyond address and labels (got {', '.join(sorted(spec))})")
    return {}


NO_SETTINGS = Schema(check=_no_settings, parse=lambda spec: None)


def resolve_secret(ref: str, what: str) -> str:
    """The secret an ``env:NAME`` or ``file:PATH`` reference points at.
    Raises :class:`SpecError` naming the reference and ``what`` it is for,
    never the secret."""
    scheme, _, where = ref.partition(":")
    if scheme == "env":
        value = os.environ.get(where)
        if value is None:
            raise SpecError(f"environment variable {where} ({what}) is not set")
        return value
    try:
        return Path(where).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SpecError(f"cannot read the file {where} ({what}): {exc.strerror}") from None


@attrs.frozen(slots=True, kw_only=True)
class DatabaseSpec:
    """How the cluster reaches a database server and logs in as a db user
    (shared by every database kind; gateway/cluster/upstream_auth.py builds
    the TLS side of it)."""

    tls: str = "verify-full"
    ca_file: Path | None = None
    server_name: str | None = None
    auth: str = "cert"
    passwords: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> "DatabaseSpec":
        """The stored spec of a database resource as an object."""
        return cls(
            tls=spec.get("tls", "verify-full"),
            ca_file=Path(spec["ca_file"]) if spec.get("ca_file") else None,
            server_name=spec.get("server_name"),
            auth=spec.get("auth", "cert"),
            passwords=tuple(sorted(dict(spec.get("passwords", {})).items())),
        )

    def password_for(self, db_user: str) -> str:
        """Resolve the secret reference for ``db_user`` (env: or file:).
        Raises :class:`SpecError` naming the reference, never the secret."""
        refs = dict(self.passwords)
        ref = refs.get(db_user) or refs.get("*")
        if ref is None:
            raise SpecError(f"no password configured for db user {db_user!r}")
        return resolve_secret(ref, f"password of {db_user!r}")

    def server_hostname(self, address: str) -> str:
        """The name to verify in the server's certificate."""
        return self.server_name or address.rpartition(":")[0].strip("[]")


def _database(spec: Mapping[str, Any]) -> dict[str, Any]:
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
        scheme, _, where = ref.partition(":") if isinstance(ref, str) else ("", "", "")
        if scheme not in SECRET_SCHEMES or not where:
            raise SpecError(f'passwords.{user}: expected "env:NAME" or "file:PATH" (the secret itself never '
                            f"goes in the config)")
    if auth == "password" and not passwords:
        raise SpecError('auth = "password" needs passwords = { db_user = "env:NAME" | "file:PATH", ... }')
    if passwords:
        out["passwords"] = dict(passwords)
    return out


DATABASE = Schema(
    check=_database,
    parse=DatabaseSpec.of,
    flags=(
        SpecFlag(key="tls", choices=TLS_MODES, help="TLS to the server (default verify-full)."),
        SpecFlag(key="ca_file", help="CA that signed the server's certificate (for verify-full)."),
        SpecFlag(key="server_name", help="name to verify in the server's certificate."),
        SpecFlag(key="auth", choices=AUTH_MODES, help="how the cluster logs in upstream (default cert)."),
        SpecFlag(key="passwords", flag="--password-ref", table=True,
                 help="auth=password: DB_USER=env:NAME or DB_USER=file:PATH ('*' for any user)."),
    ),
)


# -- ssh -------------------------------------------------------------------


SSH_PRINCIPALS = ("login", "node")


@attrs.frozen(slots=True, kw_only=True)
class SshNodeSpec:
    """How a node proves it is the node (kind ``ssh``)::

        host_key = "ssh-ed25519 AAAA..."   # its host key (ssh-keyscan, /etc/ssh/*.pub)
        host_ca = "cluster"                # or: it shows a host certificate of the
                                           # cluster's SSH host CA (or of the CA
                                           # whose public key line this is)

    At least one. OpenSSH clients learn them from `wicket config ssh`'s
    known_hosts; the cluster checks them where it speaks SSH itself. And
    what the user certificates for the node name::

        principals = "node"   # LOGIN@NODE.CLUSTER: valid on this node only; its
                              # sshd maps logins to them (AuthorizedPrincipalsCommand,
                              # `wicket-cluster ca show ssh-user --node NODE`)
        principals = "login"  # the default: LOGIN, which every node that trusts
                              # the CA takes for that login"""

    host_key: str | None = None
    host_ca: str | None = None
    principals: str = "login"

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> "SshNodeSpec":
        return cls(host_key=spec.get("host_key"), host_ca=spec.get("host_ca"),
                   principals=spec.get("principals") or "login")


def _ssh_node(spec: Mapping[str, Any]) -> dict[str, Any]:
    from gateway.identity.sshcerts import SSHKeyError, parse_public_key

    known = {"host_key", "host_ca", "principals"}
    unknown = set(spec) - known
    if unknown:
        raise SpecError(f"unknown setting(s) {', '.join(sorted(unknown))} (expected {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    try:
        if spec.get("host_key") is not None:
            parse_public_key(spec["host_key"], "host_key")
            out["host_key"] = " ".join(spec["host_key"].split()[:2])
        if spec.get("host_ca") is not None:
            if spec["host_ca"] != "cluster":
                parse_public_key(spec["host_ca"], 'host_ca (a CA\'s public key line, or "cluster")')
            out["host_ca"] = spec["host_ca"] if spec["host_ca"] == "cluster" else " ".join(spec["host_ca"].split()[:2])
    except SSHKeyError as exc:
        raise SpecError(str(exc)) from None
    if spec.get("principals") is not None:
        if spec["principals"] not in SSH_PRINCIPALS:
            raise SpecError(f"principals must be one of {', '.join(SSH_PRINCIPALS)}")
        out["principals"] = spec["principals"]
    if not out.keys() - {"principals"}:
        raise SpecError('an ssh node needs host_key = "ssh-ed25519 AAAA..." (its host key: ssh-keyscan -t ed25519 '
                        'HOST) or host_ca = "cluster" (it shows a host certificate of the cluster\'s SSH host CA)')
    return out


SSH_NODE = Schema(
    check=_ssh_node,
    parse=SshNodeSpec.of,
    flags=(
        SpecFlag(key="principals", choices=SSH_PRINCIPALS,
                 help='what user certificates name: "login" (default) or "node" (LOGIN@NODE.CLUSTER, valid on this '
                      'node only; its sshd needs the AuthorizedPrincipalsCommand `wicket-cluster ca show ssh-user '
                      '--node NODE` prints).'),
        SpecFlag(key="host_key", help="the node's host public key line (ssh-keyscan -t ed25519 HOST)."),
        SpecFlag(key="host_ca", help='"cluster" (the node shows a host certificate of the cluster\'s SSH '
                                     'host CA), or another CA\'s public key line.'),
    ),
)
