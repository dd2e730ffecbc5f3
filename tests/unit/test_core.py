"""gateway.cluster.core: whether a certificate still stands (locks,
removals, revocations) and which live sessions a change cuts."""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from gateway.cluster.core import Cluster, LiveSession, Snapshot
from gateway.cluster.passwords import DUMMY_HASH
from gateway.cluster.store import Lock, User
from gateway.identity import pki
from protocols.errors import ErrorCode

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _identity(user: str = "alice", generation: int = 0, serial: int = 11) -> pki.Identity:
    return pki.Identity(user=user, roles=(), cluster="c", not_before=NOW, not_after=NOW + dt.timedelta(hours=1),
                        serial=serial, generation=generation)


def _snapshot(*, generation: int = 0, locked: bool = False, revoked: frozenset[int] = frozenset(),
              users: tuple[str, ...] = ("alice",)) -> Snapshot:
    return Snapshot(
        counter=1,
        users={name: User(name=name, roles=(), created_at=0.0, password_hash=DUMMY_HASH,
                          cert_generation=generation) for name in users},
        locks={"alice": Lock(user="alice", reason="incident", created_by="admin", created_at=0.0)} if locked else {},
        roles={}, resources={}, revoked=revoked,
        revocations={"alice": "user locked: incident"} if generation else {},
    )


def test_a_certificate_of_the_current_generation_stands():
    assert Cluster.check_standing(_snapshot(generation=2), _identity(generation=2)).name == "alice"


@pytest.mark.parametrize(("snap", "identity", "code", "words"), [
    (_snapshot(generation=1), _identity(generation=0), ErrorCode.CERT_EXPIRED, "revoked (user locked: incident)"),
    (_snapshot(revoked=frozenset({11})), _identity(serial=11), ErrorCode.CERT_EXPIRED, "certs revoke"),
    (_snapshot(locked=True), _identity(), ErrorCode.USER_LOCKED, "is locked (incident)"),
    (_snapshot(users=()), _identity(), ErrorCode.ACCESS_DENIED, "no longer exists"),
])
def test_refusals_say_what_happened(snap, identity, code, words):
    with pytest.raises(pki.CertError) as err:
        Cluster.check_standing(snap, identity)
    assert err.value.code is code and words in err.value.message
    # The next step is the gateway's (or the API's) to add, once.
    assert "administrator" not in err.value.message and "wicket login" not in err.value.message


def test_which_live_sessions_a_change_cuts():
    def session(identity: pki.Identity | None) -> LiveSession:
        s = LiveSession(id="s", user="alice", resource="r", kind="tcp", started=0.0,
                        cancel_scope=trio.CancelScope())
        s.identity = identity
        return s

    assert Cluster.cut_reason(_snapshot(), session(_identity())) is None
    assert Cluster.cut_reason(_snapshot(locked=True), session(None)) == "user_locked"
    assert Cluster.cut_reason(_snapshot(generation=1), session(_identity())) == "cert_revoked"
    assert Cluster.cut_reason(_snapshot(revoked=frozenset({11})), session(_identity())) == "cert_revoked"
    assert Cluster.cut_reason(_snapshot(users=()), session(_identity())) == "user_removed"
    # A session not allowed yet is judged once it is.
    assert Cluster.cut_reason(_snapshot(generation=1), session(None)) is None
