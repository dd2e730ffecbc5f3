"""The ssh-agent add request (protocols/ssh/agent.py); a real ssh-agent
takes it in tests/integration/test_ssh_proxycommand.py."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.signals import NEED_DATA
from protocols.ssh.agent import ED25519_CERT, MAX_REPLY, ReplyReader, add_ed25519_certificate


def _strings(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack_from(">I", data)
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out, data


def test_the_request_carries_the_certificate_the_key_and_the_lifetime():
    msg = add_ed25519_certificate(certificate=b"CERT", public=b"P" * 32, seed=b"S" * 32, comment="wicket",
                                  lifetime=120)
    (length,) = struct.unpack_from(">I", msg)
    assert length == len(msg) - 4 and msg[4] == 25
    fields, rest = _strings(msg[5:], 5)
    assert fields == [ED25519_CERT, b"CERT", b"P" * 32, b"S" * 32 + b"P" * 32, b"wicket"]
    assert rest == bytes([1]) + struct.pack(">I", 120)


@pytest.mark.parametrize("kwargs", [dict(public=b"P"), dict(seed=b"S" * 31), dict(lifetime=0),
                                    dict(lifetime=1 << 32)])
def test_bad_requests_are_refused_here(kwargs):
    args = dict(certificate=b"C", public=b"P" * 32, seed=b"S" * 32, comment="", lifetime=60) | kwargs
    with pytest.raises(LocalProtocolError):
        add_ed25519_certificate(**args)


@pytest.mark.parametrize("reply, added", [(b"\0\0\0\x01\x06", True), (b"\0\0\0\x01\x05", False)])
@pytest.mark.parametrize("step", [None, 1])
def test_replies_whole_and_byte_by_byte_with_trailing_data(reply, added, step):
    r = ReplyReader()
    data = reply + b"trailing"
    got, i = NEED_DATA, 0
    while got is NEED_DATA:
        n = step or len(data)
        r.receive_data(data[i:i + n])
        i += n
        got = r.next_event()
    assert got is added


@pytest.mark.parametrize("data, message", [
    (b"\0\0\0\x01\x0c", "message 12"),
    (struct.pack(">I", MAX_REPLY + 1), "exceeds"),
    (b"\0\0\0\0", "below the minimum"),
])
def test_bad_replies_are_named(data, message):
    r = ReplyReader()
    r.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=message):
        r.next_event()
    with pytest.raises(RemoteProtocolError, match="closed"):
        ReplyReader().receive_data(b"")


@given(st.binary(max_size=64))
def test_fuzzed_replies_answer_or_fail_cleanly(data):
    r = ReplyReader()
    if not data:
        return
    r.receive_data(data)
    try:
        r.next_event()
    except RemoteProtocolError:
        pass
