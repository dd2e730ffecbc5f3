"""The cluster checking a renewal presented on a multiplexed connection
(gateway/cluster/linkrenewal.py): real certificates from a real user CA,
the cluster a small stand-in with the same calls (the real standing
checks). End to end, with an agent and psql: tests/integration/test_agent_renewal.py."""

from __future__ import annotations

import datetime as dt
import time
import types

import attrs
import pytest
import trio

from gateway.cluster import linkrenewal
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.tally import Tally
from gateway.identity import pki
from protocols import linkrenewal as lr
from protocols.dial import DialAccept, DialError
from protocols.errors import ErrorCode

NAME = "c1"


@attrs.define
class StandIn:
    user_ca: pki.CertificateAuthority
    config: types.SimpleNamespace = attrs.Factory(lambda: types.SimpleNamespace(name=NAME,
                                                                                disconnect_expired_cert=True))
    snap: types.SimpleNamespace = attrs.Factory(lambda: types.SimpleNamespace(
        users={"alice": types.SimpleNamespace(cert_generation=0), "bob": types.SimpleNamespace(cert_generation=0)},
        bots={"ci": types.SimpleNamespace(cert_generation=0)}, locks={}, revoked=frozenset(), revocations={}))
    sessions: dict = attrs.Factory(dict)
    events: list = attrs.Factory(list)
    renew_refusals: Tally = attrs.Factory(Tally)

    async def snapshot(self):
        return self.snap

    check_standing = staticmethod(Cluster.check_standing)
    note_renew_refusal = Cluster.note_renew_refusal
    expiry_deadline = Cluster.expiry_deadline

    def audit_soon(self, event, user, **fields) -> None:
        self.events.append((event, user, fields))


@attrs.define
class Link:
    """What renew() uses of a MuxLink: its answer."""

    answers: list = attrs.Factory(list)

    def answer(self, stream, reply) -> None:
        self.answers.append(reply)


@pytest.fixture(scope="module")
def ca():
    return pki.CertificateAuthority.create("user CA", now=pki.utcnow())


def issue(ca, user="alice", *, kind="person", instance="", seconds=600, key=None, not_before=None):
    now = pki.utcnow()
    key = key or pki.generate_key()
    identity = pki.Identity(user=user, roles=("dev",), cluster=NAME, kind=kind, instance=instance,
                            not_before=not_before or now - dt.timedelta(minutes=1),
                            not_after=now + dt.timedelta(seconds=seconds))
    cert = ca.issue_session_cert(key.public_key(), identity)
    der = cert.public_bytes(pki.serialization.Encoding.DER)
    return der, key, pki.identity_from_cert(cert)


def credential(identity, der=b"old") -> linkrenewal.LinkCredential:
    return linkrenewal.LinkCredential(cert=der, identity=identity, expiry=trio.CancelScope())


def renewal(cred, der, key, *, nonce=None, sign=None):
    nonce = cred.challenge() if nonce is None else nonce
    signature = pki.sign_possession(sign or key, lr.proof_message(nonce, der))
    return lr.renew_request(der, nonce, signature)


async def renew(cluster, cred, request):
    link = Link()
    await linkrenewal.renew(cluster, link, cred, None, request, "127.0.0.1:1")
    return link.answers[0]


async def test_a_renewal_moves_the_connection_and_its_sessions_to_the_new_certificate(ca):
    cluster = StandIn(ca)
    _, _, old = issue(ca, seconds=5)
    cred = credential(old)
    link = Link()
    on_link = LiveSession(id="s1", user="alice", resource="r", kind="tcp", started=time.time(),
                          cancel_scope=trio.CancelScope(), identity=old, extra={"stream": (link, None)})
    elsewhere = LiveSession(id="s2", user="alice", resource="r", kind="tcp", started=time.time(),
                            cancel_scope=trio.CancelScope(), identity=old, extra={"stream": (Link(), None)})
    cluster.sessions = {"s1": on_link, "s2": elsewhere}
    der, key, new = issue(ca, seconds=3600)
    await linkrenewal.renew(cluster, link, cred, None, renewal(cred, der, key), "127.0.0.1:1")
    assert isinstance(link.answers[0], DialAccept)
    assert link.answers[0].params["expires_at"] == new.not_after.isoformat()
    assert cred.cert == der and cred.identity == new and cred.earlier_serials() == (old.serial,)
    assert cred.expiry.deadline > trio.current_time() + 3000
    assert on_link.identity == new and on_link.earlier_serials == (old.serial,)
    assert on_link.cancel_scope.deadline > trio.current_time() + 3000
    assert elsewhere.identity == old  # another connection's session is not this renewal's
    event, user, fields = cluster.events[0]
    assert (event, user, fields["sessions"]) == ("link.renew", "alice", 1)
    # Revoking the certificate it was opened with still cuts the session.
    cluster.snap.revoked = frozenset({old.serial})
    assert Cluster.cut_reason(cluster.snap, on_link) == "cert_revoked"


async def test_a_nonce_answers_once(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca)
    nonce = cred.challenge()
    assert isinstance(await renew(cluster, cred, renewal(cred, der, key, nonce=nonce)), DialAccept)
    again = await renew(cluster, cred, renewal(cred, der, key, nonce=nonce))
    assert isinstance(again, DialError) and again.code is ErrorCode.CERT_INVALID
    assert "no open challenge" in again.message


async def test_a_nonce_this_connection_was_not_sent_is_refused(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca)
    cred.challenge()
    answer = await renew(cluster, cred, renewal(cred, der, key, nonce=bytes(32)))
    assert isinstance(answer, DialError) and "no open challenge" in answer.message
    assert cluster.events[0][0] == "link.renew_denied"


async def test_refusals_are_audited_once_per_user_code_and_minute_then_counted(ca):
    """An agent retrying a refused renewal must not flood the audit: the
    first refusal per user, code and minute is on record at once, the rest
    are counted (gateway/cluster/core.py writes them as one event)."""
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca)
    for _ in range(5):
        cred.challenge()
        assert isinstance(await renew(cluster, cred, renewal(cred, der, key, nonce=bytes(32))), DialError)
    bobs, bobs_key, _ = issue(ca, "bob")
    await renew(cluster, cred, renewal(cred, bobs, bobs_key))  # another code: its own first
    assert [(e[0], e[1], e[2]["code"]) for e in cluster.events] == [
        ("link.renew_denied", "alice", "cert_invalid"), ("link.renew_denied", "alice", "access_denied")]
    assert {r["key"][1]: r["count"] for r in cluster.renew_refusals.drain()} == {"cert_invalid": 5, "access_denied": 1}


async def test_the_signature_must_be_the_new_keys(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca)
    answer = await renew(cluster, cred, renewal(cred, der, key, sign=pki.generate_key()))
    assert isinstance(answer, DialError) and "does not prove" in answer.message


async def test_a_certificate_from_another_ca_is_refused(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(pki.CertificateAuthority.create("another CA", now=pki.utcnow()))
    answer = await renew(cluster, cred, renewal(cred, der, key))
    assert isinstance(answer, DialError) and answer.code is ErrorCode.CERT_INVALID


async def test_an_expired_certificate_is_refused(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca, seconds=-1, not_before=pki.utcnow() - dt.timedelta(minutes=5))
    answer = await renew(cluster, cred, renewal(cred, der, key))
    assert isinstance(answer, DialError) and answer.code is ErrorCode.CERT_EXPIRED


@pytest.mark.parametrize("who", [dict(user="bob"), dict(user="ci", kind="bot", instance="i1")])
async def test_a_connection_never_changes_hands(ca, who):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    der, key, _ = issue(ca, **who)
    answer = await renew(cluster, cred, renewal(cred, der, key))
    assert isinstance(answer, DialError) and answer.code is ErrorCode.ACCESS_DENIED
    assert cred.cert == b"old"


async def test_a_bots_connection_is_renewed_by_the_same_instance_only(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca, "ci", kind="bot", instance="i1")[2])
    der, key, _ = issue(ca, "ci", kind="bot", instance="i2")
    assert isinstance(await renew(cluster, cred, renewal(cred, der, key)), DialError)
    der, key, _ = issue(ca, "ci", kind="bot", instance="i1")
    assert isinstance(await renew(cluster, cred, renewal(cred, der, key)), DialAccept)


async def test_a_locked_bot_cannot_renew_its_connection(ca):
    """As after a renewal out of turn (gateway/cluster/bots.py locks it)."""
    cluster = StandIn(ca)
    cred = credential(issue(ca, "ci", kind="bot", instance="i1")[2])
    cluster.snap.locks = {"ci": types.SimpleNamespace(reason="renewed out of turn")}
    der, key, _ = issue(ca, "ci", kind="bot", instance="i1")
    answer = await renew(cluster, cred, renewal(cred, der, key))
    assert isinstance(answer, DialError) and answer.code is ErrorCode.USER_LOCKED


@pytest.mark.parametrize("revoked", ["old", "new"])
async def test_a_revoked_certificate_cannot_renew_or_be_renewed_with(ca, revoked):
    cluster = StandIn(ca)
    old = issue(ca)[2]
    cred = credential(old)
    der, key, new = issue(ca)
    cluster.snap.revoked = frozenset({(old if revoked == "old" else new).serial})
    answer = await renew(cluster, cred, renewal(cred, der, key))
    assert isinstance(answer, DialError) and answer.code is ErrorCode.CERT_EXPIRED and "revoked" in answer.message


async def test_a_connection_without_a_valid_certificate_gets_no_challenge(ca):
    cred = linkrenewal.LinkCredential(cert=None, identity=None, expiry=trio.CancelScope())
    link = Link()
    linkrenewal.on_link_dial(StandIn(ca), link, cred, None, lr.challenge_request(), "127.0.0.1:1",
                             spawn=lambda *a: pytest.fail("nothing to check"))
    assert isinstance(link.answers[0], DialError) and link.answers[0].code is ErrorCode.CERT_REQUIRED


async def test_a_malformed_renewal_is_a_bad_request(ca):
    cluster = StandIn(ca)
    cred = credential(issue(ca)[2])
    answer = await renew(cluster, cred, lr.challenge_request())
    assert isinstance(answer, DialError) and answer.code is ErrorCode.BAD_REQUEST
