"""gateway.net.filters: a kind's filter of whole client messages inside the
relay. The framing state on bytes (whole, one byte at a time, with
trailing data, fuzzed), then a filter in the two-socket relay (engine and
task-based) and on a stream of a multiplexed connection."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings, strategies as st

from gateway.net.ends import Answer
from gateway.net.filters import Filtered
from gateway.net.relay import RelayCounters, relay
from protocols.errors import RemoteProtocolError
from protocols.framing import FrameLayout
from protocols.mux import INITIAL_WINDOW
from tests.unit.gateway.net.muxenv import HANG, linked, socket_pair

#: A toy protocol: a length that counts itself, then a verb.
LAYOUT = FrameLayout(name="toy message", header=">I", length_field=0, uncounted=0, min_length=5,
                     max_length=64 * 1024 * 1024, wire_hint=17)


def msg(body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 4) + body


class Toy:
    """pass... goes on, ask... is answered with ok..., drop... vanishes,
    bad... cannot be read."""

    layout = LAYOUT

    def __init__(self, max_length: int = 16 * 1024 * 1024) -> None:
        self.max_length = max_length
        self.seen: list[bytes] = []
        self.ended = 0
        self.broken_with: list[str] = []

    def on_message(self, raw: bytes) -> bytes | None:
        body = raw[4:]
        self.seen.append(body)
        if body.startswith(b"ask"):
            return msg(b"ok" + body[3:])
        if body.startswith(b"drop"):
            return b""
        if body.startswith(b"bad"):
            raise RemoteProtocolError("a bad message")
        return None

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


# -- in the relays -----------------------------------------------------------------


async def _read_exactly(stream, n: int) -> bytes:
    data = bytearray()
    with trio.fail_after(HANG):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
    return bytes(data)


@pytest.fixture(params=["engine", "trio"])
def relay_kind(request, monkeypatch) -> str:
    """Each two-socket relay test runs through the engine and the trio relay."""
    if request.param == "trio":
        monkeypatch.setenv("WICKET_RELAY", "trio")
    else:
        monkeypatch.delenv("WICKET_RELAY", raising=False)
    return request.param


async def test_a_two_socket_relay_filters_the_clients_side(relay_kind) -> None:
    client, gateway_side = socket_pair()
    upstream, server = socket_pair()
    toy = Toy()
    counters = RelayCounters()
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            async with gateway_side, upstream:
                await relay(gateway_side, upstream, counters=counters, filtered=Filtered(toy))

        nursery.start_soon(run)
        big = msg(b"pass " + b"b" * (3 * 1024 * 1024))  # over many reads
        await client.send_all(msg(b"ask 1") + big[:1000])
        assert await _read_exactly(client, len(msg(b"ok 1"))) == msg(b"ok 1")
        await client.send_all(big[1000:] + msg(b"drop"))
        assert await _read_exactly(server, len(big)) == big
        await server.send_all(msg(b"reply"))
        assert await _read_exactly(client, len(msg(b"reply"))) == msg(b"reply")
        await client.send_eof()
        assert await server.receive_some(10) == b""  # the EOF went on ...
        await server.send_eof()
        assert await client.receive_some(10) == b""
    assert toy.ended == 1  # ... and the filter heard of it
    assert counters.a_to_b == len(msg(b"ask 1") + big + msg(b"drop"))
    assert counters.b_to_a == len(msg(b"ok 1") + msg(b"reply"))


async def test_a_stream_of_a_multiplexed_connection_filters_the_gateways_side(pki, monkeypatch) -> None:
    from tests.unit.gateway.net import muxenv

    toy = Toy()
    monkeypatch.setattr(muxenv.Pair, "filtered", {"f": Filtered(toy)}, raising=False)
    async with linked(pki) as pair:
        client, started = await pair.session("f")
        server = pair.upstreams["f"]
        # More answered bytes than a window, over the session: each is
        # acknowledged as it is taken. (A client waits for its answers, as
        # drivers do: answers to more than a window of pipelined asks in one
        # read would overrun the window and reset the stream.)
        asks = [msg(b"ask " + b"q" * 1000) for _ in range(3 * INITIAL_WINDOW // 1008)]
        batch = INITIAL_WINDOW // 4 // len(asks[0])
        for i in range(0, len(asks), batch):
            await client.send_all(b"".join(asks[i:i + batch]))
            got = await _read_exactly(client, len(asks[i:i + batch]) * len(msg(b"ok " + b"q" * 1000)))
            assert got == b"".join(msg(b"ok " + b"q" * 1000) for _ in asks[i:i + batch])
        # A message larger than the window passes whole.
        big = msg(b"pass " + b"b" * (3 * INITIAL_WINDOW))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, big)
            assert await _read_exactly(server, len(big)) == big
        # An answer waits for the end of the server's message.
        reply = msg(b"r" * 5000)
        await server.send_all(reply[:2500])
        assert await _read_exactly(client, 2500) == reply[:2500]
        await client.send_all(msg(b"ask late"))
        await server.send_all(reply[2500:])
        assert await _read_exactly(client, len(reply) - 2500 + len(msg(b"ok late")))\
            == reply[2500:] + msg(b"ok late")
        # A message the filter cannot read resets the stream, not the link.
        await client.send_all(msg(b"bad"))
        with trio.fail_after(HANG):
            error = await started.ended()
            while "f" not in pair.results:
                await trio.sleep(0.01)
        assert "a bad message" in pair.results["f"] and error
        assert pair.cluster.failed is None and toy.seen[-1] == b"bad"


def _answering_tap(chunk: bytes) -> Answer | None:
    """A tap as MySQL's (ends.Answer): a chunk starting with TAP has those
    three bytes taken out and answered with ``tapped``."""
    if chunk.startswith(b"TAP"):
        return Answer(forward=chunk[3:], answer=b"tapped")
    return None


async def test_an_answering_tap_and_a_filter_work_side_by_side(relay_kind) -> None:
    """The tap sees the chunk first; the filter gets what the tap let go on."""
    client, gateway_side = socket_pair()
    upstream, server = socket_pair()
    toy = Toy()
    counters = RelayCounters()
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            async with gateway_side, upstream:
                await relay(gateway_side, upstream, counters=counters, taps=(_answering_tap, None),
                            filtered=Filtered(toy))

        nursery.start_soon(run)
        await client.send_all(b"TAP" + msg(b"ask 1") + msg(b"pass x"))
        assert await _read_exactly(client, len(b"tapped" + msg(b"ok 1"))) == b"tapped" + msg(b"ok 1")
        assert await _read_exactly(server, len(msg(b"pass x"))) == msg(b"pass x")
        await server.send_all(msg(b"reply"))
        assert await _read_exactly(client, len(msg(b"reply"))) == msg(b"reply")
        await client.send_eof()
        assert await server.receive_some(10) == b""
        await server.send_eof()
        assert await client.receive_some(10) == b""
    assert toy.seen == [b"ask 1", b"pass x"] and toy.ended == 1
    assert counters.a_to_b == len(msg(b"ask 1") + msg(b"pass x"))
    assert counters.b_to_a == len(b"tapped" + msg(b"ok 1") + msg(b"reply"))


async def test_an_answering_tap_and_a_filter_on_a_stream_of_a_multiplexed_connection(pki, monkeypatch) -> None:
    from tests.unit.gateway.net import muxenv

    toy = Toy()
    monkeypatch.setattr(muxenv.Pair, "filtered", {"f": Filtered(toy)}, raising=False)
    async with linked(pki) as pair:
        pair.taps["f"] = (_answering_tap, None)
        client, _started = await pair.session("f")
        server = pair.upstreams["f"]
        await client.send_all(b"TAP" + msg(b"ask 1") + msg(b"pass x"))
        assert await _read_exactly(client, len(b"tapped" + msg(b"ok 1"))) == b"tapped" + msg(b"ok 1")
        assert await _read_exactly(server, len(msg(b"pass x"))) == msg(b"pass x")
        await server.send_all(msg(b"reply"))
        assert await _read_exactly(client, len(msg(b"reply"))) == msg(b"reply")
    assert toy.seen == [b"ask 1", b"pass x"]
