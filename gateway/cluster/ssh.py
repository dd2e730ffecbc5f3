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

Every certificate is signed for one connection: the gateway puts a public
key on the dial (``ssh.public_key``) and the cluster, once RBAC has allowed
the node and the login, signs it for **that login only**, valid two minutes
(long enough to log in; the session's life is the cluster's to end), and
sends it in the hand-off frame ahead of the node's bytes
(protocols/ssh/handoff.py). ``permit-agent-forwarding`` is in it only when
a role allows ``ssh_agent_forwarding = ["on"]`` for the node and login.

* Terminated mode (``ssh.mode`` absent or ``terminated``): the key is the
  gateway's in-memory one; asyncssh logs in to the node with it.
* ProxyCommand mode (``ssh.mode = proxycommand``, ``wicket config ssh``):
  OpenSSH runs end to end and the cluster only carries bytes. The key is
  the profile's; ``wicket proxy ssh --stdio`` writes the certificate where
  ssh's ``CertificateFile`` looks for this login and host before ssh reads
  it. What the cluster cannot see in this mode is inside the encryption:
  the node's sshd checks the certificate, and its log names the person
  through the certificate's key id (``wicket:CLUSTER:USER:SESSION``).

No certificate lists more than one login or outlives its connection's
start by more than two minutes, so one allowed login on one node cannot be
turned into another login elsewhere (``POST /v1/ssh/cert``, which signed
every allowed login for the session's life, is gone).

A login is checked here as sshd would need it: a name, no control
character, no ``@`` or separator that could be read as something else.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import re
from collections import OrderedDict
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
from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.ssh import Handoff, KexWatcher, encode_handoff

log = logging.getLogger("wicket.cluster.ssh")

#: A login: what useradd takes (and a trailing ``$`` for machine accounts).
LOGIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\$?")
_GLOB = re.compile(r"[*?\[\]]")
#: The dial parameter that asks for a certificate: the public key to sign.
PUBLIC_KEY = "ssh.public_key"
#: Which way in a dial is: ``terminated`` (the default with a key) or
#: ``proxycommand`` (the default without: an older wicket's, no certificate).
MODE = "ssh.mode"
MODES = ("terminated", "proxycommand")
#: A connection's user certificate only has to last until ssh (or the
#: gateway) has logged in to the node with it.
HANDOFF_CERT_TTL = dt.timedelta(minutes=2)
#: The role key that lets ``ssh -A`` reach a node (gateway/kinds.py AGENT_FORWARDING).
AGENT_FORWARDING = "agent_forwarding"
#: Terminated sessions a gateway may still report events of (the newest).
MAX_REPORTED_SESSIONS = 100_000
MAX_REPORTS = 256
#: The events a gateway reports, and the fields each may carry, with their types.
REPORTED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ssh.exec": {"command": str},
    "ssh.shell": {"term": str},
    "ssh.subsystem": {"name": str},
    "ssh.exit": {"status": int, "signal": str},
    "ssh.forward": {"direction": str, "host": str, "port": int},
    "ssh.agent_forwarding": {"allowed": bool},
    "ssh.sftp": {"op": str, "path": str, "to": str, "mode": str, "ok": bool, "bytes_read": int,
                 "bytes_written": int, "error": str},
}
MAX_REPORTED_TEXT = 16 * 1024


def check_login(login: object) -> str:
    if not isinstance(login, str) or not login:
        raise Refused(ErrorCode.BAD_REQUEST, "an ssh dial needs the node login (ssh LOGIN@NODE)")
    if not LOGIN_RE.fullmatch(login):
        raise Refused(ErrorCode.BAD_REQUEST, f"{login[:64]!r} is not a login name (letters, digits, . _ -, "
                      f"at most 64)")
    return login


class SshKind:
    kind = "ssh"
    #: Closing the node's connection ends what runs there: sshd hangs up the
    #: session's processes (SIGHUP), as when any client goes away.
    interrupt = None

    def __init__(self) -> None:
        #: Terminated sessions, by id: (user, resource), for the gateway's
        #: reports of what happened inside them (:func:`record_gateway_reports`).
        self.terminated: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        params = dict(request.params)
        params["login"] = check_login(params.get("login"))
        if PUBLIC_KEY in params:
            try:
                sshcerts.parse_public_key(params[PUBLIC_KEY], PUBLIC_KEY)
            except sshcerts.SSHKeyError as exc:
                raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        if params.setdefault(MODE, MODES[0] if PUBLIC_KEY in params else MODES[1]) not in MODES:
            raise Refused(ErrorCode.BAD_REQUEST, f"{MODE} must be one of {', '.join(MODES)}")
        if AGENT_FORWARDING in params:  # the cluster decides it, not the dial
            raise Refused(ErrorCode.BAD_REQUEST, f"{AGENT_FORWARDING} is not a dial parameter")
        return params

    async def open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                   session: LiveSession) -> Opened:
        login, mode = params["login"], params[MODE]
        first, agent = b"", False
        if PUBLIC_KEY in params:
            agent = agent_forwarding_allowed(await cluster.session_roles(session), resource, login)
            first = self._handoff(cluster, resource, login, params[PUBLIC_KEY], session, mode=mode, agent=agent)
            if mode == "terminated":
                self.terminated[session.id] = (session.user, resource.name)
                while len(self.terminated) > MAX_REPORTED_SESSIONS:
                    self.terminated.popitem(last=False)
        upstream = await connect_tcp(resource)
        session.extra["end_fields"] = {"login": login, "node": resource.address, "mode": mode}
        check = HostKeyCheck(cluster, resource, session)
        return Opened(upstream=upstream, first_bytes=first, tap_client=check.client_data,
                      tap_server=check.server_data,
                      details={"login": login, "node": resource.address, "mode": mode, "agent_forwarding": agent})

    @staticmethod
    def _handoff(cluster: Cluster, resource: Resource, login: str, key_line: str, session: LiveSession, *,
                 mode: str, agent: bool) -> bytes:
        """The hand-off frame: a user certificate for the dial's key, for
        this login only, valid long enough to log in (the session's own
        life is the cluster's to end)."""
        now = utcnow()
        public_key = sshcerts.parse_public_key(key_line, PUBLIC_KEY)
        host = node_name(resource.name, cluster.config.name)
        extensions = sshcerts.USER_EXTENSIONS + ((sshcerts.AGENT_FORWARDING,) if agent else ())
        request = sshcerts.UserCertRequest(key_id=f"wicket:{cluster.config.name}:{session.user}:{session.id}",
                                           principals=(principal(resource, login, host),), not_before=now,
                                           not_after=now + HANDOFF_CERT_TTL, extensions=extensions)
        cert = sshcerts.sign_user_cert(cluster.ssh_user_ca, public_key, request)
        cluster.audit_soon("ssh.cert", session.user, session_id=session.id, resource=resource.name,
                           principals=list(request.principals), serial=format(cert.serial, "x"),
                           key=sshcerts.fingerprint(public_key), expires_at=(now + HANDOFF_CERT_TTL).isoformat(),
                           mode=mode, agent_forwarding=agent)
        return encode_handoff(Handoff(certificate=sshcerts.cert_line(cert), host=host,
                                      known_hosts=node_known_hosts(cluster, resource), agent_forwarding=agent))

    async def control(self, cluster, resource, request, identity) -> str | None:
        return None

    def acts_on(self, cluster, request) -> LiveSession | None:
        return None


class HostKeyCheck:
    """The audit taps of an ssh session: the node's host key, read from the
    plaintext key exchange (protocols/ssh/transport.py), must be the
    registered one (or carry a certificate of the registered host CA for the
    node's name); otherwise the stream is cut before the client sees the
    reply, and ``ssh.hostkey_mismatch`` goes on record. Called in the relay
    engine's thread."""

    def __init__(self, cluster: Cluster, resource: Resource, session: LiveSession) -> None:
        self.cluster, self.resource, self.session = cluster, resource, session
        self.watcher = KexWatcher()
        self.spec = SshNodeSpec.of(resource.spec)

    def client_data(self, data: bytes) -> None:
        if not self.watcher.done:
            self.watcher.client_data(data)

    def server_data(self, data: bytes) -> None:
        if self.watcher.done:
            return
        try:
            seen = self.watcher.server_data(data)
        except RemoteProtocolError as exc:
            self._mismatch(f"the node's key exchange could not be read: {exc}", None)
            raise
        if seen is None:
            return
        self._let_go()
        problem = host_key_problem(self.spec, seen.blob, node_name(self.resource.name, self.cluster.config.name),
                                   self.cluster)
        if problem is not None:
            self._mismatch(problem, seen.blob)
            raise RemoteProtocolError(f"the host key of {self.resource.name} is not the registered one ({problem}); "
                                      f"the session was cut", code=ErrorCode.UPSTREAM_UNREACHABLE)

    def _let_go(self) -> None:
        """The key is seen: the rest of the stream (encrypted) is not
        looked at, and on the multiplexed connection not even shown to
        these taps (a copy per chunk saved)."""
        on = self.session.extra.get("stream")
        if on is not None:
            stream = on[1]
            stream.tap_in = None
            if stream.end is not None:
                stream.end.tap = None

    def _mismatch(self, problem: str, blob: bytes | None) -> None:
        log.warning("ssh_hostkey_mismatch resource=%s address=%s problem=%r action=%s", self.resource.name,
                    self.resource.address, problem, "check the node; if its key changed on purpose, update the "
                    "resource's host_key (ssh-keyscan)")
        self.cluster.audit_soon("ssh.hostkey_mismatch", self.session.user, session_id=self.session.id,
                                resource=self.resource.name, node=self.resource.address, problem=problem,
                                presented=_blob_fingerprint(blob) if blob else None)


def _blob_fingerprint(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def host_key_problem(spec: SshNodeSpec, blob: bytes, host: str, cluster: Cluster) -> str | None:
    """Why the host key blob ``blob`` is not this node's (None: it is)."""
    problems = []
    if spec.host_key:
        registered = base64.b64decode(spec.host_key.split()[1])
        if blob == registered:
            return None
        problems.append(f"presented {_blob_fingerprint(blob)}, registered {_blob_fingerprint(registered)}")
    if spec.host_ca:
        ca_line = sshcerts.public_key_line(cluster.ssh_host_ca) if spec.host_ca == "cluster" else spec.host_ca
        problem = sshcerts.host_cert_problem(blob, ca_line, host, now=utcnow())
        if problem is None:
            return None
        problems.append(problem)
    return "; ".join(problems) or "no host key or host CA is registered"


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


def node_known_hosts(cluster: Cluster, resource: Resource) -> list[str]:
    """known_hosts lines that vouch for one node, under its name."""
    spec, host = SshNodeSpec.of(resource.spec), node_name(resource.name, cluster.config.name)
    lines = []
    if spec.host_key:
        lines.append(sshcerts.known_host_line([host], spec.host_key))
    if spec.host_ca:
        ca_line = sshcerts.public_key_line(cluster.ssh_host_ca) if spec.host_ca == "cluster" else spec.host_ca
        lines.append(sshcerts.cert_authority_line([host], ca_line))
    return lines


def known_hosts(cluster: Cluster, roles: list[rbac.Role], resources: Mapping[str, Resource]) -> list[str]:
    """known_hosts lines for the nodes the roles reach: each node's pinned
    host key under its name, and an ``@cert-authority`` line for the host
    CA that vouches for it."""
    lines: list[str] = []
    for res in sorted(resources.values(), key=lambda r: r.name):
        if res.kind == SSH.kind and rbac.visible(roles, res.name, res.labels):
            lines += node_known_hosts(cluster, res)
    return lines


def principal(resource: Resource, login: str, host: str) -> str:
    """What a certificate for ``login`` on the node names: the login, or
    ``LOGIN@NODE.CLUSTER`` for a node whose resource says ``principals =
    "node"`` (only that node's sshd maps its logins to such names)."""
    return f"{login}@{host}" if SshNodeSpec.of(resource.spec).principals == "node" else login


def sshd_config_lines(node: str, cluster_name: str, ca_path: str = "/etc/ssh/wicket_user_ca.pub") -> str:
    """The sshd_config lines of a node: trust the cluster's SSH user CA and,
    for a node whose certificates name it (``principals = "node"``), take
    ``LOGIN@NODE.CLUSTER`` as the principal that lets one in as LOGIN, and
    nothing else (no certificate for another node gets in)."""
    host = node_name(node, cluster_name)
    return (f"# sshd_config of {host} (resource principals = \"node\"); {ca_path} is `wicket-cluster ca show "
            f"ssh-user`\n"
            f"TrustedUserCAKeys {ca_path}\n"
            f"AuthorizedPrincipalsCommand /bin/echo %u@{host}\n"
            f"AuthorizedPrincipalsCommandUser nobody\n")


def agent_forwarding_allowed(roles: list[rbac.Role], resource: Resource, login: str) -> bool:
    """Does a role let ``ssh -A`` reach ``resource`` as ``login``
    (``ssh_agent_forwarding = ["on"]``, deny rules considered)?"""
    return rbac.decide(roles, resource.name, resource.labels, {"login": login, AGENT_FORWARDING: "on"}).allowed


async def ssh_hosts(cluster: Cluster, identity: pki.Identity, roles: list[rbac.Role]) -> Response:
    """``GET /v1/ssh/hosts``: the known_hosts lines for the nodes the
    holder reaches and the logins (by name) the roles allow on some node,
    for ``wicket config ssh``. No certificate: each connection gets its
    own, for one login, on its dial."""
    if identity.not_after <= utcnow():
        raise HTTPError(401, "cert_expired", "the session certificate has expired; run `wicket login` again")
    snap = await cluster.snapshot()
    return Response(status=200, body={
        "cluster": cluster.config.name,
        "logins": allowed_logins(roles, snap.resources),
        "known_hosts": known_hosts(cluster, roles, snap.resources),
    })


# -- what gateways report -----------------------------------------------------------


def record_gateway_reports(cluster: Cluster, identity: pki.Identity, body: Mapping[str, Any]) -> Response:
    """``POST /v1/ssh/audit``: events a gateway saw inside its terminated
    sessions (``{"events": [{"session_id", "event", "fields"}]}``), recorded
    with ``reported_by: "gateway"``: the cluster cannot see inside SSH, so
    this is the gateway's word, for sessions of this user only. Fields are
    checked against :data:`REPORTED`; text is cut at 16 KiB."""
    events = body.get("events")
    if not isinstance(events, list) or len(events) > MAX_REPORTS:
        raise HTTPError(400, "bad_request", f"events must be a list of at most {MAX_REPORTS}")
    recorded = refused = 0
    for item in events:
        if not isinstance(item, dict):
            raise HTTPError(400, "bad_request", "each event must be an object")
        session = SSH.terminated.get(item.get("session_id")) if isinstance(item.get("session_id"), str) else None
        allowed = REPORTED.get(item.get("event"))
        fields = item.get("fields")
        if session is None or session[0] != identity.user or allowed is None or not isinstance(fields, dict):
            refused += 1
            continue
        clean: dict[str, Any] = {}
        for key, value in fields.items():
            kind = allowed.get(key)
            if kind is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                continue
            if isinstance(value, str) and len(value) > MAX_REPORTED_TEXT:
                value, clean["truncated"] = value[:MAX_REPORTED_TEXT], True
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < 1 << 63:
                continue
            clean[key] = value
        cluster.audit_soon(item["event"], identity.user, session_id=item["session_id"], resource=session[1],
                           reported_by="gateway", **clean)
        recorded += 1
    if refused:
        log.info("ssh_reports_refused user=%s count=%d reason=%s", identity.user, refused,
                 "not a terminated session of this user, or an unknown event")
    return Response(status=200, body={"recorded": recorded, "refused": refused})
