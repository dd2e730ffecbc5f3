"""The ssh kind on the cluster: OpenSSH nodes and the SSH user certificates
that get a person onto them.

Theory of operation
-------------------
A node runs an ordinary OpenSSH sshd whose ``TrustedUserCAKeys`` lists the
cluster's SSH user CA (``wicket-cluster ca show ssh-user``). Nobody's key is
on the node: a person gets in with a user certificate the cluster signed
for a key of theirs, valid no longer than their session certificate, whose
principals are the logins their roles allow (sshd lets the holder in only
as one of those).

ProxyCommand mode (``wicket config ssh``): OpenSSH runs end to end and the
cluster only carries bytes. The gateway's profile holds an SSH key pair
made on the machine; :func:`issue_user_cert` signs its public key (the API's
``POST /v1/ssh/cert``) with every login the roles allow on some node, by
name: a login glob (``"*"``) cannot be a principal, so it only works where
the cluster speaks SSH itself. ``ssh LOGIN@NODE.CLUSTER`` runs ``wicket
proxy ssh --stdio``, which dials the node's resource with ``login`` as the
dial's parameter: RBAC decides on node and login (deny wins) before a byte
reaches the node, and the session is audited (``session.start``/``end``
with login and bytes, cut by a lock or the certificate's end). What the
cluster cannot see in this mode is inside the encryption: the node's sshd
checks the certificate and its principals, and its log names the person
through the certificate's key id (``wicket:CLUSTER:USER:SERIAL``).

A login is checked here as sshd would need it: a name, no control
character, no ``@`` or separator that could be read as something else.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any, Mapping

from gateway.cluster import rbac
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dial import Opened, Refused, connect_tcp
from gateway.cluster.resource_specs import SshNodeSpec
from gateway.cluster.store import Resource
from gateway.identity import pki, sshcerts
from gateway.identity.pki import utcnow
from gateway.net.http import HTTPError, Response
from protocols.dial import DialRequest
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.cluster.ssh")

#: A login: what useradd takes (and a trailing ``$`` for machine accounts).
LOGIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\$?")
_GLOB = re.compile(r"[*?\[\]]")


def check_login(login: object) -> str:
    if not isinstance(login, str) or not login:
        raise Refused(ErrorCode.BAD_REQUEST, "an ssh dial needs the node login (ssh LOGIN@NODE)")
    if not LOGIN_RE.fullmatch(login):
        raise Refused(ErrorCode.BAD_REQUEST, f"{login[:64]!r} is not a login name (letters, digits, . _ -, "
                      f"at most 64)")
    return login


class SshKind:
    kind = "ssh"

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        params = dict(request.params)
        params["login"] = check_login(params.get("login"))
        return params

    async def open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                   session: LiveSession) -> Opened:
        upstream = await connect_tcp(resource)
        return Opened(upstream=upstream, details={"login": params["login"], "node": resource.address,
                                                  "mode": "proxycommand"})

    async def control(self, cluster, resource, request, identity) -> str | None:
        return None

    def acts_on(self, cluster, request) -> LiveSession | None:
        return None


SSH = SshKind()


# -- user certificates -------------------------------------------------------


def node_name(resource: str, cluster_name: str) -> str:
    """The name OpenSSH clients type for a node: ``web-1.CLUSTER``."""
    return f"{resource}.{cluster_name}"


def allowed_logins(roles: list[rbac.Role], resources: Mapping[str, Resource]) -> list[str]:
    """Every login (by name, not glob) the roles allow on at least one ssh
    node, deny rules considered, sorted."""
    logins: set[str] = set()
    for res in resources.values():
        if res.kind != SSH.kind or not rbac.visible(roles, res.name, res.labels):
            continue
        for glob in rbac.allowed_params(roles, res.name, res.labels).get("login", ()):
            if not _GLOB.search(glob) and LOGIN_RE.fullmatch(glob) \
                    and rbac.decide(roles, res.name, res.labels, {"login": glob}).allowed:
                logins.add(glob)
    return sorted(logins)


def known_hosts(cluster: Cluster, roles: list[rbac.Role], resources: Mapping[str, Resource]) -> list[str]:
    """known_hosts lines for the nodes the roles reach: each node's pinned
    host key under its name, and an ``@cert-authority`` line for the host
    CAs that vouch for them."""
    name = cluster.config.name
    lines: list[str] = []
    cluster_ca = False
    for res in sorted(resources.values(), key=lambda r: r.name):
        if res.kind != SSH.kind or not rbac.visible(roles, res.name, res.labels):
            continue
        spec = SshNodeSpec.of(res.spec)
        if spec.host_key:
            lines.append(sshcerts.known_host_line([node_name(res.name, name)], spec.host_key))
        if spec.host_ca == "cluster":
            cluster_ca = True
        elif spec.host_ca:
            lines.append(sshcerts.cert_authority_line([node_name(res.name, name)], spec.host_ca))
    if cluster_ca:
        lines.append(sshcerts.cert_authority_line([f"*.{name}"], sshcerts.public_key_line(cluster.ssh_host_ca)))
    return lines


async def issue_user_cert(cluster: Cluster, identity: pki.Identity, roles: list[rbac.Role],
                          body: Mapping[str, Any], *, client_addr: str) -> Response:
    """``POST /v1/ssh/cert``: sign ``body["public_key"]`` (an OpenSSH public
    key line) as a user certificate for the session's holder, valid until
    the session certificate ends; with the known_hosts lines for the nodes
    the holder reaches."""
    try:
        public_key = sshcerts.parse_public_key(body.get("public_key"), "public_key")
    except sshcerts.SSHKeyError as exc:
        raise HTTPError(400, "bad_request", str(exc)) from None
    snap = await cluster.snapshot()
    logins = allowed_logins(roles, snap.resources)
    if not logins:
        raise HTTPError(403, "access_denied", "none of your roles allows a login (by name) on any ssh node; "
                        "ask a cluster administrator for a role with logins")
    now = utcnow()
    if identity.not_after <= now:
        raise HTTPError(401, "cert_expired", "the session certificate has expired; run `wicket login` again")
    request = sshcerts.UserCertRequest(
        key_id=f"wicket:{cluster.config.name}:{identity.user}:{identity.serial:x}",
        principals=logins[:sshcerts.MAX_PRINCIPALS], not_before=now, not_after=identity.not_after,
    )
    cert = sshcerts.sign_user_cert(cluster.ssh_user_ca, public_key, request)
    await cluster.audit("ssh.cert", identity.user, client_addr=client_addr, principals=list(request.principals),
                        serial=format(cert.serial, "x"), key=sshcerts.fingerprint(public_key),
                        expires_at=identity.not_after.isoformat())
    return Response(status=200, body={
        "certificate": sshcerts.cert_line(cert, f"wicket:{identity.user}"),
        "principals": list(request.principals),
        "expires_at": dt.datetime.fromtimestamp(cert.valid_before, dt.timezone.utc).isoformat(),
        "cluster": cluster.config.name,
        "known_hosts": known_hosts(cluster, roles, snap.resources),
    })
