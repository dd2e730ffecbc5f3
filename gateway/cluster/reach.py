"""Who may reach what: checks 1 to 4 of gateway/cluster/dial.py's theory
of operation against an access snapshot (:func:`authorize`, blocking on
nothing, so the relay engine's thread runs them too), and the probe dial,
which stops after check 3 and only connects (:func:`probe`)."""

from __future__ import annotations

from gateway import kinds, printable
from gateway.cluster import rbac
from gateway.cluster.core import Cluster, Snapshot
from gateway.cluster.dialaudit import DialAudit
from gateway.cluster.routekind import Refused, RouteKind, connect_tcp
from gateway.cluster.store import Resource
from gateway.identity import pki
from gateway.net.relay import reset_on_close
from protocols.dial import DialAccept, DialRequest
from protocols.errors import ErrorCode


def authorize(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
               audit: DialAudit) -> tuple[pki.Identity, Resource, dict[str, str], rbac.Decision]:
    """Checks 1 to 4 of the module docstring against ``snap``; raises
    :class:`Refused`. Blocks on nothing, so the relay engine's thread runs it
    too (:func:`~gateway.cluster.enginedial.start_in_engine`)."""
    identity, resource, roles = reach(cluster, snap, cert, request, kind, audit)
    params = kind.check_params(request, identity)
    audit.fields["params"] = params
    decision = rbac.decide(roles, resource.name, resource.labels, params)
    if not decision.allowed:
        # The next step is the gateway's to add (it knows the client's
        # protocol), so the message says only what happened.
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, resource.name, resource.labels, params),
                      reason=decision.reason)
    return identity, resource, params, decision


def reach(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
           audit: DialAudit) -> tuple[pki.Identity, Resource, list]:
    """Checks 1 to 3: the certificate, the resource within the holder's
    reach and of this route's kind; raises :class:`Refused`."""
    try:
        identity, _user, roles = cluster.identify_in(snap, cert)
    except pki.CertError as exc:
        # On record under the user the certificate names (so `audit --user`
        # finds a locked user's or an expired certificate's dials), marked
        # as a claim: the certificate was refused.
        audit.user = cluster.claimed_user(cert)
        if audit.user is not None:
            audit.fields["user_claimed"] = True
        raise Refused(exc.code, exc.message) from None
    audit.user, audit.identity = identity.user, identity
    # A name with a control character (a resource, a db user, a db name) is
    # no one's, and no glob may match it: refused outright.
    for what, name in (("resource", request.resource), *rbac.constrained(request.params).items()):
        if not printable.is_clean(name):
            raise Refused(ErrorCode.BAD_REQUEST, f"{what} {printable.escape(name)!r} contains a control "
                          f"character ({printable.first_unsafe(name)}); names with control characters are refused")
    resource = snap.resources.get(request.resource)
    # Unknown, and there but out of the user's reach, look the same to the
    # user (one code, one message); the audit's reason tells them apart.
    if resource is None:
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, request.resource, None),
                      reason=f"no resource named {request.resource!r}")
    if not rbac.visible(roles, resource.name, resource.labels):
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, resource.name, resource.labels),
                      reason=rbac.decide(roles, resource.name, resource.labels).reason)
    # The user can see this one (`wicket ls` shows its kind): say which.
    if resource.kind != kind.kind:
        raise Refused(
            ErrorCode.BAD_REQUEST,
            f"resource {resource.name!r} is of kind {resource.kind}, not {kind.kind}; "
            f"use `{kinds.proxy_command(resource.kind)} {resource.name}`",
        )
    return identity, resource, roles


async def probe(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
                 audit: DialAudit) -> DialAccept:
    """A probe (``wicket agent --check-upstreams``): may the holder reach
    the resource at all (checks 1 to 3; no session, so no parameters to
    grant), and does its upstream take a TCP connection from the cluster?
    No session and no protocol byte; audited as ``dial.probe``. Raises
    :class:`Refused` (upstream_unreachable with the reason)."""
    _identity, resource, _roles = reach(cluster, snap, cert, request, kind, audit)
    audit.fields["params"] = {}
    upstream = await connect_tcp(resource)
    reset_on_close(upstream)  # nothing was said: an abort, not an empty conversation
    await upstream.aclose()
    cluster.audit_soon("dial.probe", audit.user, **audit.fields, reason="reachable")
    return DialAccept(session_id="-")
