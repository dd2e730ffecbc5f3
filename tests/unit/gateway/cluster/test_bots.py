"""gateway/cluster/bots.py over a real store file."""

import pytest

from gateway.cluster import bots
from gateway.cluster.store import AlreadyExists, Store, StoreError

from gateway.cluster.passwords import DUMMY_HASH as PW


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "wicket.db")
    yield s
    s.close()


def test_a_token_is_spent_once_per_use_and_then_refused_with_the_reason(store):
    bots.add_bot(store, "ci", ["dev"], created_by="admin", now=100.0)
    token, record = bots.add_token(store, "ci", uses=2, ttl=60, created_by="admin", now=100.0)
    assert token.startswith(bots.TOKEN_PREFIX) and len(token) < bots.MAX_TOKEN_LENGTH
    first, i1 = bots.join(store, token, now=101.0)
    second, i2 = bots.join(store, token, now=102.0)
    assert (first.uses_left, second.uses_left, second.used) == (1, 0, 2) and i1 != i2
    with pytest.raises(bots.TokenRefused) as refused:
        bots.join(store, token, now=103.0)
    assert refused.value.reason == "used_up" and refused.value.bot == "ci" and refused.value.token_id == record.id
    assert [i["id"] for i in bots.list_instances(store, "ci")] == [i1, i2]


def test_expired_unknown_and_malformed_tokens(store):
    bots.add_bot(store, "ci", [], created_by="admin", now=100.0)
    token, _ = bots.add_token(store, "ci", uses=1, ttl=10, created_by="admin", now=100.0)
    with pytest.raises(bots.TokenRefused, match="has expired") as refused:
        bots.join(store, token, now=110.0)
    assert refused.value.reason == "expired"
    altered = token[:-1] + ("B" if token.endswith("A") else "A")  # never the token itself
    for bad in (altered, "not-a-token", 42, bots.TOKEN_PREFIX + "x" * 500):
        with pytest.raises(bots.TokenRefused) as refused:
            bots.join(store, bad, now=101.0)
        assert refused.value.reason == "unknown" and refused.value.token_id is None
    with pytest.raises(ValueError):
        bots.add_token(store, "ci", uses=0, ttl=10, created_by="admin", now=100.0)
    with pytest.raises(LookupError):
        bots.add_token(store, "nobody", uses=1, ttl=10, created_by="admin", now=100.0)


def test_renewals_move_on_only_from_the_current_count(store):
    bots.add_bot(store, "ci", [], created_by="admin", now=100.0)
    token, _ = bots.add_token(store, "ci", uses=1, ttl=10, created_by="admin", now=100.0)
    _, instance = bots.join(store, token, now=101.0)
    assert bots.advance_renewals(store, "ci", instance, 0, now=102.0) == 1
    assert bots.advance_renewals(store, "ci", instance, 0, now=103.0) is None  # a copy, renewed again
    assert bots.advance_renewals(store, "ci", instance, 1, now=104.0) == 2
    assert bots.advance_renewals(store, "other", instance, 2, now=104.0) is None


def test_removing_a_bot_takes_its_tokens_and_instances_and_revokes(store):
    bots.add_bot(store, "ci", [], created_by="admin", now=100.0)
    token, _ = bots.add_token(store, "ci", uses=1, ttl=10, created_by="admin", now=100.0)
    bots.join(store, token, now=101.0)
    assert bots.delete_bot(store, "ci", now=102.0)
    assert bots.list_tokens(store) == [] and bots.list_instances(store, "ci") == []
    bots.add_bot(store, "ci", [], created_by="admin", now=103.0)
    assert bots.get_bot(store, "ci").cert_generation == 1
    assert not bots.delete_bot(store, "nobody", now=104.0)


def test_bots_and_users_never_share_a_name(store):
    bots.add_bot(store, "ci", [], created_by="admin", now=100.0)
    with pytest.raises(AlreadyExists):
        bots.add_bot(store, "ci", [], created_by="admin", now=100.0)
    with pytest.raises(StoreError, match="taken by a bot"):
        store.add_user("ci", PW, now=100.0)
    store.add_user("alice", PW, now=100.0)
    with pytest.raises(AlreadyExists) as taken:
        bots.add_bot(store, "alice", [], created_by="admin", now=100.0)
    assert taken.value.kind == "user"


def test_bot_changes_bump_the_change_counter(store):
    before = store.change_counter()
    bots.add_bot(store, "ci", ["dev"], created_by="admin", now=100.0)
    assert bots.set_roles(store, "ci", ["ops"])
    assert store.change_counter() == before + 2
    assert bots.get_bot(store, "ci").roles == ("ops",)
