"""protocols/mux.py with bytes only: two MuxConnections (gateway, cluster)
joined by hand. Every exchange is fed whole, one byte at a time and with the
next frame's first bytes trailing; every rule of the module docstring has a
case; hypothesis throws arbitrary bytes and arbitrary chunkings at it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from protocols.dial import NEED_DATA, DialAccept, DialError, DialRequest, encode_event
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.mux import (
    EARLY_DATA,
    HEADER,
    INITIAL_WINDOW,
    MAX_DATA,
    FrameType,
    MuxConnection,
    Role,
    StreamData,
    StreamFin,
    StreamOpened,
    StreamReplied,
    StreamReset,
    StreamWindow,
)

REQUEST = DialRequest(resource="echo", client_addr="127.0.0.1:5000", params={"a": "b"})


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


HOWS = ["whole", "bytewise", "borrowed", "runs"]


def events(conn: MuxConnection, data: bytes, how: str = "whole") -> list:
    """Feed ``data`` ``how`` and collect every event. A DATA payload may
    arrive in several StreamData events (as its bytes do): adjacent ones of
    one stream are joined here, so a case reads the same however it is fed.

    ``borrowed`` feeds 7 bytes at a time the way the relay does: through
    one scratch buffer, without a copy, released and then scribbled over
    before the next chunk (so a frame header is cut, and a payload kept by
    mistake instead of copied would show up as garbage).

    ``runs`` feeds as ``borrowed``, 50 bytes at a time (several small
    frames in one chunk), and takes events the way the relay does: DATA
    runs with ``take_data`` (at most 2 pieces each) while it takes any,
    ``next_event`` for the rest.

    Every time, ``unparsed() == 0`` must mean NEED_DATA: the relay stops
    asking for events on that alone."""
    out = []
    step = {"whole": len(data), "bytewise": 1, "borrowed": 7, "runs": 50}[how]
    scratch = bytearray(max(step, 1))
    for i in range(0, len(data), max(step, 1)):
        chunk = data[i:i + step]
        if how in ("borrowed", "runs"):
            scratch[:len(chunk)] = chunk
            conn.receive_data(memoryview(scratch)[:len(chunk)], borrowed=True)
        else:
            conn.receive_data(chunk)
        while True:
            all_parsed = conn.unparsed() == 0
            pieces: list = []
            sid = conn.take_data(pieces, 2) if how == "runs" else None
            if sid is not None:
                assert not all_parsed and len(pieces) <= 2
                event = StreamData(sid, b"".join(pieces))
            else:
                event = conn.next_event()
            if event is NEED_DATA:
                break
            assert not all_parsed, event
            if isinstance(event, StreamData):
                event = StreamData(event.stream, bytes(event.data))  # what a relay writes or copies now
                if not event.data:
                    continue  # a run that took only a header
                if out and isinstance(out[-1], StreamData) and out[-1].stream == event.stream:
                    event = StreamData(event.stream, out.pop().data + event.data)
            out.append(event)
        if how in ("borrowed", "runs"):
            conn.release()
            scratch[:] = b"\xee" * len(scratch)
    return out


def opened_pair(how: str = "whole") -> tuple[MuxConnection, MuxConnection, int]:
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    assert events(cl, data, how) == [StreamOpened(sid, REQUEST)]
    reply = cl.send_reply(sid, DialAccept(session_id="s1"))
    assert events(gw, reply, how) == [StreamReplied(sid, DialAccept(session_id="s1"))]
    return gw, cl, sid


@pytest.mark.parametrize("how", HOWS)
def test_the_gateway_may_send_data_and_fin_behind_its_open(how):
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    wire = data + gw.send_data(sid, b"early") + gw.send_fin(sid) + b"\x03"  # + the next frame's start
    assert events(cl, wire, how) == [StreamOpened(sid, REQUEST), StreamData(sid, b"early"), StreamFin(sid)]
    # Accepted: the cluster answers, then sends its own DATA and FIN.
    events(gw, cl.send_reply(sid, DialAccept(session_id="s")) + cl.send_data(sid, b"late") + cl.send_fin(sid),
           how)
    assert not gw.is_live(sid) and not cl.is_live(sid)


def test_early_data_after_a_refusal_is_ignored_and_its_limits():
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    events(cl, data)
    refusal = cl.send_reply(sid, DialError(code=ErrorCode.ACCESS_DENIED, message="no"))
    # Crossing on the wire: the gateway's early bytes arrive after the refusal.
    assert events(cl, gw.send_data(sid, b"x" * 10) + gw.send_fin(sid)) == []
    assert events(gw, refusal) == [StreamReplied(sid, DialError(code=ErrorCode.ACCESS_DENIED, message="no"))]
    # Before the REPLY the gateway may send EARLY_DATA bytes, no more.
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    assert gw.send_window(sid) == EARLY_DATA
    data += gw.send_data(sid, b"x" * EARLY_DATA)
    assert gw.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        gw.send_data(sid, b"x")
    events(cl, data)
    with pytest.raises(RemoteProtocolError, match="before its REPLY"):
        events(cl, frame(FrameType.DATA, sid, b"x"))
    # After it, the whole window (what was sent early counts against it).
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    events(cl, data + gw.send_data(sid, b"x" * 10))
    events(gw, cl.send_reply(sid, DialAccept(session_id="s")))
    assert gw.send_window(sid) == INITIAL_WINDOW - 10
    with pytest.raises(RemoteProtocolError, match="exceeds its window"):
        events(cl, frame(FrameType.DATA, sid, b"x" * MAX_DATA) * (INITIAL_WINDOW // MAX_DATA))


@pytest.mark.parametrize("how", HOWS)
def test_a_session_round_trips_and_ends_with_fin_both_ways(how):
    gw, cl, sid = opened_pair(how)
    assert events(cl, gw.send_data(sid, b"hello"), how) == [StreamData(sid, b"hello")]
    assert events(gw, cl.send_data(sid, b"world"), how) == [StreamData(sid, b"world")]
    assert events(cl, gw.send_fin(sid), how) == [StreamFin(sid)]
    # Half-closed: the other direction still flows.
    assert events(gw, cl.send_data(sid, b"late"), how) == [StreamData(sid, b"late")]
    assert events(gw, cl.send_fin(sid), how) == [StreamFin(sid)]
    assert len(gw) == len(cl) == 0


def test_trailing_bytes_of_the_next_frame_wait_for_the_rest():
    gw, cl, sid = opened_pair()
    two = gw.send_data(sid, b"one") + gw.send_fin(sid)
    cut = len(two) - 2
    assert events(cl, two[:cut]) == [StreamData(sid, b"one")]
    assert cl.unparsed() == HEADER.size - 2  # the FIN's header, but for its last two bytes
    assert events(cl, two[cut:]) == [StreamFin(sid)]
    assert cl.unparsed() == 0


def test_large_data_is_split_into_frames_of_at_most_max_data():
    gw, cl, sid = opened_pair()
    payload = bytes(range(256)) * (INITIAL_WINDOW // 256)  # exactly the window
    data = gw.send_data(sid, payload)
    assert data.count(HEADER.pack(FrameType.DATA, sid, MAX_DATA)) == INITIAL_WINDOW // MAX_DATA
    assert events(cl, data) == [StreamData(sid, payload)]
    assert gw.send_window(sid) == 0


def test_a_data_payload_is_delivered_as_it_arrives():
    gw, cl, sid = opened_pair()
    data = gw.send_data(sid, b"0123456789")
    cl.receive_data(data[:HEADER.size + 4])
    assert cl.next_event() == StreamData(sid, b"0123")
    assert cl.next_event() is NEED_DATA
    cl.receive_data(data[HEADER.size + 4:])
    assert cl.next_event() == StreamData(sid, b"456789")


def test_the_header_of_a_data_frame_written_in_place():
    gw, cl, sid = opened_pair()
    buf = bytearray(HEADER.size) + b"payload"
    buf[:HEADER.size] = gw.send_data_header(sid, 7)
    assert events(cl, bytes(buf)) == [StreamData(sid, b"payload")]
    with pytest.raises(LocalProtocolError):
        gw.send_data_header(sid, MAX_DATA + 1)


def test_flow_control_both_sides():
    gw, cl, sid = opened_pair()
    with pytest.raises(LocalProtocolError):
        gw.send_data(sid, b"x" * (INITIAL_WINDOW + 1))
    events(cl, gw.send_data(sid, b"x" * INITIAL_WINDOW))
    # Acknowledging in batches: nothing until half a window is due.
    assert cl.acknowledge(sid, 1000) == b""
    window = cl.acknowledge(sid, INITIAL_WINDOW // 2)
    assert events(gw, window) == [StreamWindow(sid)]
    assert gw.send_window(sid) == INITIAL_WINDOW // 2 + 1000
    # A peer that ignores the window breaks the protocol.
    greedy = frame(FrameType.DATA, sid, b"y" * MAX_DATA) * ((INITIAL_WINDOW // 2 + 1000) // MAX_DATA + 1)
    with pytest.raises(RemoteProtocolError, match="exceeds its window"):
        events(cl, greedy)


def test_a_refused_dial_ends_the_stream():
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    sid, data = gw.send_open(REQUEST)
    events(cl, data)
    refusal = DialError(code=ErrorCode.ACCESS_DENIED, message="no")
    assert events(gw, cl.send_reply(sid, refusal)) == [StreamReplied(sid, refusal)]
    assert len(gw) == len(cl) == 0
    with pytest.raises(LocalProtocolError):
        gw.send_data(sid, b"x")


def test_reset_ends_both_ways_and_frames_crossing_it_are_ignored():
    gw, cl, sid = opened_pair()
    in_flight = cl.send_data(sid, b"crossing")
    reset = gw.send_reset(sid, "client: receive failed: Connection reset by peer")
    assert gw.send_reset(sid, "again") == b""  # already over
    assert events(gw, in_flight) == []  # crossed our RESET: dropped
    assert events(cl, reset) == [StreamReset(sid, "client: receive failed: Connection reset by peer")]
    assert len(gw) == len(cl) == 0


def test_reset_reason_is_cut_at_a_character_boundary():
    gw, cl, sid = opened_pair()
    (event,) = events(cl, gw.send_reset(sid, "é" * 1000))
    assert event.reason == "é" * 512


def test_stream_ids_increase_and_many_streams_interleave():
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    ids = []
    for _ in range(5):
        sid, data = gw.send_open(REQUEST)
        events(cl, data)
        events(gw, cl.send_reply(sid, DialAccept(session_id=f"s{sid}")))
        ids.append(sid)
    assert ids == [1, 2, 3, 4, 5]
    mixed = b"".join(gw.send_data(sid, bytes([sid]) * sid) for sid in reversed(ids))
    assert events(cl, mixed) == [StreamData(sid, bytes([sid]) * sid) for sid in reversed(ids)]


# ----------------------------------------------------------------------
# The peer breaking the rules: a RemoteProtocolError, and the connection
# stays failed.

@pytest.mark.parametrize("data, match", [
    (frame(9, 1), "unknown frame type"),
    (HEADER.pack(FrameType.DATA, 1, MAX_DATA + 1), "limit"),  # judged from the header alone
    (HEADER.pack(FrameType.OPEN, 1, 1 << 20), "limit"),
    (frame(FrameType.DATA, 7, b"x"), "never opened"),
    (frame(FrameType.WINDOW, 7, struct.pack(">I", 1)), "never opened"),
    (frame(FrameType.REPLY, 1, encode_event(DialAccept(session_id="s"))), "only the cluster"),
    (frame(FrameType.OPEN, 0, encode_event(REQUEST)), "not above"),
    (frame(FrameType.OPEN, 1, encode_event(DialAccept(session_id="s"))), "must carry a DialRequest"),
    (frame(FrameType.OPEN, 1, b"\x00\x00\x00\x02\x07\x01"), "bad dial frame"),
    (frame(FrameType.OPEN, 1, encode_event(REQUEST) + b"x"), "bad dial frame"),
])
def test_cluster_side_rejects(data, match):
    cl = MuxConnection(Role.CLUSTER)
    with pytest.raises(RemoteProtocolError, match=match):
        events(cl, data)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        cl.next_event()


def _accepted_cluster() -> MuxConnection:
    gw, cl, sid = opened_pair()
    return cl


@pytest.mark.parametrize("data, match", [
    (frame(FrameType.DATA, 1, b""), "empty DATA"),
    (frame(FrameType.WINDOW, 1, b"\x00\x00\x00"), "4 bytes"),
    (frame(FrameType.WINDOW, 1, struct.pack(">I", 0)), "bad WINDOW"),
    (frame(FrameType.WINDOW, 1, struct.pack(">I", 2**31 - 1)), "bad WINDOW"),
    (frame(FrameType.FIN, 1, b"x"), "unexpected FIN"),
    (frame(FrameType.FIN, 1) * 2, "unexpected FIN"),
    (frame(FrameType.FIN, 1) + frame(FrameType.DATA, 1, b"x"), "after FIN"),
    (frame(FrameType.RESET, 1, b"\xff"), "not UTF-8"),
    (frame(FrameType.RESET, 1, b"x" * 1025), "limit"),
    (frame(FrameType.OPEN, 1, encode_event(REQUEST)), "not above"),
])
def test_rules_on_an_accepted_stream(data, match):
    cl = _accepted_cluster()
    with pytest.raises(RemoteProtocolError, match=match):
        events(cl, data)


def test_gateway_side_rejects_opens_double_replies_and_early_data():
    gw = MuxConnection(Role.GATEWAY)
    with pytest.raises(RemoteProtocolError, match="only the gateway"):
        events(gw, frame(FrameType.OPEN, 1, encode_event(REQUEST)))
    gw, cl, sid = opened_pair()
    with pytest.raises(RemoteProtocolError, match="second REPLY"):
        events(gw, frame(FrameType.REPLY, sid, encode_event(DialAccept(session_id="x"))))
    gw = MuxConnection(Role.GATEWAY)
    sid, _ = gw.send_open(REQUEST)
    with pytest.raises(RemoteProtocolError, match="before it was accepted"):
        events(gw, frame(FrameType.DATA, sid, b"x"))
    gw = MuxConnection(Role.GATEWAY)
    sid, _ = gw.send_open(REQUEST)
    with pytest.raises(RemoteProtocolError, match="DialAccept or a DialError"):
        events(gw, frame(FrameType.REPLY, sid, encode_event(REQUEST)))


def test_local_misuse_is_a_local_error():
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    with pytest.raises(LocalProtocolError):
        cl.send_open(REQUEST)
    with pytest.raises(LocalProtocolError):
        gw.send_reply(1, DialAccept(session_id="s"))
    sid, _ = gw.send_open(REQUEST)
    cl.receive_data(_)
    cl.next_event()
    with pytest.raises(LocalProtocolError):
        cl.send_data(sid, b"x")  # the cluster sends only after its DialAccept
    with pytest.raises(LocalProtocolError):
        cl.send_fin(sid)
    with pytest.raises(LocalProtocolError):
        gw.send_data(99, b"x")
    gw, cl, sid = opened_pair()
    gw.send_fin(sid)
    with pytest.raises(LocalProtocolError):
        gw.send_data(sid, b"x")
    with pytest.raises(LocalProtocolError):
        gw.send_data(sid, b"")


# ----------------------------------------------------------------------
# Property-based.

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_only_ever_raise_remote_protocol_error(data, chunk):
    for role in Role:
        conn = MuxConnection(role)
        try:
            for i in range(0, len(data), chunk):
                conn.receive_data(data[i:i + chunk])
                while conn.next_event() is not NEED_DATA:
                    pass
        except RemoteProtocolError:
            continue
        # Whatever was not parsed is at most one incomplete frame.
        assert len(conn._buf) - conn._pos < HEADER.size + 70_000 + chunk


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.binary(min_size=1, max_size=3000)), max_size=30),
       st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=20),
       st.sampled_from(["whole", "borrowed", "runs"]))
def test_interleaved_streams_arrive_intact_however_the_bytes_are_chunked(writes, cuts, how):
    gw, cl = MuxConnection(Role.GATEWAY), MuxConnection(Role.CLUSTER)
    wire = bytearray()
    for _ in range(3):
        sid, data = gw.send_open(REQUEST)
        wire += data
    for sid in (1, 2, 3):
        events(cl, b"")  # nothing yet
    opened = events(cl, bytes(wire))
    assert [e.stream for e in opened] == [1, 2, 3]
    for sid in (1, 2, 3):
        events(gw, cl.send_reply(sid, DialAccept(session_id="s")))
    wire = bytearray()
    expected: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
    for sid, payload in writes:
        wire += gw.send_data(sid, payload)
        expected[sid] += payload
    for sid in (1, 2, 3):
        wire += gw.send_fin(sid)
    got: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
    fins = set()
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        i += 1
        for event in events(cl, bytes(wire[pos:pos + step]), how):
            if isinstance(event, StreamData):
                assert event.stream not in fins
                got[event.stream] += event.data
            else:
                assert isinstance(event, StreamFin)
                fins.add(event.stream)
        pos += step
    assert got == expected and fins == {1, 2, 3}
