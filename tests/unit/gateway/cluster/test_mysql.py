"""gateway.cluster.mysql: what a dial may ask of the mysql kind, and what
its session auditor records and refuses."""

from __future__ import annotations

import datetime as dt

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cluster.dial import Refused
from gateway.cluster.mysql import MySqlKind, MySqlSessionAuditor
from gateway.cluster.rbac import Role
from gateway.cluster.store import Resource
from gateway.identity.pki import Identity
from gateway.net.filters import Filtered
from protocols.dial import DialRequest
from protocols.errors import ErrorCode
from protocols.mysql import Command, ErrPacket
from protocols.mysql import dialparams as dp
from tests.unit.protocols.mysql.session import MODERN, command, err, ok, pkt, query

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
ALICE = Identity(user="alice", roles=("dev",), cluster="test", not_before=NOW,
                 not_after=NOW + dt.timedelta(hours=1))


def check(**params: str) -> dict[str, str]:
    return MySqlKind().check_params(DialRequest(resource="maria", params=params), ALICE)


def test_params_default_to_the_identity_and_keep_no_database():
    out = check()
    assert out["db_user"] == "alice" and "db_name" not in out
    assert int(out[dp.CAPS]) and out[dp.CHARSET] == "0" and out[dp.MAX_PACKET] == str(1 << 24)


def test_params_pass_the_clients_handshake_and_attributes():
    out = check(db_user="app", db_name="shop", **{dp.CAPS: "12345", dp.CHARSET: "45", dp.MAX_PACKET: "1024",
                                                  dp.ATTR_PREFIX + "program_name": "mysql", "other": "dropped"})
    assert out == {"db_user": "app", "db_name": "shop", dp.CAPS: "12345", dp.CHARSET: "45",
                   dp.MAX_PACKET: "1024", dp.ATTR_PREFIX + "program_name": "mysql"}


def test_a_probe_carries_nothing_else():
    assert check(**{dp.PROBE: "anything", "db_user": "root"}) == {dp.PROBE: "handshake"}


@pytest.mark.parametrize("params", [
    {"db_user": "u" * 81}, {"db_name": "d" * 65}, {"db_user": "a\x00b"},
    {dp.CAPS: "-1"}, {dp.CAPS: str(1 << 64)}, {dp.CHARSET: "256"}, {dp.MAX_PACKET: "x"},
])
def test_bad_params_are_refused(params):
    with pytest.raises(Refused) as info:
        check(**params)
    assert info.value.code is ErrorCode.BAD_REQUEST


class FakeCluster:
    def __init__(self):
        self.events = []

    def audit_fields_soon(self, event, user, fields):
        self.events.append((event, fields))


class FakeSession:
    id, user, resource = "s1", "alice", "maria"

    def __init__(self):
        self.extra = {}


class Auditor(MySqlSessionAuditor):
    """The auditor, and its filter as the relay runs it: ``from_client``
    gives (what goes on to the server, the answer to the client)."""

    def from_client(self, data: bytes) -> tuple[bytes, bytes]:
        if not hasattr(self, "filtered"):
            self.filtered = Filtered(self)
        passed, answers = self.filtered.from_client(data)
        return b"".join(passed), answers


def auditor(roles=()):
    cluster = FakeCluster()
    a = Auditor(cluster, FakeSession(), MODERN,
                Resource(name="maria", kind="mysql", address="127.0.0.1:3306", labels={}), "app")
    a.roles = list(roles)
    return cluster, a


ROLE = Role.from_spec("dev", {"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["app*"]}]})


def test_commands_and_errors_are_audited():
    cluster, a = auditor([ROLE])
    a.from_client(query("select 1"))
    a.from_server(err(1, 1146, "Table 'app.t' doesn't exist"))
    a.from_client(command(Command.INIT_DB, b"app_two"))
    a.from_server(ok(1))
    a.from_client(command(Command.PING))
    a.from_server(ok(1))
    names = [e for e, _ in cluster.events]
    assert names == ["mysql.query", "mysql.error", "mysql.init_db", "mysql.command"]
    assert cluster.events[1][1]["errno"] == 1146
    assert cluster.events[2][1] == {"session_id": "s1", "resource": "maria", "schema": "app_two", "allowed": True}
    assert cluster.events[3][1]["command"] == "PING"


def _err(answer: tuple[bytes, bytes] | bytes) -> ErrPacket:
    """The ERR answered (with nothing passed on), checked to be one packet
    with sequence id 1."""
    if isinstance(answer, tuple):
        passed, answer = answer
        assert passed == b""
    assert answer[3] == 1 and int.from_bytes(answer[:3], "little") == len(answer) - 4
    return ErrPacket.decode(answer[4:])


@pytest.mark.parametrize("packet, errno", [
    (command(Command.INIT_DB, b"secret"), 1044),
    (query("USE secret"), 1044),
    (query("/* a comment */ use `secret`"), 1044),
    (query("select 1; use secret"), 1044),
    (query("use app_one; use secret"), 1044),
    (query("use/**/secret"), 1044), (query("use /* x */ `secret`"), 1044),  # comments between: the server's
    (query("use -- x\n secret"), 1044), (query("use#x\nsecret"), 1044),    # reading, not a word's
    (command(Command.INIT_DB, b"app\xff"), 1044),  # not UTF-8: refused rather than guessed
    (command(Command.CHANGE_USER, b"root\x00\x00app\x00"), 1235),
    # Longer than the auditor keeps, and so not read: refused all the same.
    (command(Command.CHANGE_USER, b"u" * (1 << 20) + b"\x00\x00"), 1235),
    # A USE far into a statement (past what its audit record keeps): read whole.
    (query("/* " + "x" * (64 * 1024) + " */ use secret"), 1044),
    (query("select '" + "x" * (64 * 1024) + "'; USE secret"), 1044),
], ids=["init_db", "use", "use-after-comment", "multi-statement", "second-use", "comment-between",
         "comment-between-quoted", "line-comment-between", "hash-comment-between", "not-utf8", "change_user",
        "change_user-unread", "use-after-64k-comment", "use-after-64k-statement"])
def test_what_the_role_does_not_allow_is_answered_unsent_and_the_session_goes_on(packet, errno):
    cluster, a = auditor([ROLE])
    error = _err(a.from_client(packet))
    assert error.errno == errno and error.sqlstate == "42000"
    assert cluster.events[-1][0] in ("mysql.init_db", "mysql.change_user")
    # The server never saw it, so it owes no answer: the next command's is the next.
    assert a.from_client(query("select 1")) == (query("select 1"), b"")
    a.from_server(ok(1))
    assert a.from_client(command(Command.PING)) == (command(Command.PING), b"")
    a.from_server(ok(1))
    assert not a.tracker.pending


async def test_a_change_user_on_the_multiplexed_connection_is_held_for_the_redial():
    cluster, a = auditor([ROLE])
    a.session.extra["stream"] = ("link", "stream")  # where a re-dial can switch the session
    asked = []
    answered = trio.Event()

    async def change_user(event):
        asked.append((event.username, event.database))
        await answered.wait()
        return ok(1)

    a.change_user = change_user
    packet = command(Command.CHANGE_USER, b"eduser\x00\x00app\x00")
    assert a.from_client(packet + query("select 1")) == (b"", b"")  # held, and what follows it
    filtered = a.filtered
    assert filtered.held and filtered.stalled
    assert a.from_client(query("select 2")) == (b"", b"")  # the client did not wait: it waits here
    resumed = trio.Event()
    filtered.resume = resumed.set
    async with trio.open_nursery() as nursery:
        nursery.start_soon(filtered.serve)
        await trio.testing.wait_all_tasks_blocked()
        assert asked == [("eduser", "app")] and not resumed.is_set()
        answered.set()
        await resumed.wait()
        assert filtered.pending
        # The answer first, then what waited goes on, in order.
        assert a.from_client(b"") == (query("select 1") + query("select 2"), ok(1))
        assert not filtered.stalled
        nursery.cancel_scope.cancel()


def test_the_errors_say_what_to_do():
    _, a = auditor([ROLE])
    use = _err(a.from_client(command(Command.INIT_DB, b"secret")))
    assert "db_name=secret" in use.message and "ask a cluster administrator" in use.message.lower()
    change = _err(a.from_client(command(Command.CHANGE_USER, b"root\x00\x00")))
    assert "COM_CHANGE_USER" in change.message and "mysql -u root" in change.message
    assert "stays db user 'app'" in change.message


def test_what_follows_a_refused_command_in_its_chunk_goes_on():
    cluster, a = auditor([ROLE])
    passed, answer = a.from_client(command(Command.INIT_DB, b"secret") + query("select 2"))
    assert passed == query("select 2") and _err(answer).errno == 1044
    assert [e for e, _ in cluster.events][-2:] == ["mysql.init_db", "mysql.query"]
    a.from_server(ok(1))
    assert not a.tracker.pending


def test_an_allowed_switch_goes_on_as_it_is():
    cluster, a = auditor([ROLE])
    assert a.from_client(command(Command.INIT_DB, b"app_two")) == (command(Command.INIT_DB, b"app_two"), b"")
    # (pipelined: nothing refused, nothing answered)
    assert a.from_client(query("use app_three")) == (query("use app_three"), b"")
    assert [f["allowed"] for e, f in cluster.events if e == "mysql.init_db"] == [True, True]


@pytest.mark.parametrize("stream", [
    # Split over reads: the filter sees it whole.
    [command(Command.INIT_DB, b"secret")[:6], command(Command.INIT_DB, b"secret")[6:]],
    # Pipelined: each is answered in turn (nothing of the server's is due).
    [query("use secret") + query("use secret") + command(Command.INIT_DB, b"secret")],
])
def test_refused_commands_split_or_pipelined_are_each_answered(stream):
    _, a = auditor([ROLE])
    answers = b""
    for chunk in stream:
        passed, answer = a.from_client(chunk)
        assert passed == b""
        answers += answer
    errs, pos = [], 0
    while pos < len(answers):
        end = pos + 4 + int.from_bytes(answers[pos:pos + 3], "little")
        assert answers[pos + 3] == 1  # each as its command's answer
        errs.append(ErrPacket.decode(answers[pos + 4:end]).errno)
        pos = end
    assert errs == [1044] * (1 if len(stream) == 2 else 3)
    assert not a.tracker.pending


@pytest.mark.parametrize("stream", [
    # The server still owes an answer to what came before: ours would come first.
    [query("select sleep(1)"), command(Command.INIT_DB, b"secret")],
    [query("select 1") + command(Command.INIT_DB, b"secret")],
])
def test_what_cannot_be_answered_in_place_ends_the_session_unsent(stream):
    cluster, a = auditor([ROLE])
    sent = b""
    with pytest.raises(trio.BrokenResourceError) as info:
        for chunk in stream:
            passed, answer = a.from_client(chunk)
            assert answer == b""
            sent += passed
    assert "the session ends" in str(info.value) and command(Command.INIT_DB, b"secret") not in sent
    assert cluster.events[-1][0] == "mysql.init_db" and not cluster.events[-1][1]["allowed"]


FULL = 0xFFFFFF


def _long_query(text: bytes) -> bytes:
    """A COM_QUERY of ``text`` (16 MiB and more: several packets)."""
    payload, out, seq = bytes([Command.QUERY]) + text, b"", 0
    while True:
        part, payload = payload[:FULL], payload[FULL:]
        out += len(part).to_bytes(3, "little") + bytes([seq]) + part
        seq += 1
        if len(part) < FULL:
            return out


@pytest.mark.parametrize("gap, tail, refused", [
    (b" " * 600, b"secret", True),  # "use", 600 spaces (more than is carried), the packet ends, "secret"
    (b"/*" + b"x" * 600 + b"*/ ", b"secret", True),  # a comment between: the server reads past it
    (b"/*" + b"x" * 600, b"*/secret", True),  # one the packet's end cuts
    (b" -- " + b"c" * 600, b"\nsecret", True),
    (b" ", b"app_two; select 'use secret'", True),  # a USE anywhere: too much refused, never too little
    (b" ", b"app_two", False),
    (b" ", b"/**/app_two", False),
    (b" ", b"", False),
])
def test_a_command_too_long_to_hold_passes_as_it_comes_and_a_use_in_it_ends_the_session(monkeypatch, gap, tail,
                                                                                         refused):
    from gateway.cluster import mysql

    monkeypatch.setattr(mysql, "MAX_CHECKED_COMMAND", 20 * 1024 * 1024)  # two packets joined is over
    _, a = auditor([ROLE])
    head, use = b"insert into t values ('", b"') ; use" + gap
    text = head + b"x" * (2 * FULL - 1 - len(head) - len(use)) + use  # two full packets' worth
    raw = _long_query(text + tail)
    first = raw[:2 * (FULL + 4)]
    passed, answer = a.from_client(first)
    assert passed == first and answer == b""  # over the bound: passed as it comes
    if refused:
        with pytest.raises(trio.BrokenResourceError, match="the session ends"):
            a.from_client(raw[len(first):])
    else:
        passed, answer = a.from_client(raw[len(first):])
        assert passed == raw[len(first):] and answer == b""
        assert a.commands.at_command  # the next command is read as one


def test_a_refused_command_behind_a_packet_out_of_order_is_still_refused():
    # (A packet with sequence id 5 where a command belongs: the server's to
    # refuse; the filter sees the next command whole all the same.)
    _, a = auditor([ROLE])
    odd = pkt(5, bytes([Command.INIT_DB]) + b"app")
    passed, answer = a.from_client(odd + command(Command.INIT_DB, b"secret"))
    assert passed == odd and _err(answer).errno == 1044


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["select 1", "use app_two", "use secret", "init secret", "init app",
                                 "change"]), min_size=1, max_size=6),
       st.data())
def test_fuzzed_chunking_never_lets_a_refused_command_through(commands, data):
    """However the client's bytes are cut into chunks, a refused command
    reaches the server never: answered in place, or the session ends."""
    packets = {"select 1": query("select 1"), "use app_two": query("use app_two"),
               "use secret": query("use secret"), "init secret": command(Command.INIT_DB, b"secret"),
               "init app": command(Command.INIT_DB, b"app"),
               "change": command(Command.CHANGE_USER, b"root\x00\x00")}
    refused = {"use secret", "init secret", "change"}
    _, a = auditor([ROLE])
    sent = bytearray()
    try:
        for name in commands:
            raw = packets[name]
            cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=3)))
            forwarded, answers = bytearray(), bytearray()
            for start, end in zip([0, *cuts], [*cuts, len(raw)]):
                passed, answer = a.from_client(raw[start:end])
                forwarded += passed
                answers += answer
            sent += forwarded
            if name in refused:
                assert forwarded == b"" and _err(bytes(answers)).errno in (1044, 1235)
            else:
                assert forwarded == raw and not answers
                a.from_server(ok(1))
    except trio.BrokenResourceError:
        pass  # cut short: what was forwarded so far is what the server got
    for name in refused:
        assert packets[name] not in sent


def test_a_database_name_that_is_not_utf8_is_refused_even_where_every_name_is_allowed():
    role = Role.from_spec("r", {"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["*"]}]})
    cluster, a = auditor([role])
    answer = a.from_client(command(Command.INIT_DB, b"app\xff"))
    assert "UTF-8" in _err(answer).message
    assert cluster.events[-1][1]["allowed"] is False


def test_a_command_too_long_to_hold_with_too_many_uses_to_read_ends_the_session(monkeypatch):
    from gateway.cluster import mysql

    monkeypatch.setattr(mysql, "MAX_CHECKED_COMMAND", 20 * 1024 * 1024)
    _, a = auditor([ROLE])
    a._uses.max_uses = 3  # (65536 a packet: too slow to build here)
    raw = _long_query(b"select '" + b"x" * (2 * FULL) + b"' /* use /* use /* use /* use /*")
    first = raw[:2 * (FULL + 4)]
    a.from_client(first)
    with pytest.raises(trio.BrokenResourceError, match="more than 3 'use' words"):
        a.from_client(raw[len(first):])
