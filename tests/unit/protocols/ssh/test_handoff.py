"""The cluster's hand-off frame to the gateway (terminated SSH sessions)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.signals import NEED_DATA
from protocols.ssh.handoff import MAX_HANDOFF, Handoff, HandoffReader, encode_handoff

H = Handoff(certificate="ssh-ed25519-cert-v01@openssh.com AAAA", host="web-1.prod",
            known_hosts=["web-1.prod ssh-ed25519 AAAA", "@cert-authority web-1.prod ssh-ed25519 BBBB"])
NODE = b"SSH-2.0-OpenSSH_9.2\r\n"


@pytest.mark.parametrize("step", [None, 1, 3])
def test_round_trip_with_the_nodes_bytes_behind(step):
    data = encode_handoff(H) + NODE
    r = HandoffReader()
    got = NEED_DATA
    i = 0
    while got is NEED_DATA:
        n = step or len(data)
        r.receive_data(data[i:i + n])
        i += n
        got = r.next_event()
    assert got == H and r.needed() == 0
    assert r.trailing_data + data[i:] == NODE
    assert r.next_event() == H  # asked again: the same


def test_needed_says_exactly_how_much_to_read():
    data = encode_handoff(H)
    r = HandoffReader()
    assert r.needed() == 4
    r.receive_data(data[:2])
    assert r.needed() == 2
    r.receive_data(data[2:4])
    assert r.needed() == len(data) - 4
    r.receive_data(data[4:])
    assert r.next_event() == H and r.needed() == 0


@pytest.mark.parametrize("body, message", [
    (b"[]", "not an object"),
    (b'{"v": 2}', "version 2"),
    (b'{"v": 1, "certificate": "a\\nb", "host": "h", "known_hosts": []}', "one non-empty line"),
    (b'{"v": 1, "certificate": "c", "host": "h", "known_hosts": "x"}', "known_hosts must be"),
    (b"{not json", "malformed"),
    (b'{"v": 1, "certificate": "c", "host": "h", "known_hosts": [], "agent_forwarding": "yes"}', "malformed"),
])
def test_malformed_frames_are_named(body, message):
    r = HandoffReader()
    r.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(RemoteProtocolError, match=message):
        r.next_event()


def test_bounds():
    r = HandoffReader()
    r.receive_data(struct.pack(">I", MAX_HANDOFF + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum"):
        r.next_event()
    with pytest.raises(RemoteProtocolError, match="ended before"):
        HandoffReader().receive_data(b"")
    with pytest.raises(LocalProtocolError):
        HandoffReader().trailing_data
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_handoff(Handoff(certificate="c" * MAX_HANDOFF, host="h", known_hosts=[]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_a_frame_an_error_or_need_data(data):
    r = HandoffReader()
    try:
        if data:
            r.receive_data(data)
        got = r.next_event()
    except RemoteProtocolError:
        return
    assert got is NEED_DATA or isinstance(got, Handoff)


def test_agent_forwarding_round_trips_and_is_off_when_absent():
    allowed = Handoff(certificate="c", host="h", known_hosts=[], agent_forwarding=True)
    r = HandoffReader()
    r.receive_data(encode_handoff(allowed))
    assert r.next_event() == allowed
    body = b'{"v": 1, "certificate": "c", "host": "h", "known_hosts": []}'  # an older cluster's frame
    r = HandoffReader()
    r.receive_data(struct.pack(">I", len(body)) + body)
    assert r.next_event().agent_forwarding is False
