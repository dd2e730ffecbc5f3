"""gateway.net.filters: a kind's filter of whole client messages inside the
relay, the one way the cluster answers a client itself. The framing state
on bytes (whole, one byte at a time, with trailing data, fuzzed; joined
messages; room for answers; held messages), then a filter in the two-socket
relay (engine and task-based) and on a stream of a multiplexed connection:
answering, holding a message for trio, and holding a client back that does
not read its answers."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings, strategies as st

import trio.testing

from gateway.net.filters import MORE, Filtered, Hold
from gateway.net.relay import RelayCounters
from protocols.errors import RemoteProtocolError
from protocols.framing import FrameLayout
from protocols.mux import INITIAL_WINDOW
from tests.unit.gateway.net.muxenv import linked
from tests.unit.gateway.net.relaypair import HANG, relayed
from tests.unit.tlsutil import read_exactly

#: A toy protocol: a length that counts itself, then a verb.
LAYOUT = FrameLayout(name="toy message", header=">I", length_field=0, uncounted=0, min_length=5,
                     max_length=64 * 1024 * 1024, wire_hint=17)


def msg(body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 4) + body


def _last_frame(raw: bytes) -> bytes:
    """The body of the last frame of ``raw`` (frames joined: MORE)."""
    pos = 0
    while True:
        size = struct.unpack(">I", raw[pos:pos + 4])[0]
        if pos + size == len(raw):
            return raw[pos + 4:]
        pos += size


class Toy:
    """pass... goes on, ask... is answered with ok..., drop... vanishes,
    bad... cannot be read, more... goes on in the next message (the two
    shown joined), hold... is answered by trio (held...) once ``release``
    is set."""

    layout = LAYOUT
    holds = True

    def __init__(self, max_length: int = 16 * 1024 * 1024, max_message: int | None = None) -> None:
        self.max_length = max_length
        self.max_message = max_message or max_length
        self.seen: list[bytes] = []
        self.ended = 0
        self.broken_with: list[str] = []
        self.release: trio.Event | None = None

    def on_message(self, raw: bytes) -> bytes | Hold | object | None:
        self.seen.append(raw[4:])
        verb = _last_frame(raw)  # a joined message's verb is its last frame's
        if verb.startswith(b"more"):
            return MORE
        if verb.startswith(b"ask"):
            return msg(b"ok" + verb[3:])
        if verb.startswith(b"drop"):
            return b""
        if verb.startswith(b"bad"):
            raise RemoteProtocolError("a bad message")
        if verb.startswith(b"hold"):
            return Hold(lambda: self._held(verb[4:]))
        return None

    async def _held(self, tail: bytes) -> bytes:
        if self.release is not None:
            await self.release.wait()
        return msg(b"held" + tail)

    def eof(self) -> None:
        self.ended += 1

    def broken(self, error: Exception) -> None:
        self.broken_with.append(str(error))


def feed(filtered: Filtered, data: bytes, step: int | None = None) -> tuple[bytes, bytes, int]:
    """(passed, answered, bytes passed that an earlier call had taken)."""
    passed, answered, carried = [], [], 0
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        out, answers = filtered.from_client(chunk)
        passed += out
        answered.append(answers)
        carried += filtered.carried
    return b"".join(passed), b"".join(answered), carried


STREAM = msg(b"pass one") + msg(b"ask two") + msg(b"drop three") + msg(b"pass four")


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_whole_messages_pass_answer_or_vanish_in_order(step) -> None:
    toy = Toy()
    filtered = Filtered(toy)
    passed, answered, carried = feed(filtered, STREAM, step)
    assert passed == msg(b"pass one") + msg(b"pass four")
    assert answered == msg(b"ok two")
    assert toy.seen == [b"pass one", b"ask two", b"drop three", b"pass four"]
    assert filtered.buffered == 0
    if step is None:
        assert carried == 0  # nothing was held
    elif step == 1:
        assert carried == len(passed) - 2  # all but each message's last byte


def test_trailing_bytes_wait_for_the_rest_of_their_message() -> None:
    toy = Toy()
    filtered = Filtered(toy)
    whole = msg(b"pass " + b"x" * 1000)
    out, answers = filtered.from_client(msg(b"ask a") + whole[:10])
    assert out == [] and answers == msg(b"ok a") and filtered.buffered == 10
    out, answers = filtered.from_client(whole[10:])
    assert out == [whole] and filtered.carried == 10 and filtered.buffered == 0


def test_a_bad_length_is_the_filters_to_record_then_ends() -> None:
    toy = Toy()
    with pytest.raises(RemoteProtocolError):
        Filtered(toy).from_client(b"\x00\x00\x00\x02xx")  # shorter than its own header
    toy2 = Toy(max_length=100)
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum 100"):
        Filtered(toy2).from_client(struct.pack(">I", 101))  # said at once, before the body
    assert toy.broken_with and toy2.broken_with and not toy.seen


def test_an_answer_never_lands_inside_a_server_message() -> None:
    filtered = Filtered(Toy())
    reply = msg(b"r" * 100)
    assert filtered.from_server(reply[:50]) == b""
    assert filtered.from_client(msg(b"ask 1")) == ([], b"")  # half a reply is on its way: wait
    assert filtered.from_client(msg(b"ask 2")) == ([], b"")
    assert filtered.from_server(reply[50:]) == msg(b"ok 1") + msg(b"ok 2")
    assert filtered.from_client(msg(b"ask 3")) == ([], msg(b"ok 3"))  # between replies: at once


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.sampled_from([b"pass", b"ask", b"drop"]).flatmap(
           lambda verb: st.binary(max_size=40).map(lambda tail: verb + tail)), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=10))
def test_any_split_gives_the_same_messages(bodies, cuts) -> None:
    data = b"".join(msg(body) for body in bodies)
    whole = feed(Filtered(Toy()), data)
    filtered = Filtered(Toy())
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    passed, answered, carried, given_now = [], [], 0, 0
    for a, b in zip(points, points[1:]):
        out, answers = filtered.from_client(data[a:b])
        passed += out
        answered.append(answers)
        carried += filtered.carried
        given_now += sum(map(len, out)) - filtered.carried
    assert (b"".join(passed), b"".join(answered)) == whole[:2]
    assert carried + given_now == len(whole[0])  # every passed byte counted once
    assert filtered.buffered == 0


def test_messages_past_the_room_for_answers_wait_untaken() -> None:
    filtered = Filtered(Toy())
    asks = msg(b"ask 1") + msg(b"ask 2") + msg(b"pass 3")
    passed, answers = filtered.from_client(asks, room=1)  # one answer, then no room
    assert (passed, answers) == ([], msg(b"ok 1"))
    assert filtered.taken == len(msg(b"ask 1")) and filtered.stalled and filtered.pending
    assert filtered.buffered == len(asks) - len(msg(b"ask 1"))
    passed, answers = filtered.from_client(b"", room=0)  # still none: nothing looked at
    assert (passed, answers, filtered.taken) == ([], b"", 0)
    passed, answers = filtered.from_client(b"")
    assert (passed, answers) == ([msg(b"pass 3")], msg(b"ok 2"))
    assert filtered.taken == len(msg(b"ask 2") + msg(b"pass 3")) and not filtered.stalled


def test_an_incomplete_frame_is_taken_and_its_bytes_passed_later_are_carried() -> None:
    filtered = Filtered(Toy())
    whole = msg(b"pass " + b"x" * 100)
    filtered.from_client(whole[:30])
    assert filtered.taken == 30  # acknowledged at once: a frame may be larger than a window
    passed, _ = filtered.from_client(whole[30:])
    assert passed == [whole] and filtered.carried == 30 and filtered.taken == len(whole) - 30


@pytest.mark.parametrize("step", [None, 1, 5])
def test_a_message_of_several_frames_is_shown_joined(step) -> None:
    toy = Toy()
    filtered = Filtered(toy)
    asked = msg(b"more a") + msg(b"more b") + msg(b"ask c")
    passing = msg(b"more d") + msg(b"pass e")
    passed, answered, carried = feed(filtered, asked + passing, step)
    assert answered == msg(b"ok c")  # answered as one message
    assert toy.seen[-1] == passing[4:]  # shown whole
    assert passed == passing  # and passed whole, as it came
    assert filtered.buffered == 0
    if step == 1:
        assert carried == len(passing) - 1  # all but the last byte was taken by an earlier call


def test_a_joined_message_over_its_bound_ends_the_session() -> None:
    toy = Toy(max_message=40)
    filtered = Filtered(toy)
    with pytest.raises(RemoteProtocolError, match="over 40 bytes cannot be checked"):
        filtered.from_client(msg(b"more " + b"x" * 20) + msg(b"more " + b"y" * 20))
    assert toy.broken_with


def test_a_filter_that_does_not_say_it_holds_cannot() -> None:
    toy = Toy()
    toy.holds = False
    with pytest.raises(RuntimeError, match="does not say it holds"):
        Filtered(toy).from_client(msg(b"hold"))


async def test_a_held_message_waits_for_trio_and_so_does_what_follows() -> None:
    toy = Toy()
    toy.release = trio.Event()
    filtered = Filtered(toy)
    resumed = trio.Event()
    filtered.resume = resumed.set
    async with trio.open_nursery() as nursery:
        nursery.start_soon(filtered.serve)
        assert filtered.from_client(msg(b"pass 1") + msg(b"hold 2") + msg(b"ask 3")) == ([msg(b"pass 1")], b"")
        assert filtered.held and filtered.stalled and not filtered.pending
        assert filtered.taken == len(msg(b"pass 1") + msg(b"hold 2"))  # not ask 3: not looked at
        assert filtered.from_client(msg(b"pass 4")) == ([], b"")  # later bytes wait too
        assert toy.seen == [b"pass 1", b"hold 2"]
        toy.release.set()
        await resumed.wait()
        assert filtered.pending
        assert filtered.from_client(b"") == ([msg(b"pass 4")], msg(b"held 2") + msg(b"ok 3"))
        assert not filtered.stalled
        nursery.cancel_scope.cancel()


# -- in the relays -----------------------------------------------------------------


@pytest.fixture(params=["engine", "trio"])
def relay_kind(request, monkeypatch) -> str:
    """Each two-socket relay test runs through the engine and the trio relay."""
    if request.param == "trio":
        monkeypatch.setenv("WICKET_RELAY", "trio")
    else:
        monkeypatch.delenv("WICKET_RELAY", raising=False)
    return request.param


async def test_a_two_socket_relay_filters_the_clients_side(relay_kind) -> None:
    toy = Toy()
    counters = RelayCounters()
    early = msg(b"ask 0") + msg(b"pass 0")  # sent behind a dial frame: filtered too
    async with relayed(tcp=False, counters=counters, filtered=Filtered(toy), early=early) as pair:
        client, server = pair.client, pair.server
        assert await read_exactly(client, len(msg(b"ok 0"))) == msg(b"ok 0")
        assert await read_exactly(server, len(msg(b"pass 0"))) == msg(b"pass 0")
        big = msg(b"pass " + b"b" * (3 * 1024 * 1024))  # over many reads
        await client.send_all(msg(b"ask 1") + big[:1000])
        assert await read_exactly(client, len(msg(b"ok 1"))) == msg(b"ok 1")
        await client.send_all(big[1000:] + msg(b"drop"))
        assert await read_exactly(server, len(big)) == big
        await server.send_all(msg(b"reply"))
        assert await read_exactly(client, len(msg(b"reply"))) == msg(b"reply")
        await client.send_eof()
        assert await server.receive_some(10) == b""  # the EOF went on ...
        await server.send_eof()
        assert await client.receive_some(10) == b""
    assert toy.ended == 1  # ... and the filter heard of it
    assert counters.a_to_b == len(early + msg(b"ask 1") + big + msg(b"drop"))
    assert counters.b_to_a == len(msg(b"ok 0") + msg(b"ok 1") + msg(b"reply"))


async def _until(condition) -> None:
    """Poll (the relay engine runs in its own thread) until ``condition()``."""
    with trio.fail_after(HANG):
        while not condition():
            await trio.sleep(0.01)


ASK = msg(b"ask " + b"q" * 1000)
OK = msg(b"ok " + b"q" * 1000)


async def test_a_two_socket_relay_holds_a_message_for_trio(relay_kind) -> None:
    toy = Toy()
    toy.release = trio.Event()
    filtered = Filtered(toy)
    async with relayed(tcp=False, filtered=filtered) as pair:
        pair.nursery.start_soon(filtered.serve)
        client, server = pair.client, pair.server
        await client.send_all(msg(b"hold x") + msg(b"pass after") + msg(b"ask y"))
        await client.send_eof()  # the EOF too waits behind the held message
        await _until(lambda: toy.seen)
        assert toy.seen == [b"hold x"]  # nothing after it was looked at
        toy.release.set()
        assert await read_exactly(client, len(msg(b"held x") + msg(b"ok y"))) == msg(b"held x") + msg(b"ok y")
        assert await read_exactly(server, len(msg(b"pass after"))) == msg(b"pass after")
        assert await server.receive_some(10) == b""
        await server.send_eof()
        assert await client.receive_some(10) == b""
        pair.nursery.cancel_scope.cancel()
    assert toy.ended == 1


async def test_a_two_socket_client_that_does_not_read_its_answers_is_held_back(relay_kind) -> None:
    # Far more answers than the sockets' buffers and the room hold: the
    # client's writes block, nothing is cut, and all arrive once it reads.
    count = 8 * 1024 * 1024 // len(ASK)
    async with relayed(tcp=False, filtered=Filtered(Toy())) as pair:
        client = pair.client
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, ASK * count)
            await trio.testing.wait_all_tasks_blocked()
            assert await read_exactly(client, len(OK) * count) == OK * count
        await client.send_eof()
        assert await pair.server.receive_some(10) == b""
        await pair.server.send_eof()
        assert await client.receive_some(10) == b""
    assert pair.stats[0].error is None


async def test_a_stream_of_a_multiplexed_connection_filters_the_gateways_side(pki, monkeypatch) -> None:
    from tests.unit.gateway.net import muxenv

    toy = Toy()
    monkeypatch.setattr(muxenv.Pair, "filtered", {"f": Filtered(toy)}, raising=False)
    async with linked(pki) as pair:
        client, started = await pair.session("f")
        server = pair.upstreams["f"]
        with trio.fail_after(HANG):
            # More answered bytes than a window, pipelined in one go by a
            # client that reads nothing until it has sent them all: its
            # bytes are left unacknowledged while the answers wait, and
            # the stream lives.
            count = 3 * INITIAL_WINDOW // len(ASK)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, ASK * count)
                await trio.testing.wait_all_tasks_blocked()
                assert await read_exactly(client, len(OK) * count) == OK * count
            # A message larger than the window passes whole.
            big = msg(b"pass " + b"b" * (3 * INITIAL_WINDOW))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, big)
                assert await read_exactly(server, len(big)) == big
            # An answer waits for the end of the server's message.
            reply = msg(b"r" * 5000)
            await server.send_all(reply[:2500])
            assert await read_exactly(client, 2500) == reply[:2500]
            await client.send_all(msg(b"ask late"))
            await server.send_all(reply[2500:])
            assert await read_exactly(client, len(reply) - 2500 + len(msg(b"ok late")))\
                == reply[2500:] + msg(b"ok late")
            # A message the filter cannot read resets the stream, not the link.
            await client.send_all(msg(b"bad"))
            error = await started.ended()
            while "f" not in pair.results:
                await trio.sleep(0.01)
        assert "a bad message" in pair.results["f"] and error
        assert pair.cluster.failed is None and toy.seen[-1] == b"bad"


async def test_a_stream_of_a_multiplexed_connection_holds_a_message_for_trio(pki, monkeypatch) -> None:
    from tests.unit.gateway.net import muxenv

    toy = Toy()
    toy.release = trio.Event()
    filtered = Filtered(toy)
    monkeypatch.setattr(muxenv.Pair, "filtered", {"h": filtered}, raising=False)
    async with linked(pki) as pair:
        pair.nursery.start_soon(filtered.serve)
        client, started = await pair.session("h")
        server = pair.upstreams["h"]
        with trio.fail_after(HANG):
            await client.send_all(msg(b"hold x") + msg(b"pass after"))
            await client.send_eof()  # passed on only after what was held
            await _until(lambda: toy.seen)
            assert toy.seen == [b"hold x"]
            toy.release.set()
            assert await read_exactly(client, len(msg(b"held x"))) == msg(b"held x")
            assert await read_exactly(server, len(msg(b"pass after"))) == msg(b"pass after")
            assert await server.receive_some(10) == b""
            await server.send_eof()
            assert await client.receive_some(10) == b""
            assert await started.ended() is None
        assert toy.ended == 1
